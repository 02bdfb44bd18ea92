package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/dht"
)

// routers holds the libp2p nodes that outlive one config, keyed by their
// configuration: a reload keeps the node, its peers and the provider
// records it stores, unless its own settings changed.
var routers = caddy.NewUsagePool()

// pooledRouter lets a dht.Router live in a caddy.UsagePool.
type pooledRouter struct{ *dht.Router }

// Destruct closes the libp2p node once no config uses it.
func (p pooledRouter) Destruct() error { return p.Close() }

// routerConfig turns the JSON config into the dht package's.
func (c *DHTConfig) routerConfig() dht.Config {
	return dht.Config{
		ListenAddrs:       c.Listen,
		AnnounceAddrs:     c.Announce,
		KeyFile:           c.KeyFile,
		BootstrapStatic:   c.BootstrapStatic,
		BootstrapDNS:      c.BootstrapDNS,
		BootstrapHTTP:     c.BootstrapHTTP,
		MirrorPort:        c.MirrorPort,
		BootstrapPeerPort: c.BootstrapPort,
		RecordTTL:         time.Duration(c.RecordTTL),
		ReprovideInterval: time.Duration(c.ReprovideInterval),
		NetworkKeyFile:    c.NetworkKeyFile,
		ConnLow:           c.ConnLow,
		ConnHigh:          c.ConnHigh,
		MaxInboundConns:   c.MaxInboundConns,
		MaxInboundStreams: c.MaxInboundStreams,
	}
}

// poolKey identifies a libp2p node: what a running node cannot change
// (addresses, identity, record lifetime, the mirror port peers cache, the
// network key, by path and by the fingerprint read at provision, and the
// connection limits). A reload that keeps these keeps the node, its peers
// and the records it stores, and applies the rest in place.
func (c *DHTConfig) poolKey() string {
	b, _ := json.Marshal(struct {
		Listen, Announce                   []string
		KeyFile                            string
		RecordTTL                          caddy.Duration
		MirrorPort                         int
		NetworkKeyFile, NetworkKeyID       string
		ConnLow, ConnHigh                  int
		MaxInboundConns, MaxInboundStreams int
	}{c.Listen, c.Announce, c.KeyFile, c.RecordTTL, c.MirrorPort,
		c.NetworkKeyFile, c.networkKeyID,
		c.ConnLow, c.ConnHigh, c.MaxInboundConns, c.MaxInboundStreams})
	return string(b)
}

// routerResolver adapts a dht.Router to the fetcher's peerResolver.
type routerResolver struct {
	r   *dht.Router
	app *App // for the scheme of peer URLs
}

func (rr routerResolver) resolve(ctx context.Context, key string, max int) <-chan peerCandidate {
	start := time.Now()
	in := rr.r.Resolve(ctx, key, max)
	out := make(chan peerCandidate)
	go func() {
		defer close(out)
		first := true
		defer func() {
			if first {
				observeLookup(time.Since(start), false)
			}
		}()
		for p := range in {
			if first {
				first = false
				observeLookup(time.Since(start), true)
			}
			select {
			case out <- peerCandidate{id: p.ID.String(), url: rr.app.peerURL(p.MirrorURL)}:
			case <-ctx.Done():
				// the router ends its lookup with ctx; drain what it sends
				for range in {
				}
				return
			}
		}
	}()
	return out
}

// startP2P joins the DHT (or shares the node of the config being
// replaced), and starts keeping it in step with containerd.
func (a *App) startP2P() error {
	val, loaded, err := routers.LoadOrNew(a.DHT.poolKey(), func() (caddy.Destructor, error) {
		r, err := dht.New(a.DHT.routerConfig(), a.logger.Named("dht"))
		if err != nil {
			return nil, err
		}
		if err := r.Start(); err != nil {
			_ = r.Close()
			return nil, err
		}
		return pooledRouter{r}, nil
	})
	if err != nil {
		return fmt.Errorf("starting libp2p node: %w", err)
	}
	r := val.(pooledRouter).Router
	if loaded {
		// the node of the config being replaced: apply this config's
		// bootstrap sources and intervals to it
		if err := r.Reconfigure(a.DHT.routerConfig()); err != nil {
			a.logger.Warn("keeping the libp2p node's earlier settings", zap.Error(err))
		}
	}
	a.router.Store(r)
	f := newPeerFetcher(routerResolver{r: r, app: a}, time.Duration(a.ResolveTimeout), time.Duration(a.HedgeDelay),
		time.Duration(a.PeerTimeout), a.MaxPeers, a.logger.Named("peers"))
	f.auth = a.peerAuth
	if a.peerTLS != nil {
		f.useTLS(a.peerTLS)
	}
	a.fetcher.Store(f)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	a.stopAdvertiser = func() { cancel(); <-done }
	adv := newAdvertiser(a.Store(), r, a.advertisable, time.Duration(a.DHT.ReprovideInterval),
		a.logger.Named("advertiser"))
	a.advertiser.Store(adv)
	go func() {
		defer close(done)
		adv.run(ctx)
	}()
	a.logger.Info("peer to peer started", zap.String("peer_id", r.ID().String()),
		zap.Stringers("addrs", r.Addrs()), zap.Int("mirror_port", a.DHT.MirrorPort),
		zap.Bool("shared_with_previous_config", loaded))
	return nil
}

// stopP2P stops the advertiser and releases this config's hold on the
// libp2p node.
func (a *App) stopP2P() error {
	if a.stopAdvertiser != nil {
		a.stopAdvertiser()
		a.stopAdvertiser = nil
	}
	if f := a.fetcher.Swap(nil); f != nil {
		f.close()
	}
	if a.router.Swap(nil) == nil {
		return nil
	}
	if _, err := routers.Delete(a.DHT.poolKey()); err != nil {
		return fmt.Errorf("closing libp2p node: %w", err)
	}
	return nil
}

// servePeerList answers GET /.well-known/peermirror/v1/peers: this node
// first, then the peers it knows. DNS bootstrap reads it to learn a node's
// peer ID from its address.
func (h *Handler) servePeerList(w http.ResponseWriter, r *http.Request) {
	router := h.app.router.Load()
	if router == nil && h.app.DHT != nil {
		// Caddy serves HTTP a moment before it starts the app
		w.Header().Set("Retry-After", "1")
		writeError(w, r, http.StatusServiceUnavailable, codeUnsupported, "peer to peer is starting")
		return
	}
	if router == nil {
		writeError(w, r, http.StatusNotFound, codeUnsupported, "peer to peer is off on this node")
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, r, http.StatusMethodNotAllowed, codeUnsupported, "only GET and HEAD are allowed")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return
	}
	if err := dht.EncodePeerList(w, router.PeerList()); err != nil {
		h.logger.Debug("writing peer list", zap.Error(err))
	}
}
