package testenv

import (
	"fmt"
	"strings"
)

// Node is one machine of a test cluster: its own containerd and its own
// Caddy with peermirror (peer to peer on), on loopback with ports of its
// own.
type Node struct {
	Name    string
	Ctrd    *Containerd
	Mirror  *Caddy
	P2PPort int
}

// NodeOptions shape a node's Caddyfile.
type NodeOptions struct {
	// Bootstrap lists peer list URLs (bootstrap_http).
	Bootstrap []string
	// Extra is added inside the peermirror global option block.
	Extra string
	// DHTExtra is added inside the dht block.
	DHTExtra string
}

// StartNode starts a node whose containerd asks its own mirror first and
// upstream second for registryHost.
func StartNode(t T, name string, registryHost, upstream string, opts NodeOptions) *Node {
	t.Helper()
	n := &Node{Name: name, Ctrd: StartContainerd(t), P2PPort: FreePort(t)}
	n.Mirror = StartCaddy(t, func(port int, admin string) string {
		var dhtLines strings.Builder
		fmt.Fprintf(&dhtLines, "\t\t\tlisten /ip4/127.0.0.1/tcp/%d\n\t\t\tmirror_port %d\n", n.P2PPort, port)
		for _, b := range opts.Bootstrap {
			fmt.Fprintf(&dhtLines, "\t\t\tbootstrap_http %s\n", b)
		}
		if opts.DHTExtra != "" {
			dhtLines.WriteString(opts.DHTExtra + "\n")
		}
		return fmt.Sprintf("{\n\tadmin %s\n\tdebug\n\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n\t\t}\n"+
			"\t\tdht {\n%s\t\t}\n%s\n\t}\n}\n\n:%d {\n\tpeermirror\n}\n",
			admin, n.Ctrd.Socket, dhtLines.String(), opts.Extra, port)
	})
	n.Ctrd.WriteHostsToml(t, registryHost, upstream, n.Mirror.URL)
	return n
}
