package testenv

import (
	"fmt"
	"strings"
)

// Node is one machine of a test cluster: its own containerd and its own
// Caddy with peermirror (peer to peer on), on loopback with ports of its
// own, or with Caddy in a network namespace of its own ([NodeOptions.Host]).
type Node struct {
	Name    string
	Ctrd    *Containerd
	Mirror  *Caddy
	P2PPort int
	// Host is the network namespace the node's Caddy runs in
	// ([NodeOptions.Host]), or nil on loopback.
	Host *Host
}

// NodeOptions shape a node's Caddyfile.
type NodeOptions struct {
	// Bootstrap lists peer list URLs (bootstrap_http).
	Bootstrap []string
	// Extra is added inside the peermirror global option block.
	Extra string
	// DHTExtra is added inside the dht block.
	DHTExtra string
	// MirrorPort, when set, is the mirror_port told to peers instead of
	// the port Caddy listens on: the port of a [FaultProxy] in front of
	// the node, so that peers reach it only through the proxy.
	MirrorPort int
	// CaddyBinary, when set, is the Caddy run instead of [CaddyBinary]'s:
	// another build of the plugin (see [BuildCaddy]).
	CaddyBinary string

	// Host, when set, runs the node's Caddy in that network namespace
	// (its containerd stays in the root namespace: only its socket
	// matters): mirror on port [NetnsMirrorPort] and libp2p on
	// [NetnsP2PPort] of the host's addresses, which are announced; the
	// node's containerd asks the mirror at the host's first address. See
	// startNetnsNode.
	Host *Host
	// BootstrapDNS lists host names (bootstrap_dns), resolved in the
	// node's namespace through [Network.SetName].
	BootstrapDNS []string
	// DetectAddrs, with Host, listens on every address of the namespace
	// (libp2p on 0.0.0.0 and, for IPv6 hosts, ::) and announces nothing:
	// the node detects its addresses itself.
	DetectAddrs bool
	// Global is added to the Caddyfile's global options block.
	Global string
	// SiteExtra is added inside the mirror's site block, before the
	// peermirror directive (such as a basic_auth). Loopback nodes only.
	SiteExtra string
	// Quiet leaves out the debug global option: Caddy logs at its
	// default level, INFO, as in production. Benchmarks use it, so that
	// per-request debug lines are not part of what they time.
	Quiet bool
	// Sites is appended to the node's Caddyfile after the mirror's site:
	// more site blocks, such as one with the debug page. Loopback nodes
	// only (not with Host).
	Sites string
}

// StartNode starts a node whose containerd asks its own mirror first and
// upstream second for registryHost.
func StartNode(t T, name string, registryHost, upstream string, opts NodeOptions) *Node {
	t.Helper()
	if opts.Host != nil {
		return startNetnsNode(t, name, registryHost, upstream, opts)
	}
	n := &Node{Name: name, Ctrd: StartContainerd(t), P2PPort: FreePort(t)}
	bin := opts.CaddyBinary
	if bin == "" {
		bin = CaddyBinary(t)
	}
	n.Mirror = StartCaddyWithBinary(t, bin, func(port int, admin string) string {
		mirrorPort := port
		if opts.MirrorPort != 0 {
			mirrorPort = opts.MirrorPort
		}
		var dhtLines strings.Builder
		fmt.Fprintf(&dhtLines, "\t\t\tlisten /ip4/127.0.0.1/tcp/%d\n\t\t\tmirror_port %d\n", n.P2PPort, mirrorPort)
		for _, b := range opts.Bootstrap {
			fmt.Fprintf(&dhtLines, "\t\t\tbootstrap_http %s\n", b)
		}
		for _, name := range opts.BootstrapDNS {
			fmt.Fprintf(&dhtLines, "\t\t\tbootstrap_dns %s\n", name)
		}
		if opts.DHTExtra != "" {
			dhtLines.WriteString(opts.DHTExtra + "\n")
		}
		extra := ""
		if opts.Extra != "" {
			extra = opts.Extra + "\n"
		}
		return fmt.Sprintf("{\n\tadmin %s\n%s%s\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n\t\t}\n"+
			"\t\tdht {\n%s\t\t}\n%s\t}\n}\n\n:%d {\n%s\tpeermirror\n}\n%s",
			admin, opts.debugOption(), opts.Global, n.Ctrd.Socket, dhtLines.String(), extra, port,
			opts.SiteExtra, opts.Sites)
	})
	n.Ctrd.WriteHostsToml(t, registryHost, upstream, n.Mirror.URL)
	return n
}

// debugOption is the global option line that turns on debug logging,
// unless the node is quiet.
func (o NodeOptions) debugOption() string {
	if o.Quiet {
		return ""
	}
	return "\tdebug\n"
}
