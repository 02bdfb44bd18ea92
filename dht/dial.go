package dht

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
)

// ownFailureWindow is how long a failed dial of this node's own keeps a
// provider in libp2p's dial backoff. libp2p also backs off after dials
// that ended only because their caller gave up (a DHT query that had
// enough answers, a request past its resolve timeout): such a backoff says
// nothing about the peer, and a provider record just received says it is
// alive, so a provider is dialed through it unless a dial of ours failed
// within this window.
const ownFailureWindow = 5 * time.Second

// errOwnBackoff marks a dial not made because one of this node's own
// failed within ownFailureWindow.
var errOwnBackoff = errors.New("a dial of this peer failed lately")

// dialCall is one dial of a peer in flight; done is closed when err is set.
type dialCall struct {
	done chan struct{}
	err  error
}

// dialer dials providers. A dial runs to its own timeout even when the
// request that started it stops waiting, so the next request finds the
// connection made; concurrent requests for one peer share one dial.
type dialer struct {
	mu       sync.Mutex
	inFlight map[peer.ID]*dialCall
	failedAt map[peer.ID]time.Time
}

func newDialer() *dialer {
	return &dialer{inFlight: map[peer.ID]*dialCall{}, failedAt: map[peer.ID]time.Time{}}
}

// ensureConnected dials ai unless a connection exists, finding its
// addresses through the DHT when none are known. It returns when the peer
// is connected, the dial failed, or ctx ends (the dial then goes on).
func (r *Router) ensureConnected(ctx context.Context, ai peer.AddrInfo) error {
	if r.host.Network().Connectedness(ai.ID) == network.Connected {
		return nil
	}
	// a dial in flight for the peer uses these addresses too
	if len(ai.Addrs) > 0 {
		r.host.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.TempAddrTTL)
	}
	d := r.dials
	d.mu.Lock()
	call, ok := d.inFlight[ai.ID]
	if !ok {
		call = &dialCall{done: make(chan struct{})}
		started := r.goTracked(func(rctx context.Context) {
			err := r.dial(rctx, ai)
			d.mu.Lock()
			delete(d.inFlight, ai.ID)
			switch {
			case err == nil:
				delete(d.failedAt, ai.ID)
			case rctx.Err() == nil && !errors.Is(err, errOwnBackoff):
				now := time.Now()
				for id, at := range d.failedAt {
					if now.Sub(at) >= ownFailureWindow {
						delete(d.failedAt, id)
					}
				}
				d.failedAt[ai.ID] = now
			}
			d.mu.Unlock()
			call.err = err
			close(call.done)
		})
		if !started {
			d.mu.Unlock()
			return errClosed
		}
		d.inFlight[ai.ID] = call
	}
	d.mu.Unlock()
	select {
	case <-call.done:
		return call.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// dial connects to ai within connectTimeout, through libp2p's backoff
// unless a dial of this node's own failed lately.
func (r *Router) dial(ctx context.Context, ai peer.AddrInfo) error {
	ctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	if len(ai.Addrs) == 0 && len(r.host.Peerstore().Addrs(ai.ID)) == 0 {
		found, err := r.kad.FindPeer(ctx, ai.ID)
		if err != nil {
			return err
		}
		ai = found
	}
	err := r.host.Connect(ctx, ai)
	if err == nil || !errors.Is(err, swarm.ErrDialBackoff) {
		return err
	}
	r.dials.mu.Lock()
	failed, ok := r.dials.failedAt[ai.ID]
	r.dials.mu.Unlock()
	if ok && time.Since(failed) < ownFailureWindow {
		// not a dial: the window runs from the last real one
		return fmt.Errorf("%w: %w", errOwnBackoff, err)
	}
	return r.host.Connect(network.WithForceDirectDial(ctx, "provider record"), ai)
}
