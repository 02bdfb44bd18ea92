package dht

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

const testKey = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"

func mirrorURLOf(r *Router) string {
	return "http://127.0.0.1:" + strconv.Itoa(r.conf().MirrorPort)
}

// startCluster starts n routers on 127.0.0.1; all but the first bootstrap
// from the first by static address. It waits until each has a peer.
func startCluster(t *testing.T, n int, tweak func(*Config)) []*Router {
	t.Helper()
	var nodes []*Router
	for i := range n {
		cfg := testConfig()
		if tweak != nil {
			tweak(&cfg)
		}
		if i > 0 {
			cfg.BootstrapStatic = p2pAddrs(t, nodes[0])
		}
		nodes = append(nodes, startRouter(t, fmt.Sprintf("node%d", i), cfg))
	}
	for i, r := range nodes {
		eventually(t, fmt.Sprintf("node%d ready", i), r.Ready)
	}
	return nodes
}

func TestStaticBootstrapResolve(t *testing.T) {
	nodes := startCluster(t, 4, nil)
	a, b, c := nodes[1], nodes[2], nodes[3]

	a.Advertise(testKey)
	a.Advertise(testKey) // idempotent
	if got := a.Advertised(); len(got) != 1 || got[0] != testKey {
		t.Fatalf("Advertised() = %v, want [%s]", got, testKey)
	}

	for _, r := range []*Router{b, c} {
		got := waitResolves(t, r, testKey, a)
		if len(got) != 1 {
			t.Fatalf("resolve from %s = %v, want only A", r.ID(), got)
		}
		if got[0].ID != a.ID() || got[0].MirrorURL != mirrorURLOf(a) {
			t.Errorf("resolve from %s = %+v, want %s at %s", r.ID(), got[0], a.ID(), mirrorURLOf(a))
		}
	}

	// the advertiser never finds itself
	if got := resolveAll(t, a, testKey, 0); len(got) != 0 {
		t.Errorf("resolve from the advertiser = %v, want nothing (never self)", got)
	}
	// a key nobody advertises
	if got := resolveAll(t, b, "docker.io/library/nothing:here", 0); len(got) != 0 {
		t.Errorf("resolving an unknown key = %v, want nothing", got)
	}
}

func TestResolveSeveralProvidersAndMax(t *testing.T) {
	nodes := startCluster(t, 4, nil)
	a, d, c := nodes[1], nodes[3], nodes[2]
	const ref = "docker.io/library/nginx:1.27"
	a.Advertise(ref)
	d.Advertise(ref)

	got := waitResolves(t, c, ref, a, d)
	urls := map[peer.ID]string{}
	for _, p := range got {
		urls[p.ID] = p.MirrorURL
	}
	if urls[a.ID()] != mirrorURLOf(a) || urls[d.ID()] != mirrorURLOf(d) || len(urls) != 2 {
		t.Errorf("providers = %v, want A at %s and D at %s", urls, mirrorURLOf(a), mirrorURLOf(d))
	}
	if got := resolveAll(t, c, ref, 1); len(got) != 1 {
		t.Errorf("Resolve with max 1 yielded %d peers", len(got))
	}
	// a provider asking for max 1 gets the other provider, not itself
	if got := resolveAll(t, a, ref, 1); len(got) != 1 || got[0].ID != d.ID() {
		t.Errorf("Resolve from A with max 1 = %v, want D", got)
	}
}

func TestPeersAndPeerList(t *testing.T) {
	nodes := startCluster(t, 3, nil)
	hub := nodes[0]
	eventually(t, "hub knows both mirror ports", func() bool { return len(hub.Peers()) == 2 })
	for _, p := range hub.Peers() {
		var want string
		for _, n := range nodes[1:] {
			if n.ID() == p.ID {
				want = mirrorURLOf(n)
			}
		}
		if p.MirrorURL != want {
			t.Errorf("peer %s mirror URL %q, want %q", p.ID, p.MirrorURL, want)
		}
	}

	pl := hub.PeerList()
	if pl.Version != PeerListVersion || len(pl.Peers) != 3 {
		t.Fatalf("peer list = %+v, want version 1 and 3 peers", pl)
	}
	self := pl.Peers[0]
	if self.ID != hub.ID() || self.MirrorPort != hub.conf().MirrorPort || len(self.Addrs) == 0 {
		t.Errorf("first entry = %+v, want the hub with its port and addresses", self)
	}
	for _, p := range pl.Peers[1:] {
		if p.MirrorPort == 0 || len(p.Addrs) == 0 {
			t.Errorf("entry %+v lacks port or addresses", p)
		}
	}
}

func TestWithdrawExpires(t *testing.T) {
	nodes := startCluster(t, 3, func(c *Config) {
		c.RecordTTL = 2 * time.Second
		c.ReprovideInterval = 500 * time.Millisecond
	})
	a, b := nodes[1], nodes[2]
	a.Advertise(testKey)
	waitResolves(t, b, testKey, a)

	a.Withdraw(testKey)
	if got := a.Advertised(); len(got) != 0 {
		t.Fatalf("Advertised() after Withdraw = %v", got)
	}
	withdrawn := time.Now()
	eventually(t, "withdrawn key to vanish", func() bool {
		return len(resolveAll(t, b, testKey, 0)) == 0
	})
	// it stays gone
	time.Sleep(time.Second)
	if got := resolveAll(t, b, testKey, 0); len(got) != 0 {
		t.Errorf("withdrawn key resolves again: %v", got)
	}
	t.Logf("withdrawn key vanished after %s", time.Since(withdrawn).Round(100*time.Millisecond))
}

func TestReprovideKeepsRecords(t *testing.T) {
	nodes := startCluster(t, 3, func(c *Config) {
		c.RecordTTL = 3 * time.Second
		c.ReprovideInterval = time.Second
	})
	a, b := nodes[1], nodes[2]
	a.Advertise(testKey)
	waitResolves(t, b, testKey, a)

	// twice the record lifetime: only reproviding keeps the key findable
	time.Sleep(6 * time.Second)
	got := resolveAll(t, b, testKey, 0)
	if len(got) != 1 || got[0].ID != a.ID() {
		t.Errorf("after 6s with TTL 3s, resolve = %v, want A", got)
	}
}

func TestHTTPBootstrap(t *testing.T) {
	a := startRouter(t, "a", testConfig())
	srv := servePeerList(t, a)

	cfg := testConfig()
	cfg.BootstrapHTTP = []string{srv.URL + PeerListPath}
	b := startRouter(t, "b", cfg)
	eventually(t, "b joins through the HTTP peer list", b.Ready)

	a.Advertise(testKey)
	got := waitResolves(t, b, testKey, a)
	if got[0].MirrorURL != mirrorURLOf(a) {
		t.Errorf("mirror URL %q, want %q", got[0].MirrorURL, mirrorURLOf(a))
	}
}

func TestDNSBootstrap(t *testing.T) {
	a := startRouter(t, "a", testConfig())
	srv := servePeerList(t, a)
	_, portStr, _ := net.SplitHostPort(srv.Listener.Addr().String())
	port, _ := strconv.Atoi(portStr)

	// The name has A 127.0.0.1 (a's peer list) and AAAA ::1, where
	// nothing answers: a dead address must not stop bootstrap.
	dns := startDNSServer(t, "peers.peermirror.test", []net.IP{net.ParseIP("127.0.0.1")}, []net.IP{net.IPv6loopback})

	cfg := testConfig()
	cfg.BootstrapDNS = []string{"peers.peermirror.test"}
	cfg.BootstrapPeerPort = port
	cfg.Resolver = dns.resolver()
	b := startRouter(t, "b", cfg)
	eventually(t, "b joins through DNS", b.Ready)
	if dns.queries.Load() == 0 {
		t.Error("the test DNS server got no query")
	}

	b.Advertise(testKey)
	got := waitResolves(t, a, testKey, b)
	if got[0].MirrorURL != mirrorURLOf(b) {
		t.Errorf("mirror URL %q, want %q", got[0].MirrorURL, mirrorURLOf(b))
	}
}

func TestLateJoiner(t *testing.T) {
	// a's address is fixed in advance: a port the kernel just handed out
	// and a key made here.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	key, err := generateKey()
	if err != nil {
		t.Fatal(err)
	}
	aID, _ := peer.IDFromPrivateKey(key)

	cfgB := testConfig()
	cfgB.BootstrapStatic = []string{fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/%s", port, aID)}
	cfgB.BootstrapInterval = 2 * time.Second
	b := startRouter(t, "b", cfgB)
	b.Advertise(testKey) // queued until a peer is there

	time.Sleep(1500 * time.Millisecond)
	if b.Ready() {
		t.Fatal("b is ready with its only bootstrap peer down")
	}

	cfgA := testConfig()
	cfgA.ListenAddrs = []string{fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port)}
	cfgA.PrivateKey = key
	a := startRouter(t, "a", cfgA)
	eventually(t, "b joins a that came up later", b.Ready)

	got := waitResolves(t, a, testKey, b)
	if got[0].MirrorURL != mirrorURLOf(b) {
		t.Errorf("mirror URL %q, want %q", got[0].MirrorURL, mirrorURLOf(b))
	}
}

func TestKeyFilePersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "peermirror", "key.pem")

	cfg := testConfig()
	cfg.KeyFile = path
	r1, err := New(cfg, testLogger(t, "first"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("New created the key file (err %v); only Start may", err)
	}
	if err := r1.Start(); err != nil {
		t.Fatal(err)
	}
	id1 := r1.ID()
	if err := r1.Close(); err != nil {
		t.Fatal(err)
	}

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
	}

	r2 := startRouter(t, "second", cfg)
	if r2.ID() != id1 {
		t.Errorf("peer ID after restart %s, want %s", r2.ID(), id1)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("key folder holds %d entries, want only the key", len(entries))
	}
}

func TestKeyFileMalformed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.KeyFile = path
	if _, err := New(cfg, nil); err == nil {
		t.Fatal("New accepted a malformed key file")
	}
}

func TestQUIC(t *testing.T) {
	quicOnly := func(c *Config) { c.ListenAddrs = []string{"/ip4/127.0.0.1/udp/0/quic-v1"} }
	nodes := startCluster(t, 3, quicOnly)
	a, b := nodes[1], nodes[2]
	for _, addr := range a.Addrs() {
		if _, err := addr.ValueForProtocol(ma.P_QUIC_V1); err != nil {
			t.Errorf("address %s is not QUIC", addr)
		}
	}
	a.Advertise(testKey)
	got := waitResolves(t, b, testKey, a)
	if got[0].MirrorURL != mirrorURLOf(a) {
		t.Errorf("mirror URL %q, want %q", got[0].MirrorURL, mirrorURLOf(a))
	}
}

func TestIPv6MirrorURL(t *testing.T) {
	// a listens on both loopbacks; b reaches it over IPv6 only
	cfgA := testConfig()
	cfgA.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0"}
	a := startRouter(t, "a", cfgA)
	var v6 []string
	for _, s := range p2pAddrs(t, a) {
		if len(s) > 5 && s[:5] == "/ip6/" {
			v6 = append(v6, s)
		}
	}
	if len(v6) == 0 {
		t.Fatalf("a announces no IPv6 address: %v", a.Addrs())
	}
	cfgB := testConfig()
	cfgB.ListenAddrs = []string{"/ip6/::1/tcp/0"}
	cfgB.BootstrapStatic = v6
	b := startRouter(t, "b", cfgB)
	eventually(t, "b ready over IPv6", b.Ready)

	a.Advertise(testKey)
	got := waitResolves(t, b, testKey, a)
	want := "http://[::1]:" + strconv.Itoa(a.conf().MirrorPort)
	if got[0].MirrorURL != want {
		t.Errorf("mirror URL %q, want %q", got[0].MirrorURL, want)
	}
}

func TestAdvertiseBeforeStartAndAlone(t *testing.T) {
	r := newRouter(t, "alone", testConfig())
	r.Advertise("a", "b")
	r.Withdraw("a")
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if got := r.Advertised(); len(got) != 1 || got[0] != "b" {
		t.Errorf("Advertised() = %v, want [b]", got)
	}
	if r.Ready() {
		t.Error("a node without peers is ready")
	}
	if got := resolveAll(t, r, "b", 0); len(got) != 0 {
		t.Errorf("alone node resolved %v", got)
	}
	if err := r.Start(); err == nil {
		t.Error("second Start succeeded")
	}
}

func TestCloseWithoutStartAndAfterFailedStart(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	r, err := New(testConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("Close before Start: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := r.Start(); err == nil {
		t.Error("Start after Close succeeded")
	}
	for p := range r.Resolve(context.Background(), testKey, 0) {
		t.Errorf("closed router resolved %v", p)
	}

	// a port in use makes Start fail half way; Close must still be clean
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg := testConfig()
	cfg.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/" + strconv.Itoa(l.Addr().(*net.TCPAddr).Port)}
	r2, err := New(cfg, nil)
	if err != nil {
		t.Fatalf("New must not bind, so a busy port is no error yet: %v", err)
	}
	if err := r2.Start(); err == nil {
		t.Fatal("Start on a busy port succeeded")
	}
	if err := r2.Close(); err != nil {
		t.Errorf("Close after failed Start: %v", err)
	}
	goleak.VerifyNone(t, append(leakOptions, ignore)...)
}

func TestNoGoroutineLeakAfterClose(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	func() {
		// a sub-test owns the routers, so they are closed when it returns
		t.Run("cluster", func(t *testing.T) {
			nodes := startCluster(t, 3, func(c *Config) {
				c.RecordTTL = 2 * time.Second
				c.ReprovideInterval = 500 * time.Millisecond
			})
			nodes[1].Advertise(testKey)
			waitResolves(t, nodes[2], testKey, nodes[1])
			// a Resolve still running at Close must end too
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			_ = nodes[2].Resolve(ctx, "never-read", 0)
		})
	}()
	goleak.VerifyNone(t, append(leakOptions, ignore)...)
}

func TestNewValidates(t *testing.T) {
	key, _ := generateKey()
	keyID, _ := peer.IDFromPrivateKey(key)
	ok := testConfig()
	cases := map[string]func(*Config){
		"no mirror port":        func(c *Config) { c.MirrorPort = 0 },
		"mirror port too big":   func(c *Config) { c.MirrorPort = 70000 },
		"bad listen":            func(c *Config) { c.ListenAddrs = []string{"tcp://0.0.0.0:1"} },
		"listen without ip":     func(c *Config) { c.ListenAddrs = []string{"/dns4/example.test/tcp/1"} },
		"bad announce":          func(c *Config) { c.AnnounceAddrs = []string{"not-an-ip"} },
		"announce with p2p":     func(c *Config) { c.AnnounceAddrs = []string{"/ip4/10.0.0.1/tcp/1/p2p/" + keyID.String()} },
		"static without p2p":    func(c *Config) { c.BootstrapStatic = []string{"/ip4/127.0.0.1/tcp/1"} },
		"dns with port":         func(c *Config) { c.BootstrapDNS = []string{"peers:30020"} },
		"http without scheme":   func(c *Config) { c.BootstrapHTTP = []string{"peers.local/x"} },
		"reprovide >= ttl":      func(c *Config) { c.RecordTTL = time.Second; c.ReprovideInterval = time.Second },
		"negative ttl":          func(c *Config) { c.RecordTTL = -time.Second },
		"key and key file":      func(c *Config) { c.PrivateKey = key; c.KeyFile = "/tmp/x" },
		"bootstrap port bigger": func(c *Config) { c.BootstrapPeerPort = 65536 },
	}
	for name, tweak := range cases {
		t.Run(name, func(t *testing.T) {
			cfg := ok
			tweak(&cfg)
			if _, err := New(cfg, nil); err == nil {
				t.Errorf("New accepted %s", name)
			}
		})
	}

	r, err := New(Config{MirrorPort: 30020}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	c := r.conf()
	if c.RecordTTL != 10*time.Minute || c.ReprovideInterval != c.RecordTTL/3 ||
		c.BootstrapInterval != 30*time.Second || c.BootstrapPeerPort != 30020 ||
		len(c.listenAddrs) != 2 || c.keepLoopback || r.ID() == "" {
		t.Errorf("defaults not filled: %+v", c)
	}
}

func TestWarnsWhenAloneTooLong(t *testing.T) {
	// a bootstrap peer that is never there: a port the kernel just handed
	// out and closed, and a made-up ID
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()

	core, logs := observer.New(zap.WarnLevel)
	cfg := testConfig()
	cfg.BootstrapStatic = []string{fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/%s", port, testPeerID(t))}
	cfg.BootstrapInterval = 100 * time.Millisecond
	r, err := New(cfg, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.aloneWarnAfter = 300 * time.Millisecond
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a warning about no reachable bootstrap peer", func() bool {
		return logs.FilterMessageSnippet("no peer reachable").Len() > 0
	})
	entry := logs.FilterMessageSnippet("no peer reachable").All()[0]
	if errs, ok := entry.ContextMap()["last_errors"]; !ok || fmt.Sprint(errs) == "[]" {
		t.Errorf("warning carries no error: %v", entry.ContextMap())
	}
}

func TestProtocolIDsAreFixed(t *testing.T) {
	r := startRouter(t, "r", testConfig())
	protos := r.host.Mux().Protocols()
	for _, want := range []protocol.ID{"/peermirror/kad/1.0.0", "/peermirror/info/1.0.0"} {
		if !slices.Contains(protos, want) {
			t.Errorf("host does not speak %s: %v", want, protos)
		}
	}
	for _, p := range protos {
		if strings.HasPrefix(string(p), "/ipfs/kad/") {
			t.Errorf("host speaks the public DHT protocol %s", p)
		}
	}
}

func TestNewerPeerStillUsed(t *testing.T) {
	// a is a "version 2" node: its info document has a higher version and
	// fields this version does not know, on the same protocol ID
	a := startRouter(t, "a", testConfig())
	const port = 31999
	a.host.SetStreamHandler(InfoProtocolID, func(s network.Stream) {
		defer s.Close()
		_, _ = s.Write([]byte(`{"version":2,"mirror_port":31999,"tls_port":443,"features":["hedge"]}`))
	})
	cfg := testConfig()
	cfg.BootstrapStatic = p2pAddrs(t, a)
	b := startRouter(t, "b", cfg)
	eventually(t, "b ready", b.Ready)

	a.Advertise(testKey)
	got := waitResolves(t, b, testKey, a)
	if want := "http://127.0.0.1:" + strconv.Itoa(port); got[0].MirrorURL != want {
		t.Errorf("mirror URL of the newer peer %q, want %q", got[0].MirrorURL, want)
	}
}
