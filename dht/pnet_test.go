package dht

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// writeNetworkKey writes a new network key file in a temporary folder and
// returns its path.
func writeNetworkKey(t *testing.T) string {
	t.Helper()
	data, err := GenerateNetworkKey()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "swarm.key")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestGenerateAndReadNetworkKey(t *testing.T) {
	data, err := GenerateNetworkKey()
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	if len(lines) != 4 || lines[0] != "/key/swarm/psk/1.0.0/" || lines[1] != "/base16/" ||
		len(lines[2]) != 64 || lines[3] != "" {
		t.Fatalf("generated key file is not the three lines of the format:\n%q", data)
	}
	want, err := hex.DecodeString(lines[2])
	if err != nil {
		t.Fatalf("key is not hex: %v", err)
	}
	path := filepath.Join(t.TempDir(), "swarm.key")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	psk, err := ReadNetworkKeyFile(path)
	if err != nil {
		t.Fatalf("reading a generated key: %v", err)
	}
	if !bytes.Equal(psk, want) {
		t.Errorf("read key %x, want %x", []byte(psk), want)
	}
	again, err := GenerateNetworkKey()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(again, data) {
		t.Error("two generated keys are equal")
	}
	if fp := NetworkKeyFingerprint(psk); len(fp) != 16 || strings.Contains(lines[2], fp) {
		t.Errorf("fingerprint %q: want 16 hex digits that are not part of the key", fp)
	}
}

func TestReadNetworkKeyFileFormats(t *testing.T) {
	const hexKey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	raw, _ := hex.DecodeString(hexKey)
	good := map[string]string{
		"base16":          "/key/swarm/psk/1.0.0/\n/base16/\n" + hexKey + "\n",
		"no final eol":    "/key/swarm/psk/1.0.0/\n/base16/\n" + hexKey,
		"crlf":            "/key/swarm/psk/1.0.0/\r\n/base16/\r\n" + hexKey + "\r\n",
		"upper case hex":  "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.ToUpper(hexKey) + "\n",
		"base64 encoding": "/key/swarm/psk/1.0.0/\n/base64/\nASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4mrze8=\n",
		"bin encoding":    "/key/swarm/psk/1.0.0/\n/bin/\n" + string(raw),
	}
	for name, content := range good {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "swarm.key")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			psk, err := ReadNetworkKeyFile(path)
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !bytes.Equal(psk, raw) {
				t.Errorf("key %x, want %x", []byte(psk), raw)
			}
		})
	}

	bad := map[string]string{
		"empty":            "",
		"key only":         hexKey + "\n",
		"wrong version":    "/key/swarm/psk/2.0.0/\n/base16/\n" + hexKey + "\n",
		"unknown encoding": "/key/swarm/psk/1.0.0/\n/base32/\n" + hexKey + "\n",
		"63 digits":        "/key/swarm/psk/1.0.0/\n/base16/\n" + hexKey[:63] + "\n",
		"65 digits":        "/key/swarm/psk/1.0.0/\n/base16/\n" + hexKey + "0\n",
		"not hex":          "/key/swarm/psk/1.0.0/\n/base16/\n" + strings.Repeat("zz", 32) + "\n",
		"second key line":  "/key/swarm/psk/1.0.0/\n/base16/\n" + hexKey + "\n" + hexKey + "\n",
		"headers only":     "/key/swarm/psk/1.0.0/\n/base16/\n",
	}
	for name, content := range bad {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "swarm.key")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := ReadNetworkKeyFile(path)
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "/key/swarm/psk/1.0.0/") {
				t.Errorf("error %q names neither the file nor the format", err)
			}
		})
	}

	missing := filepath.Join(t.TempDir(), "none.key")
	_, err := ReadNetworkKeyFile(missing)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: error %v, want one that is fs.ErrNotExist and names the path", err)
	}
}

func TestNewValidatesNetworkKeyAndLimits(t *testing.T) {
	key := writeNetworkKey(t)
	static := "/ip4/127.0.0.1/udp/1/quic-v1/p2p/" + testPeerID(t).String()
	cases := map[string]struct {
		tweak   func(*Config)
		wantErr string
	}{
		"missing key file": {func(c *Config) { c.NetworkKeyFile = filepath.Join(t.TempDir(), "none") }, "no such file"},
		"quic listen": {func(c *Config) {
			c.NetworkKeyFile = key
			c.ListenAddrs = append(c.ListenAddrs, "/ip4/127.0.0.1/udp/0/quic-v1")
		}, "listen address /ip4/127.0.0.1/udp/0/quic-v1 is not TCP"},
		"quic announce":     {func(c *Config) { c.NetworkKeyFile = key; c.AnnounceAddrs = []string{"/ip4/10.0.0.1/udp/5001/quic-v1"} }, "announce address"},
		"quic static":       {func(c *Config) { c.NetworkKeyFile = key; c.BootstrapStatic = []string{static} }, "static bootstrap address"},
		"websocket listen":  {func(c *Config) { c.NetworkKeyFile = key; c.ListenAddrs = []string{"/ip4/127.0.0.1/tcp/0/ws"} }, "is not TCP"},
		"low equals high":   {func(c *Config) { c.ConnLow = 5; c.ConnHigh = 5 }, "1 <= low < high"},
		"low above default": {func(c *Config) { c.ConnLow = 500 }, "1 <= low < high"},
		"high 1":            {func(c *Config) { c.ConnHigh = 1 }, "1 <= low < high"},
		"negative low":      {func(c *Config) { c.ConnLow = -1 }, "1 <= low < high"},
		"negative inbound":  {func(c *Config) { c.MaxInboundConns = -1 }, "must not be negative"},
		"negative streams":  {func(c *Config) { c.MaxInboundStreams = -1 }, "must not be negative"},
		"quic without key":  {func(c *Config) { c.ListenAddrs = []string{"/ip4/127.0.0.1/udp/0/quic-v1"} }, ""},
		"plain announce ip": {func(c *Config) { c.NetworkKeyFile = key; c.AnnounceAddrs = []string{"10.0.0.1"} }, ""},
		"tcp static with key": {func(c *Config) {
			c.NetworkKeyFile = key
			c.BootstrapStatic = []string{strings.Replace(static, "udp/1/quic-v1", "tcp/1", 1)}
		}, ""},
		"dns announce with key": {func(c *Config) { c.NetworkKeyFile = key; c.AnnounceAddrs = []string{"/dns4/node.test/tcp/5001"} }, ""},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig()
			tc.tweak(&cfg)
			r, err := New(cfg, nil)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				_ = r.Close()
				return
			}
			if err == nil {
				_ = r.Close()
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q, want one containing %q", err, tc.wantErr)
			}
		})
	}

	// defaults
	r, err := New(testConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	c := r.conf()
	if c.ConnHigh != DefaultConnHigh || c.ConnLow != DefaultConnHigh/2 ||
		c.MaxInboundConns != DefaultMaxInboundConns || c.MaxInboundStreams != DefaultMaxInboundStreams {
		t.Errorf("limit defaults not filled: low %d high %d inbound %d streams %d",
			c.ConnLow, c.ConnHigh, c.MaxInboundConns, c.MaxInboundStreams)
	}
}

func TestReconfigureNeedsRestartForKeyAndLimits(t *testing.T) {
	key := writeNetworkKey(t)
	base := testConfig()
	base.NetworkKeyFile = key
	r, err := New(base, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for name, tweak := range map[string]func(*Config){
		"no key":      func(c *Config) { c.NetworkKeyFile = "" },
		"other key":   func(c *Config) { c.NetworkKeyFile = writeNetworkKey(t) },
		"conn low":    func(c *Config) { c.ConnLow = 10 },
		"conn high":   func(c *Config) { c.ConnHigh = 1000 },
		"max inbound": func(c *Config) { c.MaxInboundConns = 10 },
		"max streams": func(c *Config) { c.MaxInboundStreams = 10 },
	} {
		cfg := base
		tweak(&cfg)
		if err := r.Reconfigure(cfg); !errors.Is(err, ErrRestartNeeded) {
			t.Errorf("%s: Reconfigure = %v, want ErrRestartNeeded", name, err)
		}
	}
	same := base
	same.BootstrapInterval = 5 * time.Second
	if err := r.Reconfigure(same); err != nil {
		t.Errorf("Reconfigure with the same key and limits: %v", err)
	}
}

// connectTo dials to from from, forgetting earlier failed dials first.
func connectTo(from, to *Router) error {
	from.clearDialBackoff(to.ID())
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	return from.host.Connect(ctx, peer.AddrInfo{ID: to.ID(), Addrs: to.Addrs()})
}

// connLog records every peer that ever connects to a router.
type connLog struct {
	mu    sync.Mutex
	peers map[peer.ID]bool
}

func recordConns(r *Router) *connLog {
	l := &connLog{peers: map[peer.ID]bool{}}
	r.host.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		l.mu.Lock()
		l.peers[c.RemotePeer()] = true
		l.mu.Unlock()
	}})
	return l
}

func (l *connLog) saw(id peer.ID) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.peers[id]
}

// startWatchedRouter starts a router whose warnings are observed, and
// which warns after 300ms alone.
func startWatchedRouter(t *testing.T, name string, cfg Config) (*Router, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zap.WarnLevel)
	tee := testLogger(t, name).WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return zapcore.NewTee(c, core)
	}))
	r, err := New(cfg, tee)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("closing %s: %v", name, err)
		}
	})
	r.aloneWarnAfter = 300 * time.Millisecond
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	return r, logs
}

func TestPrivateNetwork(t *testing.T) {
	key, otherKey := writeNetworkKey(t), writeNetworkKey(t)
	keyed := func(c *Config) { c.NetworkKeyFile = key }

	// two members find each other's records
	members := startCluster(t, 2, keyed)
	a, b := members[0], members[1]
	for _, r := range members {
		for _, addr := range r.Addrs() {
			if !isTCP(addr) {
				t.Errorf("member announces %s, not TCP", addr)
			}
		}
	}
	logA, logB := recordConns(a), recordConns(b)
	a.Advertise(testKey)
	waitResolves(t, b, testKey, a)

	// outsiders: no key, and another key; both bootstrap from the members
	// and advertise a key of their own
	const outsiderKey = "docker.io/library/outsider:1"
	outsiderCfg := func(networkKey string) Config {
		c := testConfig()
		c.NetworkKeyFile = networkKey
		c.BootstrapStatic = append(p2pAddrs(t, a), p2pAddrs(t, b)...)
		c.BootstrapInterval = 200 * time.Millisecond
		return c
	}
	noKey, noKeyLogs := startWatchedRouter(t, "no-key", outsiderCfg(""))
	wrongKey, wrongKeyLogs := startWatchedRouter(t, "wrong-key", outsiderCfg(otherKey))
	// a latecomer with the right key and the same bootstrap settings: the
	// control that shows the outsiders fail for the key alone
	latecomer := startRouter(t, "latecomer", outsiderCfg(key))
	outsiders := map[string]*Router{"no key": noKey, "wrong key": wrongKey}

	// dials both ways fail; a failed handshake may take libp2p's
	// negotiation timeout, so all four run at once
	var dials sync.WaitGroup
	for name, o := range outsiders {
		o.Advertise(outsiderKey)
		dials.Go(func() {
			if err := connectTo(o, a); err == nil {
				t.Errorf("%s: connected to a member", name)
			}
		})
		dials.Go(func() {
			if err := connectTo(a, o); err == nil {
				t.Errorf("%s: a member connected to it", name)
			}
		})
	}
	dials.Wait()
	// bootstrap rounds against both members fail until the alone warning
	for name, logs := range map[string]*observer.ObservedLogs{"no key": noKeyLogs, "wrong key": wrongKeyLogs} {
		eventually(t, name+" warns that no peer is reachable", func() bool {
			return logs.FilterMessageSnippet("no peer reachable").Len() > 0
		})
	}
	eventually(t, "the latecomer joins", latecomer.Ready)
	if got := waitResolves(t, latecomer, testKey, a); len(got) != 1 || got[0].ID != a.ID() {
		t.Errorf("latecomer resolved %v, want a", got)
	}

	for name, o := range outsiders {
		if o.Ready() || len(o.host.Network().Peers()) != 0 {
			t.Errorf("%s: joined (ready %v, peers %v)", name, o.Ready(), o.host.Network().Peers())
		}
		if got := resolveAll(t, o, testKey, 0); len(got) != 0 {
			t.Errorf("%s: resolved the members' key: %v", name, got)
		}
		for _, m := range []*Router{a, b, latecomer} {
			if slices.Contains(m.kad.RoutingTable().ListPeers(), o.ID()) {
				t.Errorf("%s is in the routing table of %s", name, m.ID())
			}
			if m.host.Network().Connectedness(o.ID()) == network.Connected {
				t.Errorf("%s is connected to %s", name, m.ID())
			}
		}
		if logA.saw(o.ID()) || logB.saw(o.ID()) {
			t.Errorf("%s had a connection to a member", name)
		}
	}
	// the members' DHT holds no record of the outsiders
	for _, m := range []*Router{a, b, latecomer} {
		if got := resolveAll(t, m, outsiderKey, 0); len(got) != 0 {
			t.Errorf("member %s resolved an outsider's key: %v", m.ID(), got)
		}
	}
}

func TestPrivateNetworkHasNoQUIC(t *testing.T) {
	// a member has no QUIC transport: a QUIC address of a peer gives it
	// nothing to dial with
	for name, networkKey := range map[string]string{"with key": writeNetworkKey(t), "without key": ""} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig()
			cfg.NetworkKeyFile = networkKey
			r := startRouter(t, "node", cfg)
			sw, ok := r.host.Network().(*swarm.Swarm)
			if !ok {
				t.Fatalf("network is a %T, not a swarm", r.host.Network())
			}
			quic := sw.TransportForDialing(ma.StringCast("/ip4/127.0.0.1/udp/5001/quic-v1")) != nil
			tcp := sw.TransportForDialing(ma.StringCast("/ip4/127.0.0.1/tcp/5001")) != nil
			if !tcp || quic == (networkKey != "") {
				t.Errorf("can dial TCP %v, QUIC %v; want TCP, and QUIC only without a key", tcp, quic)
			}
		})
	}
}
