package dht

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	ma "github.com/multiformats/go-multiaddr"
)

// unprotectedKey returns a key whose peer is not protected from trimming
// by kad-dht in hub's routing table. kad-dht protects the peers of the
// buckets with a common prefix length of 0 and 1 (go-libp2p-kad-dht's
// protectedBuckets), computed on the SHA-256 of the peer IDs: the key
// returned shares its first two bits with the hub.
func unprotectedKey(t *testing.T, hub peer.ID) crypto.PrivKey {
	t.Helper()
	hubHash := sha256.Sum256([]byte(hub))
	for range 1000 {
		key, err := generateKey()
		if err != nil {
			t.Fatal(err)
		}
		id, err := peer.IDFromPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.Sum256([]byte(id))
		if (h[0]^hubHash[0])&0xc0 == 0 {
			return key
		}
	}
	t.Fatal("no key with a common prefix of 2 bits in 1000 tries")
	return nil
}

// startTunedRouter starts a router whose connection manager trims every
// 100ms and spares no connection for its age.
func startTunedRouter(t *testing.T, name string, cfg Config) *Router {
	t.Helper()
	r := newRouter(t, name, cfg)
	r.connGrace, r.connSilence = 0, 100*time.Millisecond
	if err := r.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	return r
}

func TestConnManagerTrims(t *testing.T) {
	cfg := testConfig()
	cfg.ConnLow, cfg.ConnHigh = 1, 2
	hub := startTunedRouter(t, "hub", cfg)
	// the control: the same but for the default watermarks
	control := startTunedRouter(t, "control", testConfig())

	var peers []*Router
	for i := range 4 {
		pc := testConfig()
		pc.PrivateKey = unprotectedKey(t, hub.ID())
		p := startRouter(t, fmt.Sprintf("peer%d", i), pc)
		peers = append(peers, p)
		for _, to := range []*Router{hub, control} {
			if err := connectTo(p, to); err != nil {
				t.Fatalf("peer%d connecting: %v", i, err)
			}
		}
	}
	start := time.Now()
	eventually(t, "the hub to trim to its watermarks", func() bool {
		dropped := 0
		for _, p := range peers {
			if p.host.Network().Connectedness(hub.ID()) != network.Connected {
				dropped++
			}
		}
		return len(hub.host.Network().Peers()) <= cfg.ConnHigh && dropped >= len(peers)-cfg.ConnHigh
	})
	t.Logf("trimmed %s after the 4th peer connected; the hub keeps %d peers", time.Since(start).Round(time.Millisecond),
		len(hub.host.Network().Peers()))

	// the control, whose connection manager runs as often, keeps every
	// peer for twenty of its trimming periods
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		kept := 0
		for _, p := range peers {
			if control.host.Network().Connectedness(p.ID()) == network.Connected {
				kept++
			}
		}
		if kept != len(peers) {
			t.Fatalf("the control with default watermarks keeps %d of the %d peers", kept, len(peers))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestMaxInboundConns(t *testing.T) {
	cfg := testConfig()
	cfg.MaxInboundConns = 2
	hub := startRouter(t, "hub", cfg)

	var peers []*Router
	var refused []int
	for i := range 4 {
		p := startRouter(t, fmt.Sprintf("peer%d", i), testConfig())
		peers = append(peers, p)
		if err := connectTo(p, hub); err != nil {
			t.Logf("peer%d refused: %v", i, err)
			refused = append(refused, i)
		}
	}
	if len(refused) != 2 || refused[0] != 2 || refused[1] != 3 {
		t.Fatalf("refused peers %v, want the two over the cap of 2: [2 3]", refused)
	}
	if n := len(hub.host.Network().Peers()); n != 2 {
		t.Errorf("hub holds %d peers, want 2", n)
	}

	// the cap is on connections open at once: once one goes, another
	// peer gets in. The peer that goes stops altogether: one that only
	// closed its connection could dial the hub again at once (its DHT's
	// first refresh does) and take the place.
	if err := peers[0].Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a refused peer to connect once a place is free", func() bool {
		return connectTo(peers[2], hub) == nil
	})
	// the hub's own dials are not capped
	if err := connectTo(hub, peers[3]); err != nil {
		t.Errorf("the hub dialing out at its inbound cap: %v", err)
	}
}

func TestMaxInboundStreams(t *testing.T) {
	const streamCap = 10
	const holdProto = protocol.ID("/peermirror-test/hold/1.0.0")
	cfg := testConfig()
	cfg.MaxInboundStreams = streamCap
	hub := startRouter(t, "hub", cfg)
	// the handler holds each stream until release
	release := make(chan struct{})
	releaseAll := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseAll)
	hub.host.SetStreamHandler(holdProto, func(s network.Stream) {
		defer s.Close()
		if _, err := s.Write([]byte("ok")); err != nil {
			return
		}
		<-release
	})

	p := startRouter(t, "peer", testConfig())
	if err := connectTo(p, hub); err != nil {
		t.Fatal(err)
	}
	// open streams that the hub holds, until well over the cap
	open := func(n int) (held []network.Stream, failed int) {
		for range n {
			ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
			s, err := p.host.NewStream(ctx, hub.ID(), holdProto)
			cancel()
			if err != nil {
				failed++
				continue
			}
			_ = s.SetReadDeadline(time.Now().Add(hangTimeout))
			buf := make([]byte, 2)
			if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ok" {
				_ = s.Reset()
				failed++
				continue
			}
			held = append(held, s)
		}
		return held, failed
	}
	held, failed := open(3 * streamCap)
	t.Logf("%d streams held, %d refused", len(held), failed)
	if len(held) == 0 || len(held) > streamCap || failed == 0 {
		t.Fatalf("%d streams held and %d refused, want at most %d held and the rest refused", len(held), failed, streamCap)
	}

	// the cap is on streams open at once
	releaseAll()
	for _, s := range held {
		_ = s.Close()
	}
	eventually(t, "a stream to be accepted once the held ones closed", func() bool {
		more, _ := open(1)
		for _, s := range more {
			_ = s.Reset()
		}
		return len(more) == 1
	})
}

func TestResourceManagerHasNoSubnetCap(t *testing.T) {
	// Many nodes of a cluster share an IPv6 /56 (or an IPv4 address):
	// each may have a connection to this node.
	cfg := testConfig()
	cfg.MaxInboundConns = 50
	pc, err := parseConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rm, err := newResourceManager(pc)
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()

	var scopes []network.ConnManagementScope
	defer func() {
		for _, s := range scopes {
			s.Done()
		}
	}()
	openAll := func(dir network.Direction, addrs []ma.Multiaddr) (opened int) {
		for _, a := range addrs {
			s, err := rm.OpenConnection(dir, true, a)
			if err != nil {
				continue
			}
			scopes = append(scopes, s)
			opened++
		}
		return opened
	}
	var v6, v4 []ma.Multiaddr
	for i := range 40 {
		ip := netip.MustParseAddr("fd00::").As16()
		ip[15] = byte(i + 1)
		v6 = append(v6, ma.StringCast(fmt.Sprintf("/ip6/%s/tcp/5001", netip.AddrFrom16(ip))))
		v4 = append(v4, ma.StringCast(fmt.Sprintf("/ip4/10.0.0.1/tcp/%d", 40000+i)))
	}
	if n := openAll(network.DirOutbound, v6); n != len(v6) {
		t.Errorf("%d of %d outbound connections into one /56 allowed", n, len(v6))
	}
	if n := openAll(network.DirInbound, v4[:20]); n != 20 {
		t.Errorf("%d of 20 inbound connections from one IPv4 address allowed", n)
	}

	// the inbound cap holds (the 20 above count)
	if n := openAll(network.DirInbound, v6); n != cfg.MaxInboundConns-20 {
		t.Errorf("%d more inbound connections allowed, want %d up to the cap", n, cfg.MaxInboundConns-20)
	}

	// for the record, what go-libp2p's default allows
	def, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(rcmgr.DefaultLimits.AutoScale()), rcmgr.WithMetricsDisabled())
	if err != nil {
		t.Fatal(err)
	}
	defer def.Close()
	allowed := 0
	for _, a := range v6 {
		if s, err := def.OpenConnection(network.DirOutbound, true, a); err == nil {
			defer s.Done()
			allowed++
		}
	}
	t.Logf("go-libp2p's default resource manager allows %d of %d connections into one /56", allowed, len(v6))
}
