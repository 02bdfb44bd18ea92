package dht

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// bridgeInterfacePrefixes name the interfaces whose addresses are never
// announced: they belong to container bridges, pod networks, overlay
// tunnels and service proxies, and other nodes cannot reach this node
// through them (docker0 holds 172.17.0.1 on every Docker host; kube-ipvs0
// holds every Service IP).
var bridgeInterfacePrefixes = []string{
	"docker",       // Docker's default bridge docker0
	"br-",          // Docker user-defined bridges
	"cni",          // the CNI bridge plugin's cni0
	"flannel",      // flannel.1 VXLAN
	"cali",         // Calico per-pod interfaces
	"tunl",         // Calico IP-in-IP tunl0
	"vxlan",        // vxlan.calico and other VXLAN overlays
	"veth",         // container ends of veth pairs
	"cilium",       // cilium_host, cilium_net, cilium_vxlan
	"lxc",          // Cilium per-pod interfaces
	"weave",        // Weave Net
	"kube-ipvs",    // kube-proxy IPVS dummy holding Service IPs
	"kube-bridge",  // kube-router's pod bridge
	"nodelocaldns", // NodeLocal DNSCache dummy
	"virbr",        // libvirt NAT bridges
	"podman",       // Podman's default bridge
}

// isBridgeInterface reports whether addresses of the interface named name
// are kept from peers.
func isBridgeInterface(name string) bool {
	for _, p := range bridgeInterfacePrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// netInterface is what address filtering needs to know about one network
// interface.
type netInterface struct {
	Name  string
	Up    bool
	Addrs []netip.Addr
}

// announceRules decide which of the host's addresses are told to peers.
type announceRules struct {
	keepLoopback bool           // every listen address is loopback
	ips          []netip.Addr   // AnnounceAddrs given as IPs
	full         []ma.Multiaddr // AnnounceAddrs given as multiaddrs
}

// announcedAddrs returns the addresses to announce, given the host's own
// addresses (listen addresses with unspecified IPs already expanded to
// interface addresses) and the interfaces of the machine.
//
// With AnnounceAddrs, those replace detection: each announced IP takes the
// transport part (/tcp/5001, /udp/5001/quic-v1) of every host address of its
// family. Without, a host address is kept unless its IP is unspecified,
// multicast, link-local, loopback (kept if every listen address is
// loopback), or on an interface that is down or named like a container
// bridge (see bridgeInterfacePrefixes). An address whose IP is on no known
// interface is kept: nothing says it is unreachable.
func announcedAddrs(
	hostAddrs []ma.Multiaddr, rules announceRules, ifaces []netInterface,
) []ma.Multiaddr {
	var out []ma.Multiaddr
	if len(rules.ips) > 0 || len(rules.full) > 0 {
		out = append(out, rules.full...)
		for _, ip := range rules.ips {
			ipAddr := ipMultiaddr(ip)
			for _, a := range hostAddrs {
				hostIP, ok := ipOf(a)
				if !ok || hostIP.Is4() != ip.Is4() {
					continue
				}
				_, transport := ma.SplitFirst(a)
				out = append(out, ipAddr.Encapsulate(transport))
			}
		}
		return sortedUnique(out)
	}

	byIP := make(map[netip.Addr]netInterface)
	for _, iface := range ifaces {
		for _, ip := range iface.Addrs {
			byIP[ip.Unmap()] = iface
		}
	}
	for _, a := range hostAddrs {
		ip, ok := ipOf(a)
		if !ok {
			continue
		}
		iface, known := byIP[ip]
		if known && (!iface.Up || isBridgeInterface(iface.Name)) {
			continue
		}
		if !usableIP(ip, rules.keepLoopback) {
			continue
		}
		out = append(out, a)
	}
	return sortedUnique(out)
}

// usableIP reports whether ip can be reached by other nodes, leaving
// interface names aside.
func usableIP(ip netip.Addr, keepLoopback bool) bool {
	switch {
	case !ip.IsValid(), ip.IsUnspecified(), ip.IsMulticast():
		return false
	case ip.IsLoopback():
		return keepLoopback
	case ip.IsLinkLocalUnicast():
		return false
	}
	return true
}

// ipOf returns the IP of a multiaddr that starts with /ip4 or /ip6 (not
// /ip6zone: zoned addresses are link-local and never used here).
func ipOf(a ma.Multiaddr) (netip.Addr, bool) {
	if len(a) == 0 {
		return netip.Addr{}, false
	}
	c := a[0]
	if c.Code() != ma.P_IP4 && c.Code() != ma.P_IP6 {
		return netip.Addr{}, false
	}
	ip, ok := netip.AddrFromSlice(c.RawValue())
	if !ok {
		return netip.Addr{}, false
	}
	return ip.Unmap(), true
}

// ipMultiaddr returns /ip4/<ip> or /ip6/<ip>.
func ipMultiaddr(ip netip.Addr) ma.Multiaddr {
	a, err := manet.FromIP(net.IP(ip.AsSlice()))
	if err != nil {
		// FromIP fails only for a nil or malformed IP, which a valid
		// netip.Addr never is.
		panic("converting ip to multiaddr: " + err.Error())
	}
	return a
}

// withIP returns addrs with their IP replaced by ip, for the addresses of
// ip's family.
func withIP(addrs []ma.Multiaddr, ip netip.Addr) []ma.Multiaddr {
	var out []ma.Multiaddr
	ipAddr := ipMultiaddr(ip)
	for _, a := range addrs {
		old, ok := ipOf(a)
		if !ok || old.Is4() != ip.Is4() {
			continue
		}
		_, rest := ma.SplitFirst(a)
		out = append(out, ipAddr.Encapsulate(rest))
	}
	return out
}

func sortedUnique(addrs []ma.Multiaddr) []ma.Multiaddr {
	addrs = ma.Unique(addrs)
	slices.SortFunc(addrs, ma.Multiaddr.Compare)
	return addrs
}

// interfaceCache lists the machine's interfaces at most every
// interfaceCacheTTL: libp2p asks for the host's addresses often.
type interfaceCache struct {
	mu      sync.Mutex
	at      time.Time
	ifaces  []netInterface
	listErr error
}

const interfaceCacheTTL = 10 * time.Second

func (c *interfaceCache) get() ([]netInterface, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < interfaceCacheTTL {
		return c.ifaces, c.listErr
	}
	c.ifaces, c.listErr = systemInterfaces()
	c.at = time.Now()
	return c.ifaces, c.listErr
}

// systemInterfaces lists the machine's interfaces and their IPs.
func systemInterfaces() ([]netInterface, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	out := make([]netInterface, 0, len(ifaces))
	for _, iface := range ifaces {
		addrs, err := iface.Addrs()
		if err != nil {
			continue
		}
		ni := netInterface{Name: iface.Name, Up: iface.Flags&net.FlagUp != 0}
		for _, a := range addrs {
			var ip net.IP
			switch v := a.(type) {
			case *net.IPNet:
				ip = v.IP
			case *net.IPAddr:
				ip = v.IP
			}
			if addr, ok := netip.AddrFromSlice(ip); ok {
				ni.Addrs = append(ni.Addrs, addr.Unmap())
			}
		}
		out = append(out, ni)
	}
	return out, nil
}
