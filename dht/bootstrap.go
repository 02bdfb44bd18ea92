package dht

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/zap"
)

const (
	// bootstrapBackoffMin is the first wait between bootstrap rounds while
	// the node has no peer; it doubles up to BootstrapInterval.
	bootstrapBackoffMin = 100 * time.Millisecond
	// bootstrapFanoutAlone and bootstrapFanoutJoined bound, per round, how
	// many DNS addresses are asked for their peer list and how many peers
	// of one list are dialed: wide while alone, narrow once joined (the
	// DHT finds the rest itself; later rounds only merge split groups).
	bootstrapFanoutAlone  = 8
	bootstrapFanoutJoined = 2
	// bootstrapDialConcurrency bounds the dials and fetches in flight.
	bootstrapDialConcurrency = 8
	// defaultAloneWarnAfter is how long a node with bootstrap sources may
	// stay without peers before an operator is told, and how often after
	// that (at least three bootstrap intervals).
	defaultAloneWarnAfter = 2 * time.Minute
)

// bootstrapLoop runs bootstrap rounds: quickly with backoff while the node
// has no peer, every BootstrapInterval after, forever.
func (r *Router) bootstrapLoop(ctx context.Context) {
	if len(r.conf().static)+len(r.conf().dnsNames)+len(r.conf().httpURLs) == 0 {
		return
	}
	backoff := min(bootstrapBackoffMin, r.conf().BootstrapInterval)
	aloneSince := time.Now()
	lastWarn := time.Time{}
	joined := false
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}

		alone := !r.hasPeers()
		connected, errs := r.bootstrapRound(ctx, alone)
		if ctx.Err() != nil {
			return
		}

		// report and pick the next wait
		switch {
		case r.hasPeers() || connected > 0:
			if !joined {
				r.logger.Info("bootstrap connected",
					zap.Int("new_connections", connected),
					zap.Duration("after", time.Since(aloneSince).Round(time.Millisecond)))
			}
			joined = true
			if r.hasPeers() {
				backoff = min(bootstrapBackoffMin, r.conf().BootstrapInterval)
				timer.Reset(r.conf().BootstrapInterval)
			} else {
				// connected, but the routing table is still empty
				// (identify in progress): look again soon
				timer.Reset(backoff)
			}
		default:
			if joined {
				r.logger.Info("lost all peers; bootstrapping again")
				joined = false
				aloneSince = time.Now()
			}
			if time.Since(aloneSince) >= r.aloneWarnAfter && time.Since(lastWarn) >= r.aloneWarnAfter {
				lastWarn = time.Now()
				r.logger.Warn("no peer reachable through the bootstrap sources; "+
					"this node serves only its own content",
					zap.Duration("alone_for", time.Since(aloneSince).Round(time.Second)),
					zap.Strings("static", r.conf().BootstrapStatic),
					zap.Strings("dns", r.conf().dnsNames),
					zap.Strings("http", r.conf().httpURLs),
					zap.Errors("last_errors", errs))
			}
			timer.Reset(backoff)
			backoff = min(2*backoff, r.conf().BootstrapInterval)
		}
	}
}

// hasPeers reports whether the routing table holds a peer.
func (r *Router) hasPeers() bool {
	return r.kad.RoutingTable().Size() > 0
}

// bootstrapRound gathers candidate peers from every source and dials the
// ones not connected. It returns how many it connected to, and what went
// wrong, for the operator warning.
func (r *Router) bootstrapRound(ctx context.Context, alone bool) (int, []error) {
	fanout := bootstrapFanoutJoined
	if alone {
		fanout = bootstrapFanoutAlone
	}

	// candidates
	var (
		mu    sync.Mutex
		cands = make(map[peer.ID]*peer.AddrInfo)
		order []peer.ID
		errs  []error
	)
	add := func(ai peer.AddrInfo) {
		if ai.ID == r.host.ID() || ai.ID == "" {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if c, ok := cands[ai.ID]; ok {
			c.Addrs = append(c.Addrs, ai.Addrs...)
			return
		}
		c := ai
		cands[ai.ID] = &c
		order = append(order, ai.ID)
	}
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	for _, ai := range r.conf().static {
		add(ai)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, bootstrapDialConcurrency)
	for _, u := range r.conf().httpURLs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			pl, err := r.fetchPeerList(ctx, u)
			if err != nil {
				fail(err)
				return
			}
			for _, p := range r.pickPeers(pl, fanout) {
				add(p.AddrInfo())
			}
		})
	}
	for _, ip := range r.dnsTargets(ctx, fanout, fail) {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			hostPort := net.JoinHostPort(ip.String(), strconv.Itoa(r.conf().BootstrapPeerPort))
			u := "http://" + hostPort + PeerListPath
			pl, err := r.fetchPeerList(ctx, u)
			if err != nil {
				fail(err)
				return
			}
			for i, p := range r.pickPeers(pl, fanout) {
				ai := p.AddrInfo()
				// The first entry is the node that answered, and it was
				// reached at ip: dial it there too.
				if i == 0 && len(pl.Peers) > 0 && pl.Peers[0].ID == p.ID {
					ai.Addrs = append(ai.Addrs, withIP(p.Addrs, ip)...)
				}
				add(ai)
			}
		})
	}
	wg.Wait()

	// dial
	dialed := 0
	var connected atomic.Int32
	for _, id := range order {
		ai := *cands[id]
		if r.host.Network().Connectedness(id) == network.Connected {
			continue
		}
		ai.Addrs = ma.Unique(ai.Addrs)
		dialed++
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			dctx, cancel := context.WithTimeout(ctx, connectTimeout)
			defer cancel()
			r.clearDialBackoff(ai.ID)
			if err := r.host.Connect(dctx, ai); err != nil {
				fail(fmt.Errorf("connecting to bootstrap peer %s: %w", ai.ID, err))
				r.logger.Debug("connecting to bootstrap peer", zap.Stringer("peer", ai.ID), zap.Error(err))
				return
			}
			connected.Add(1)
			r.logger.Debug("connected to bootstrap peer", zap.Stringer("peer", ai.ID))
		})
	}
	wg.Wait()
	if dialed > 0 {
		r.logger.Debug("bootstrap round", zap.Int("candidates", len(order)), zap.Int("dialed", dialed),
			zap.Int32("connected", connected.Load()), zap.Int("errors", len(errs)))
	}
	return int(connected.Load()), errs
}

// clearDialBackoff forgets failed dials to id. libp2p refuses to redial an
// address for 5s or more after a failure; bootstrap has its own pacing, and
// a node that comes up a second after the last try must be found at the
// next one.
func (r *Router) clearDialBackoff(id peer.ID) {
	if sw, ok := r.host.Network().(interface{ Backoff() *swarm.DialBackoff }); ok {
		sw.Backoff().Clear(id)
	}
}

// pickPeers returns up to n peers of pl other than this node, the first
// entry (the node that answered) first, the others chosen at random.
func (r *Router) pickPeers(pl PeerList, n int) []PeerInfo {
	var out []PeerInfo
	self := r.host.ID()
	rest := make([]PeerInfo, 0, len(pl.Peers))
	for i, p := range pl.Peers {
		if p.ID == self {
			continue
		}
		if i == 0 {
			out = append(out, p)
			continue
		}
		rest = append(rest, p)
	}
	rand.Shuffle(len(rest), func(i, j int) { rest[i], rest[j] = rest[j], rest[i] })
	out = append(out, rest...)
	if len(out) > n {
		out = out[:n]
	}
	return out
}

// dnsTargets resolves the DNS bootstrap names and returns up to n of their
// addresses, chosen at random, without this node's own.
func (r *Router) dnsTargets(ctx context.Context, n int, fail func(error)) []netip.Addr {
	if len(r.conf().dnsNames) == 0 {
		return nil
	}
	own := make(map[netip.Addr]bool)
	if r.conf().BootstrapPeerPort == r.conf().MirrorPort {
		for _, a := range r.host.Addrs() {
			if ip, ok := ipOf(a); ok {
				own[ip] = true
			}
		}
	}
	seen := make(map[netip.Addr]bool)
	var ips []netip.Addr
	for _, name := range r.conf().dnsNames {
		lctx, cancel := context.WithTimeout(ctx, defaultHTTPTimeout)
		addrs, err := r.conf().Resolver.LookupNetIP(lctx, "ip", name)
		cancel()
		if err != nil {
			fail(fmt.Errorf("resolving bootstrap name %s: %w", name, err))
			r.logger.Debug("resolving bootstrap name", zap.String("name", name), zap.Error(err))
			continue
		}
		for _, ip := range addrs {
			ip = ip.Unmap().WithZone("")
			if seen[ip] || own[ip] {
				continue
			}
			seen[ip] = true
			ips = append(ips, ip)
		}
	}
	rand.Shuffle(len(ips), func(i, j int) { ips[i], ips[j] = ips[j], ips[i] })
	if len(ips) > n {
		ips = ips[:n]
	}
	return ips
}

// fetchPeerList GETs a PeerList from u.
func (r *Router) fetchPeerList(ctx context.Context, u string) (PeerList, error) {
	resp, err := r.httpGet(ctx, u)
	if err != nil {
		return PeerList{}, fmt.Errorf("fetching peer list: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return PeerList{}, fmt.Errorf("fetching peer list from %s: status %s", u, resp.Status)
	}
	pl, err := DecodePeerList(resp.Body)
	if err != nil {
		return PeerList{}, fmt.Errorf("fetching peer list from %s: %w", u, err)
	}
	r.logger.Debug("fetched peer list", zap.String("url", u), zap.Int("peers", len(pl.Peers)))
	return pl, nil
}
