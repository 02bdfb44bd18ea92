package dht

import (
	"net/netip"
	"slices"
	"testing"

	ma "github.com/multiformats/go-multiaddr"
)

func TestAnnouncedAddrs(t *testing.T) {
	ips := func(s ...string) []netip.Addr {
		var out []netip.Addr
		for _, v := range s {
			out = append(out, netip.MustParseAddr(v))
		}
		return out
	}
	// a Kubernetes node: two NICs, dual stack, Docker, flannel, a CNI
	// bridge, a pod veth, kube-ipvs0 and a NIC that is down
	node := []netInterface{
		{Name: "lo", Up: true, Addrs: ips("127.0.0.1", "::1")},
		{Name: "eth0", Up: true, Addrs: ips("10.0.0.2", "fd00::2", "fe80::1")},
		{Name: "eth1", Up: true, Addrs: ips("192.168.50.2")},
		{Name: "docker0", Up: true, Addrs: ips("172.17.0.1")},
		{Name: "br-4f2a", Up: true, Addrs: ips("172.18.0.1")},
		{Name: "flannel.1", Up: true, Addrs: ips("10.244.0.0")},
		{Name: "cni0", Up: true, Addrs: ips("10.244.0.1")},
		{Name: "veth12ab", Up: true, Addrs: ips("fe80::2")},
		{Name: "kube-ipvs0", Up: true, Addrs: ips("10.96.0.1")},
		{Name: "cali1234", Up: true, Addrs: ips("169.254.1.1")},
		{Name: "eth2", Up: false, Addrs: ips("10.1.0.2")},
	}
	// what the host reports for /ip4/0.0.0.0/tcp/5001 and /ip6/::/tcp/5001
	// (plus QUIC) on that node
	hostAddrs := []string{
		"/ip4/127.0.0.1/tcp/5001",
		"/ip4/10.0.0.2/tcp/5001",
		"/ip4/10.0.0.2/udp/5001/quic-v1",
		"/ip4/192.168.50.2/tcp/5001",
		"/ip4/172.17.0.1/tcp/5001",
		"/ip4/172.18.0.1/tcp/5001",
		"/ip4/10.244.0.0/tcp/5001",
		"/ip4/10.244.0.1/tcp/5001",
		"/ip4/10.96.0.1/tcp/5001",
		"/ip4/169.254.1.1/tcp/5001",
		"/ip4/10.1.0.2/tcp/5001",
		"/ip4/203.0.113.9/tcp/5001", // on no known interface
		"/ip6/::1/tcp/5001",
		"/ip6/fd00::2/tcp/5001",
		"/ip6/fe80::1/tcp/5001",
		"/ip6/fe80::2/tcp/5001",
	}

	cases := []struct {
		name   string
		host   []string
		rules  announceRules
		ifaces []netInterface
		want   []string
	}{
		{
			name:   "detected: bridges, loopback, link-local and down interfaces dropped",
			host:   hostAddrs,
			ifaces: node,
			want: []string{
				"/ip4/10.0.0.2/tcp/5001",
				"/ip4/10.0.0.2/udp/5001/quic-v1",
				"/ip4/192.168.50.2/tcp/5001",
				"/ip4/203.0.113.9/tcp/5001",
				"/ip6/fd00::2/tcp/5001",
			},
		},
		{
			name:   "loopback kept when every listen address is loopback",
			host:   []string{"/ip4/127.0.0.1/tcp/40001", "/ip6/::1/tcp/40002"},
			rules:  announceRules{keepLoopback: true},
			ifaces: node,
			want:   []string{"/ip4/127.0.0.1/tcp/40001", "/ip6/::1/tcp/40002"},
		},
		{
			name:   "loopback dropped otherwise",
			host:   []string{"/ip4/127.0.0.1/tcp/40001"},
			ifaces: node,
			want:   nil,
		},
		{
			name:  "announce IPs take the transports of their family",
			host:  hostAddrs,
			rules: announceRules{ips: ips("10.0.0.7", "fd00::7")},
			want: []string{
				"/ip4/10.0.0.7/tcp/5001",
				"/ip4/10.0.0.7/udp/5001/quic-v1",
				"/ip6/fd00::7/tcp/5001",
			},
		},
		{
			name: "announce IP with port 0 listeners resolved",
			host: []string{"/ip4/10.0.0.2/tcp/41234"},
			rules: announceRules{
				ips: ips("10.0.0.2", "fd00::2"), // no IPv6 listener: nothing for fd00::2
			},
			want: []string{"/ip4/10.0.0.2/tcp/41234"},
		},
		{
			name: "announce multiaddrs used as they are, beside IPs",
			host: []string{"/ip4/10.0.0.2/tcp/5001"},
			rules: announceRules{
				ips:  ips("192.168.50.2"),
				full: []ma.Multiaddr{ma.StringCast("/dns4/node-a.cluster.test/tcp/5001")},
			},
			want: []string{"/dns4/node-a.cluster.test/tcp/5001", "/ip4/192.168.50.2/tcp/5001"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var host []ma.Multiaddr
			for _, s := range tc.host {
				host = append(host, ma.StringCast(s))
			}
			var got []string
			for _, a := range announcedAddrs(host, tc.rules, tc.ifaces) {
				got = append(got, a.String())
			}
			want := slices.Clone(tc.want)
			slices.Sort(want)
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Errorf("announced\n  %v\nwant\n  %v", got, want)
			}
		})
	}
}

func TestIsBridgeInterface(t *testing.T) {
	for name, want := range map[string]bool{
		"docker0": true, "cni0": true, "flannel.1": true, "cali0a1b": true, "veth9f": true,
		"kube-ipvs0": true, "cilium_host": true, "tunl0": true,
		"eth0": false, "ens5": false, "bond0": false, "enp0s31f6": false, "lo": false, "wlan0": false,
	} {
		if got := isBridgeInterface(name); got != want {
			t.Errorf("isBridgeInterface(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestMirrorURL(t *testing.T) {
	for ip, want := range map[string]string{
		"10.0.0.3":         "http://10.0.0.3:30020",
		"fd00::3":          "http://[fd00::3]:30020",
		"::ffff:10.0.0.3":  "http://10.0.0.3:30020",
		"127.0.0.1":        "http://127.0.0.1:30020",
		"2001:db8::1%eth0": "http://[2001:db8::1]:30020",
	} {
		if got := mirrorURL(netip.MustParseAddr(ip), 30020); got != want {
			t.Errorf("mirrorURL(%s) = %q, want %q", ip, got, want)
		}
	}
}

func TestWithIP(t *testing.T) {
	addrs := []ma.Multiaddr{
		ma.StringCast("/ip4/10.0.0.2/tcp/5001"),
		ma.StringCast("/ip6/fd00::2/tcp/5001"),
		ma.StringCast("/ip4/10.0.0.2/udp/5001/quic-v1"),
	}
	got := withIP(addrs, netip.MustParseAddr("192.168.1.9"))
	want := []string{"/ip4/192.168.1.9/tcp/5001", "/ip4/192.168.1.9/udp/5001/quic-v1"}
	if len(got) != len(want) {
		t.Fatalf("withIP = %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("withIP[%d] = %s, want %s", i, got[i], want[i])
		}
	}
}
