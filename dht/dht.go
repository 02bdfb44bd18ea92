// Package dht finds peers that hold a key: each node runs a libp2p host and
// a private Kademlia DHT in which it advertises the keys (digests and image
// references) its containerd holds, and asks which peers hold a key it
// lacks. It knows libp2p and nothing of containerd or of serving HTTP.
//
// The DHT runs under the protocol ID "/peermirror/kad/1.0.0", which never
// changes: what changes between versions travels inside it (the key
// derivation, see KeyVersion) or beside it (the info protocol, see
// InfoProtocolID, and the bootstrap peer list, see PeerList). The router
// never joins the public IPFS network: it has no default bootstrap peers,
// no relays, no hole punching, no NAT port mapping and no mDNS.
package dht

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p"
	kaddht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/pnet"
	"github.com/libp2p/go-libp2p/core/protocol"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/zap"
)

// ProtocolPrefix is the prefix of the DHT's protocol ID
// ("/peermirror/kad/1.0.0"). It must never change: nodes with different
// prefixes do not see each other.
const ProtocolPrefix protocol.ID = "/peermirror"

// userAgent is sent to peers in libp2p identify.
const userAgent = "peermirror"

var errClosed = errors.New("router closed")

// Peer is a node that holds a key, or one this node is connected to.
type Peer struct {
	// ID is the peer's libp2p peer ID.
	ID peer.ID
	// MirrorURL is the base URL of the peer's HTTP mirror: the peer's IP
	// and its own mirror port, as "http://10.0.0.3:30020" or
	// "http://[fd00::3]:30020".
	MirrorURL string
}

// conf returns the configuration in force.
func (r *Router) conf() *parsedConfig { return r.cfg.Load() }

// ErrRestartNeeded is returned by Reconfigure for a change that only a new
// Router can apply.
var ErrRestartNeeded = errors.New("the change needs a new libp2p node")

// Reconfigure applies cfg to a running or new Router without dropping its
// host, its peers or the provider records it stores: bootstrap sources and
// intervals and the reprovide interval. A change of the listen or announce
// addresses, the key, the network key file, the connection limits, the
// record lifetime or the mirror port (which peers cache per connection)
// returns ErrRestartNeeded and changes nothing. The network key file is
// compared by path: a new key in the same file needs a new Router.
func (r *Router) Reconfigure(cfg Config) error {
	pc, err := parseConfig(cfg)
	if err != nil {
		return err
	}
	old := r.conf()
	if !slices.Equal(old.ListenAddrs, pc.ListenAddrs) || !slices.Equal(old.AnnounceAddrs, pc.AnnounceAddrs) ||
		old.KeyFile != pc.KeyFile || old.PrivateKey != pc.PrivateKey || old.RecordTTL != pc.RecordTTL ||
		old.MirrorPort != pc.MirrorPort || old.NetworkKeyFile != pc.NetworkKeyFile ||
		old.ConnLow != pc.ConnLow || old.ConnHigh != pc.ConnHigh ||
		old.MaxInboundConns != pc.MaxInboundConns || old.MaxInboundStreams != pc.MaxInboundStreams {
		return ErrRestartNeeded
	}
	r.cfg.Store(pc)
	r.logger.Info("applied new DHT settings",
		zap.Int("mirror_port", pc.MirrorPort),
		zap.Strings("bootstrap_static", pc.BootstrapStatic),
		zap.Strings("bootstrap_dns", pc.BootstrapDNS),
		zap.Strings("bootstrap_http", pc.BootstrapHTTP),
		zap.Duration("reprovide_interval", pc.ReprovideInterval))
	return nil
}

// Router is one node's libp2p host and DHT. New makes it, Start runs it,
// Close stops it. All methods are safe for concurrent use.
type Router struct {
	// cfg is replaced whole by Reconfigure; read it through conf
	cfg    atomic.Pointer[parsedConfig]
	logger *zap.Logger
	keyMu  sync.Mutex // guards key, which Start may replace
	key    crypto.PrivKey
	// keyGenerated is set when New made the key (no key given, or KeyFile
	// missing): Start then writes it to KeyFile, if one is configured.
	keyGenerated bool
	// psk is the network key read from NetworkKeyFile, nil without one.
	psk pnet.PSK

	ifaces *interfaceCache
	infos  *infoCache
	adv    *advertiser
	dials  *dialer
	// aloneWarnAfter: see defaultAloneWarnAfter; tests shorten it.
	aloneWarnAfter time.Duration
	// connGrace and connSilence: see defaultConnGrace and
	// defaultConnSilence; tests shorten them.
	connGrace, connSilence time.Duration

	// mu serializes Start and Close. Goroutines of the router never take
	// it: Close holds it while it waits for them.
	mu sync.Mutex
	// state is read without mu. host, kad and idSub are set before state
	// becomes stateRunning and not changed after.
	state  atomic.Int32
	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	host   host.Host
	kad    *kaddht.IpfsDHT
	idSub  event.Subscription

	// spawnMu guards spawning goroutines against Close waiting for them.
	spawnMu     sync.Mutex
	spawnClosed bool
	wg          sync.WaitGroup
}

const (
	stateNew int32 = iota
	stateStarting
	stateRunning
	stateClosed
)

// New checks cfg, fills in its defaults and prepares a router. It binds no
// port and dials nothing: Caddy's `caddy validate` runs this path. It reads
// KeyFile if it exists (a missing one is created by Start) and
// NetworkKeyFile, which must exist.
func New(cfg Config, logger *zap.Logger) (*Router, error) {
	if logger == nil {
		logger = zap.NewNop()
	}
	pc, err := parseConfig(cfg)
	if err != nil {
		return nil, err
	}
	r := &Router{
		logger: logger,
		ifaces: &interfaceCache{},
		infos:  newInfoCache(),
		adv:    newAdvertiser(),
		dials:  newDialer(),

		aloneWarnAfter: max(defaultAloneWarnAfter, 3*pc.BootstrapInterval),
		connGrace:      defaultConnGrace,
		connSilence:    defaultConnSilence,
	}
	r.cfg.Store(pc)
	r.ctx, r.cancel = context.WithCancel(context.Background())

	// identity
	switch {
	case pc.PrivateKey != nil:
		r.key = pc.PrivateKey
	case pc.KeyFile != "":
		key, err := readKeyFile(pc.KeyFile)
		switch {
		case err == nil:
			r.key = key
		case errors.Is(err, os.ErrNotExist):
			r.keyGenerated = true
		default:
			return nil, err
		}
	default:
		r.keyGenerated = true
	}
	if r.keyGenerated {
		if r.key, err = generateKey(); err != nil {
			return nil, err
		}
	}

	// private network
	if pc.NetworkKeyFile != "" {
		if r.psk, err = ReadNetworkKeyFile(pc.NetworkKeyFile); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// Start builds the libp2p host, binds the listen addresses, starts the DHT
// in server mode and the bootstrap and reprovide loops. It returns once the
// host listens; joining peers happens in the background. A router starts
// once: after Close, or after Start failed, make a new one.
func (r *Router) Start() (err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state.Load() != stateNew {
		return errors.New("starting router: already started or closed")
	}
	r.state.Store(stateStarting)
	defer func() {
		if err != nil {
			r.stopLocked()
		}
	}()

	// identity
	if r.keyGenerated && r.conf().KeyFile != "" {
		key, err := writeKeyFileOnce(r.conf().KeyFile, r.key)
		if err != nil {
			return fmt.Errorf("starting router: %w", err)
		}
		r.keyMu.Lock()
		r.key = key
		r.keyMu.Unlock()
		r.logger.Info("created key file", zap.String("path", r.conf().KeyFile))
	}
	if r.conf().KeyFile != "" {
		if fi, err := os.Stat(r.conf().KeyFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
			r.logger.Warn("key file is readable by others; the peer identity can be copied",
				zap.String("path", r.conf().KeyFile), zap.Stringer("mode", fi.Mode().Perm()))
		}
	}

	if r.psk != nil {
		if fi, err := os.Stat(r.conf().NetworkKeyFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
			r.logger.Warn("network key file is readable by others; whoever reads it can join the DHT",
				zap.String("path", r.conf().NetworkKeyFile), zap.Stringer("mode", fi.Mode().Perm()))
		}
	}

	// connection limits; the host owns the managers once it is built
	cm, err := newConnManager(r.conf(), r.connGrace, r.connSilence)
	if err != nil {
		return err
	}
	rm, err := newResourceManager(r.conf())
	if err != nil {
		_ = cm.Close()
		return err
	}

	// libp2p host, not listening yet: libp2p.New leaves its swarm,
	// peerstore and managers running when a listen address fails, while a
	// built host can always be closed.
	opts := []libp2p.Option{
		libp2p.Identity(r.key),
		libp2p.NoListenAddrs,
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.ConnectionManager(cm),
		libp2p.ResourceManager(rm),
		libp2p.AddrsFactory(r.announce),
		libp2p.UserAgent(userAgent),
		// A private network: no relays (neither using nor serving), no
		// reachability probing, no NAT traversal, no addresses learned
		// from what peers observe (announcing is explicit, see announce).
		libp2p.DisableRelay(),
		libp2p.ForceReachabilityPublic(),
		libp2p.DisableIdentifyAddressDiscovery(),
		// Black hole detection guards against networks without UDP or
		// IPv6 on the internet; inside a cluster it would only refuse
		// dials after a few failures.
		libp2p.UDPBlackHoleSuccessCounter(nil),
		libp2p.IPv6BlackHoleSuccessCounter(nil),
		// libp2p would register its metrics in Prometheus' global
		// registry; Caddy keeps one registry per config.
		libp2p.DisableMetrics(),
	}
	if r.psk != nil {
		// libp2p refuses a pre-shared key with QUIC: TCP only
		// (parseConfig refused addresses of other transports)
		opts = append(opts, libp2p.PrivateNetwork(r.psk))
	} else {
		opts = append(opts, libp2p.Transport(quic.NewTransport))
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		// closing twice is safe: libp2p.New closes them on some errors
		_ = cm.Close()
		_ = rm.Close()
		return fmt.Errorf("starting libp2p host: %w", err)
	}
	r.host = h
	h.SetStreamHandler(InfoProtocolID, r.handleInfoStream)

	r.idSub, err = h.EventBus().Subscribe(new(event.EvtPeerIdentificationCompleted))
	if err != nil {
		return fmt.Errorf("subscribing to identify events: %w", err)
	}

	// DHT
	r.kad, err = kaddht.New(h,
		kaddht.Mode(kaddht.ModeServer),
		kaddht.ProtocolPrefix(ProtocolPrefix),
		kaddht.DisableValues(),
		// kad-dht keeps provider records 48h by default (the Amino value):
		// the record lifetime here is RecordTTL, enforced by each node on
		// the records it stores.
		kaddht.ProviderManagerOpts(
			records.ProvideValidity(r.conf().RecordTTL),
			records.ProviderAddrTTL(r.conf().RecordTTL),
			records.CleanupInterval(r.conf().RecordTTL),
		),
	)
	if err != nil {
		return fmt.Errorf("starting dht: %w", err)
	}

	// listen, now that every protocol is in place
	if err := h.Network().Listen(r.conf().listenAddrs...); err != nil {
		return fmt.Errorf("starting libp2p host: %w", err)
	}

	// background work
	r.state.Store(stateRunning)
	r.goTracked(r.identifyLoop)
	r.goTracked(r.bootstrapLoop)
	r.goTracked(r.provideLoop)

	addrs := h.Addrs()
	r.logger.Info("dht started",
		zap.Stringer("peer_id", h.ID()),
		zap.Stringers("addrs", addrs),
		zap.Stringers("listen", h.Network().ListenAddresses()),
		zap.Int("mirror_port", r.conf().MirrorPort),
		zap.Duration("record_ttl", r.conf().RecordTTL),
		zap.Duration("reprovide_interval", r.conf().ReprovideInterval),
		zap.Int("conn_low", r.conf().ConnLow),
		zap.Int("conn_high", r.conf().ConnHigh),
		zap.Int("max_inbound_conns", r.conf().MaxInboundConns),
		zap.Int("max_inbound_streams", r.conf().MaxInboundStreams))
	if r.psk != nil {
		r.logger.Info("private network: only nodes with the same network key can connect; TCP only",
			zap.String("network_key_file", r.conf().NetworkKeyFile),
			zap.String("network_key_fingerprint", NetworkKeyFingerprint(r.psk)))
	}
	if len(addrs) == 0 {
		r.logger.Warn("no address to announce: peers reach this node only over "+
			"connections it opens; set announce addresses",
			zap.Stringers("listen", h.Network().ListenAddresses()))
	}
	for _, ip := range r.conf().announceIPs {
		announced := slices.ContainsFunc(addrs, func(a ma.Multiaddr) bool {
			got, ok := ipOf(a)
			return ok && got == ip
		})
		if !announced {
			r.logger.Warn("announce address not announced: no listen address of its family",
				zap.Stringer("announce", ip))
		}
	}
	if len(r.conf().static)+len(r.conf().dnsNames)+len(r.conf().httpURLs) == 0 {
		r.logger.Info("no bootstrap source configured; waiting for peers to connect")
	}
	return nil
}

// Close stops the router and waits for its goroutines. It is safe to call
// before Start, after a failed Start and more than once.
func (r *Router) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state.Load() == stateClosed {
		return nil
	}
	wasRunning := r.state.Load() == stateRunning
	err := r.stopLocked()
	if wasRunning {
		r.logger.Info("dht stopped", zap.Stringer("peer_id", r.host.ID()))
	}
	return err
}

// stopLocked tears down whatever Start built. r.mu must be held.
func (r *Router) stopLocked() error {
	r.state.Store(stateClosed)
	r.spawnMu.Lock()
	r.spawnClosed = true
	r.spawnMu.Unlock()
	r.cancel()
	r.wg.Wait()

	var errs []error
	if r.idSub != nil {
		errs = append(errs, r.idSub.Close())
	}
	if r.kad != nil {
		if err := r.kad.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing dht: %w", err))
		}
	}
	if r.host != nil {
		if err := r.host.Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing libp2p host: %w", err))
		}
	}
	if r.conf().ownHTTPClient {
		r.conf().HTTPClient.CloseIdleConnections()
	}
	return errors.Join(errs...)
}

// goTracked runs fn in a goroutine that Close waits for, with a context
// that Close cancels. It reports false, running nothing, unless the router
// is running.
func (r *Router) goTracked(fn func(ctx context.Context)) bool {
	r.spawnMu.Lock()
	defer r.spawnMu.Unlock()
	if r.spawnClosed || r.state.Load() != stateRunning {
		return false
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		fn(r.ctx)
	}()
	return true
}

// running returns the host and DHT, or ok false if the router is not
// running.
func (r *Router) running() (h host.Host, kad *kaddht.IpfsDHT, ok bool) {
	if r.state.Load() != stateRunning {
		return nil, nil, false
	}
	return r.host, r.kad, true
}

// identifyLoop asks every peer that speaks the info protocol for its mirror
// port, each time a connection to it is identified (a peer that restarted
// may have a new port).
func (r *Router) identifyLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-r.idSub.Out():
			if !ok {
				return
			}
			evt, ok := e.(event.EvtPeerIdentificationCompleted)
			if !ok || !slices.Contains(evt.Protocols, InfoProtocolID) {
				continue
			}
			r.fetchInfo(evt.Peer)
		}
	}
}

// announce is the host's address factory: it turns the host's addresses
// into the ones told to peers (see announcedAddrs).
func (r *Router) announce(hostAddrs []ma.Multiaddr) []ma.Multiaddr {
	ifaces, err := r.ifaces.get()
	if err != nil {
		r.logger.Debug("listing network interfaces", zap.Error(err))
	}
	return announcedAddrs(hostAddrs, announceRules{
		keepLoopback: r.conf().keepLoopback,
		ips:          r.conf().announceIPs,
		full:         r.conf().announceFull,
	}, ifaces)
}

// ID returns the node's peer ID. It is known from New on; when New
// generated a key for a missing KeyFile and another process wrote that file
// first, Start adopts the file's key and the ID changes.
func (r *Router) ID() peer.ID {
	r.keyMu.Lock()
	defer r.keyMu.Unlock()
	id, err := peer.IDFromPrivateKey(r.key)
	if err != nil {
		return ""
	}
	return id
}

// Addrs returns the addresses announced to peers, without /p2p: the
// host's listen addresses, with unspecified IPs expanded to the machine's
// addresses and filtered as described on Config.AnnounceAddrs. Empty
// before Start.
func (r *Router) Addrs() []ma.Multiaddr {
	h, _, ok := r.running()
	if !ok {
		return nil
	}
	return h.Addrs()
}

// Self returns this node as listed first in its PeerList.
func (r *Router) Self() PeerInfo {
	return PeerInfo{ID: r.ID(), Addrs: r.Addrs(), MirrorPort: r.conf().MirrorPort}
}

// Peers returns the connected peers whose mirror URL is known, sorted by
// peer ID.
func (r *Router) Peers() []Peer {
	h, _, ok := r.running()
	if !ok {
		return nil
	}
	var out []Peer
	for _, id := range h.Network().Peers() {
		if p, ok := r.knownPeer(id, nil); ok {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b Peer) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out
}

// PeerList returns the document a node serves at PeerListPath: itself
// first, then its connected peers whose mirror port is known.
func (r *Router) PeerList() PeerList {
	pl := PeerList{Version: PeerListVersion, Peers: []PeerInfo{r.Self()}}
	h, _, ok := r.running()
	if !ok {
		return pl
	}
	for _, p := range r.Peers() {
		port, _ := r.infos.port(p.ID)
		pl.Peers = append(pl.Peers, PeerInfo{
			ID: p.ID, Addrs: h.Peerstore().Addrs(p.ID), MirrorPort: port,
		})
	}
	return pl
}

// Ready reports whether the router runs and has at least one peer in its
// routing table, so that advertising and resolving reach other nodes.
func (r *Router) Ready() bool {
	_, kad, ok := r.running()
	return ok && kad.RoutingTable().Size() > 0
}

// httpGet is the one HTTP request the router makes: fetching a peer list.
func (r *Router) httpGet(ctx context.Context, url string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", userAgent)
	return r.conf().HTTPClient.Do(req)
}
