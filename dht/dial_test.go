package dht

import (
	"context"
	"errors"
	"testing"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

// addBackoff puts every address of target into r's libp2p dial backoff, as
// a dial abandoned by its caller would.
func addBackoff(r *Router, target peer.ID, addrs []ma.Multiaddr) {
	sw := r.host.Network().(*swarm.Swarm)
	for _, a := range addrs {
		sw.Backoff().AddBackoff(target, a)
	}
}

// A backoff that no failed dial of this node's own explains does not keep
// a provider away: libp2p also backs off after dials that were only
// abandoned.
func TestDialThroughForeignBackoff(t *testing.T) {
	a := startRouter(t, "a", testConfig())
	b := startRouter(t, "b", testConfig())
	ai := peer.AddrInfo{ID: b.ID(), Addrs: b.host.Addrs()}
	addBackoff(a, b.ID(), ai.Addrs)

	// libp2p alone refuses
	err := a.host.Connect(context.Background(), ai)
	if !errors.Is(err, swarm.ErrDialBackoff) {
		t.Fatalf("plain connect under backoff = %v, want a dial backoff (the premise of this test)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	if err := a.ensureConnected(ctx, ai); err != nil {
		t.Fatalf("ensureConnected under a foreign backoff: %v", err)
	}
	if a.host.Network().Connectedness(b.ID()) != network.Connected {
		t.Error("not connected after ensureConnected returned nil")
	}
}

// After a dial of its own failed, a node respects the backoff and answers
// at once instead of dialing a dead peer for every request.
func TestDialRespectsOwnFailure(t *testing.T) {
	a := startRouter(t, "a", testConfig())
	b := startRouter(t, "b", testConfig())
	ai := peer.AddrInfo{ID: b.ID(), Addrs: b.host.Addrs()}
	b.Close()

	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	if err := a.ensureConnected(ctx, ai); err == nil {
		t.Fatal("dialing a closed peer succeeded")
	}
	a.dials.mu.Lock()
	_, recorded := a.dials.failedAt[b.ID()]
	a.dials.mu.Unlock()
	if !recorded {
		t.Fatal("a failed dial was not recorded")
	}
	a.dials.mu.Lock()
	first := a.dials.failedAt[b.ID()]
	a.dials.mu.Unlock()
	err := a.ensureConnected(ctx, ai)
	if !errors.Is(err, swarm.ErrDialBackoff) || !errors.Is(err, errOwnBackoff) {
		t.Errorf("second dial of a dead peer = %v, want the dial backoff", err)
	}
	// a dial not made does not move the window on
	a.dials.mu.Lock()
	again := a.dials.failedAt[b.ID()]
	a.dials.mu.Unlock()
	if !again.Equal(first) {
		t.Errorf("a refused dial moved the failure time from %v to %v", first, again)
	}
}

// A request that stops waiting does not abort the dial: the connection is
// there for the next request.
func TestDialOutlivesImpatientCaller(t *testing.T) {
	a := startRouter(t, "a", testConfig())
	b := startRouter(t, "b", testConfig())
	ai := peer.AddrInfo{ID: b.ID(), Addrs: b.host.Addrs()}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.ensureConnected(ctx, ai); !errors.Is(err, context.Canceled) {
		t.Fatalf("ensureConnected with a canceled context = %v, want context.Canceled", err)
	}
	eventually(t, "the dial completes after its caller left", func() bool {
		return a.host.Network().Connectedness(b.ID()) == network.Connected
	})
}
