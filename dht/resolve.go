package dht

import (
	"context"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"go.uber.org/zap"
)

const (
	// resolveConcurrency bounds the providers whose mirror port is being
	// asked for at once within one Resolve.
	resolveConcurrency = 4
	// connectTimeout bounds one dial of a peer.
	connectTimeout = 10 * time.Second
	// localFirstWait is how long Resolve gives the providers that this
	// node's own provider store holds before it asks the network for
	// more: a caller served by one of them (and in a cluster of up to 20
	// nodes every node holds every record) ends ctx before then, and the
	// lookup, a round of streams to several peers, is never sent.
	localFirstWait = 20 * time.Millisecond
)

// Resolve looks up the peers that advertise key and sends each on the
// returned channel as soon as it is found and its mirror URL is known. It
// never sends this node, nor a peer whose mirror URL cannot be learned.
// Providers from this node's own provider store come first; the network
// lookup for others starts only if ctx is still live localFirstWait later. At
// most max peers are sent (no limit if max <= 0). The channel is closed when
// the lookup ends, ctx ends or the router is closed; the caller should
// read it until then, or cancel ctx.
func (r *Router) Resolve(ctx context.Context, key string, max int) <-chan Peer {
	// providers this node stores itself (in a small cluster, all of them)
	// are on the channel before Resolve returns, so a caller's deadline
	// never expires while a busy scheduler delays the lookup goroutine
	local := r.localProviders(ctx, key, max)
	buffer := len(local)
	if buffer == 0 {
		buffer = 1
	}
	out := make(chan Peer, buffer)
	seen := make(map[peer.ID]struct{}, len(local))
	for _, p := range local {
		out <- p
		seen[p.ID] = struct{}{}
	}
	if max > 0 && len(local) >= max {
		close(out)
		return out
	}
	var cancel context.CancelFunc
	ctx, cancel = context.WithCancel(ctx)
	started := r.goTracked(func(rctx context.Context) {
		defer close(out)
		defer cancel()
		stop := context.AfterFunc(rctx, cancel)
		defer stop()
		r.resolve(ctx, cancel, key, max, out, seen)
	})
	if !started {
		cancel()
		close(out)
	}
	return out
}

// localProviders returns the providers of key that this node's own
// provider store holds and whose mirror URL is known, at most max (no
// limit if max <= 0).
func (r *Router) localProviders(ctx context.Context, key string, max int) []Peer {
	h, kad, ok := r.running()
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, localLookupTimeout)
	defer cancel()
	infos, err := kad.ProviderStore().GetProviders(ctx, KeyCID(key).Hash())
	if err != nil {
		return nil
	}
	self := h.ID()
	var out []Peer
	for _, ai := range infos {
		if ai.ID == self {
			continue
		}
		if p, ok := r.knownPeer(ai.ID, ai.Addrs); ok {
			out = append(out, p)
			if max > 0 && len(out) >= max {
				break
			}
		}
	}
	return out
}

// localLookupTimeout bounds the look into this node's own provider store.
const localLookupTimeout = time.Second

func (r *Router) resolve(
	ctx context.Context, cancel context.CancelFunc, key string, max int, out chan<- Peer,
	already map[peer.ID]struct{},
) {
	start := time.Now()
	self := r.host.ID()
	if len(already) > 0 {
		t := time.NewTimer(localFirstWait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}

	// The DHT counts this node among the providers when it advertises the
	// key itself: ask for one more.
	count := 0
	if max > 0 {
		count = max + 1
	}
	provs := r.kad.FindProvidersAsync(ctx, KeyCID(key), count)

	var (
		mu      sync.Mutex
		sent    = len(already)
		workers sync.WaitGroup
		sem     = make(chan struct{}, resolveConcurrency)
		seen    = already
	)
	// send delivers p unless enough were sent.
	send := func(p Peer) {
		mu.Lock()
		if max > 0 && sent >= max {
			mu.Unlock()
			return
		}
		sent++
		last := max > 0 && sent == max
		mu.Unlock()
		select {
		case out <- p:
		case <-ctx.Done():
			return
		}
		if last {
			cancel()
		}
	}

	for ai := range provs {
		if ai.ID == self || ai.ID == "" {
			continue
		}
		if _, ok := seen[ai.ID]; ok {
			continue
		}
		seen[ai.ID] = struct{}{}

		// known peer: send at once
		if p, ok := r.knownPeer(ai.ID, ai.Addrs); ok {
			send(p)
			continue
		}

		// unknown mirror port: dial and ask, a few at a time
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			continue // drain provs until the DHT closes it
		}
		workers.Add(1)
		go func(ai peer.AddrInfo) {
			defer workers.Done()
			defer func() { <-sem }()
			if err := r.ensureConnected(ctx, ai); err != nil {
				r.logger.Debug("dialing provider", zap.Stringer("peer", ai.ID), zap.Error(err))
				return
			}
			if _, err := r.mirrorPort(ctx, ai.ID); err != nil {
				r.logger.Debug("learning provider mirror port", zap.Stringer("peer", ai.ID), zap.Error(err))
				return
			}
			if p, ok := r.knownPeer(ai.ID, ai.Addrs); ok {
				send(p)
			}
		}(ai)
	}
	workers.Wait()

	if ce := r.logger.Check(zap.DebugLevel, "resolved key"); ce != nil {
		mu.Lock()
		n := sent
		mu.Unlock()
		ce.Write(zap.String("key", key), zap.Int("peers", n), zap.Duration("took", time.Since(start)))
	}
}
