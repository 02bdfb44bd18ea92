// Package caddymodule plugs peermirror into Caddy: the peermirror app owns
// the connection to this node's containerd, and the http.handlers.peermirror
// handler answers the OCI distribution pull API from it.
package caddymodule

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/distribution/reference"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/contentstore"
	"github.com/peermirror/peermirror/dht"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the peermirror app: one per Caddy config. It connects to this
// node's containerd when it starts; the connection is shared with the
// previous config across a reload, so a reload never drops it.
type App struct {
	// Containerd says which containerd to serve content from.
	// Caddyfile: the `containerd` block of the `peermirror` global option.
	Containerd *ContainerdConfig `json:"containerd,omitempty"`

	// Registries lists the registries mirrored, by the host name that
	// containerd sends in the `ns` query parameter (for example docker.io or
	// ghcr.io). Requests naming another registry get a 404, so containerd
	// goes to that registry directly. Requests without `ns` (by digest only)
	// are served whatever this list holds. Default: empty, which mirrors
	// every registry. Caddyfile: `registries docker.io ghcr.io`.
	Registries []string `json:"registries,omitempty"`

	// DHT turns on peer to peer: this node advertises what its containerd
	// holds in a private Kademlia DHT and, on a local miss, fetches from a
	// peer that advertises the content. Without it the node serves its own
	// store only. Caddyfile: the `dht` block.
	DHT *DHTConfig `json:"dht,omitempty"`

	// ResolveTimeout bounds how long a local miss waits for the DHT to name
	// a peer before answering 404, so containerd goes upstream at once.
	// Default: 50ms. Caddyfile: `resolve_timeout`.
	ResolveTimeout caddy.Duration `json:"resolve_timeout,omitempty"`

	// FilterReferences are regular expressions matched against image
	// references (registry/repository:tag). A matching reference is not
	// advertised, not resolved through peers and not served by tag, so it
	// always comes from its registry; for example ":latest$" keeps moving
	// tags out of the mirror. Digests are served whatever the filters say.
	// Caddyfile: `filter_reference <regexp>`, repeatable.
	FilterReferences []string `json:"filter_references,omitempty"`

	// ResolveTags, when false, stops resolving tags through peers: a tag
	// is then served only from this node's own containerd, and content by
	// digest from anywhere. Default: true. Caddyfile: `resolve_tags false`.
	ResolveTags *bool `json:"resolve_tags,omitempty"`

	// HedgeDelay is how long a peer may take to answer before a second
	// peer is asked in parallel. Default: 100ms. Caddyfile: `hedge_delay`.
	HedgeDelay caddy.Duration `json:"hedge_delay,omitempty"`

	// PeerTimeout bounds the wait for a peer's response headers, and the
	// time a peer's body may send nothing before the transfer resumes on
	// another peer. A body that sends less than 32 KiB per second of
	// waiting on it, measured over this time, is resumed elsewhere too.
	// Default: 2s. Caddyfile: `peer_timeout`.
	PeerTimeout caddy.Duration `json:"peer_timeout,omitempty"`

	// MaxPeers bounds the peers tried for one request. Default: 3.
	// Caddyfile: `max_peers`.
	MaxPeers int `json:"max_peers,omitempty"`

	// CoordinatePulls, with peer to peer on, makes a cold pull of a blob
	// that no node holds go upstream about once for the whole cluster:
	// one node fetches it, the others stream its download in progress.
	// Default: true. Caddyfile: `coordinate_pulls false`.
	CoordinatePulls *bool `json:"coordinate_pulls,omitempty"`

	// PrivateRegistries lists registries (as containerd names them in
	// `ns`) whose images stay off the peer path entirely: they are not
	// advertised, a miss for them is not looked up among peers, and other
	// nodes get from this node only what it advertises. Caddyfile:
	// `private_registries <host...>`.
	PrivateRegistries []string `json:"private_registries,omitempty"`

	// PeerAuth, when set, is sent as HTTP basic authentication with every
	// request to another node's mirror, for mirrors behind Caddy's
	// basic_auth (on /v2/* only: bootstrap and coordination paths stay
	// open). Placeholders such as {env.PEER_PASSWORD} are replaced at
	// load. Caddyfile: `peer_auth <user> <password>`.
	PeerAuth *PeerAuth `json:"peer_auth,omitempty"`

	// PeerTLS makes requests to other nodes' mirrors use HTTPS with a
	// client certificate (see PeerTLS). Caddyfile: the `peer_tls` block
	// with `ca`, `cert` and `key`.
	PeerTLS *PeerTLS `json:"peer_tls,omitempty"`

	// MaxUploads caps the requests from other nodes served at once; a
	// node at its cap answers 503 at once, so the asking node tries
	// another peer. Default: 0, no cap. Caddyfile: `max_uploads`.
	MaxUploads int `json:"max_uploads,omitempty"`

	// UploadRate caps the bytes per second served to other nodes, all
	// uploads together. Default: 0, no cap. Caddyfile: `upload_rate`,
	// with units such as 100MB or 1GiB.
	UploadRate int64 `json:"upload_rate,omitempty"`

	private    map[string]bool
	peerAuth   string // Authorization header value for other nodes, or ""
	peerTLS    *tls.Config
	uploads    *uploadLimits
	storeCfg   contentstore.Config
	poolKey    string
	registries map[string]bool
	filters    []*regexp.Regexp
	fetcher    atomic.Pointer[peerFetcher]
	router     atomic.Pointer[dht.Router]
	advertiser atomic.Pointer[advertiser]
	// stopAdvertiser ends the advertiser and waits for it
	stopAdvertiser func()
	store          atomic.Pointer[contentstore.Store]
	release        sync.Once
	logger         *zap.Logger
}

// PeerAuth is the basic authentication sent to other nodes' mirrors.
type PeerAuth struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// ContainerdConfig locates containerd and the content it keeps.
type ContainerdConfig struct {
	// Address is containerd's gRPC socket.
	// Default: /run/containerd/containerd.sock. Caddyfile: `address`.
	Address string `json:"address,omitempty"`

	// Namespace is the containerd namespace whose images are served; the
	// kubelet pulls into k8s.io. Default: k8s.io. Caddyfile: `namespace`.
	Namespace string `json:"namespace,omitempty"`

	// ContentDir is containerd's content directory, the one that holds
	// blobs/sha256, as seen from this process. Blobs are sent straight from
	// its files (with sendfile where the connection allows). Default: the
	// directory containerd reports through its introspection API; when that
	// is not readable from here, blobs are read over gRPC instead, which is
	// slower. Caddyfile: `content_dir`.
	ContentDir string `json:"content_dir,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "peermirror",
		New: func() caddy.Module { return new(App) },
	}
}

// stores holds the containerd connections that outlive one config, keyed
// by address, namespace and content directory. A reload starts the new app
// before it stops the old one, so both share the pooled store and it is
// never torn down and rebuilt for nothing.
var stores = caddy.NewUsagePool()

// pooledStore lets a Store live in a caddy.UsagePool.
type pooledStore struct{ *contentstore.Store }

// Destruct closes the store once no config uses it.
func (p pooledStore) Destruct() error { return p.Close() }

// Provision checks the configuration and fills in defaults. It contacts
// nothing, so `caddy validate` works without containerd.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	cc := ContainerdConfig{}
	if a.Containerd != nil {
		cc = *a.Containerd
	}
	a.storeCfg = contentstore.Config{
		Address:    cc.Address,
		Namespace:  cc.Namespace,
		ContentDir: cc.ContentDir,
	}
	a.storeCfg = a.storeCfg.WithDefaults()
	a.poolKey = strings.Join([]string{a.storeCfg.Address, a.storeCfg.Namespace, a.storeCfg.ContentDir}, "\x00")

	a.registries = make(map[string]bool, len(a.Registries))
	for _, r := range a.Registries {
		if err := validRegistry(r); err != nil {
			return err
		}
		a.registries[r] = true
	}
	if err := a.provisionFilters(); err != nil {
		return err
	}
	a.private = make(map[string]bool, len(a.PrivateRegistries))
	for _, r := range a.PrivateRegistries {
		if err := validRegistry(r); err != nil {
			return fmt.Errorf("private_%w", err)
		}
		a.private[r] = true
	}
	if a.MaxUploads < 0 || a.UploadRate < 0 {
		return errors.New("max_uploads and upload_rate must not be negative")
	}
	a.uploads = newUploadLimits(a.MaxUploads, a.UploadRate)
	if a.PeerTLS != nil {
		cfg, err := a.PeerTLS.clientConfig()
		if err != nil {
			return err
		}
		a.peerTLS = cfg
	}
	if a.PeerAuth != nil {
		repl := caddy.NewReplacer()
		user, pass := repl.ReplaceKnown(a.PeerAuth.Username, ""), repl.ReplaceKnown(a.PeerAuth.Password, "")
		if user == "" || strings.Contains(user, ":") {
			return errors.New("peer_auth: a user name is required, without a colon")
		}
		a.peerAuth = "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
	}
	if a.ResolveTimeout == 0 {
		a.ResolveTimeout = caddy.Duration(50 * time.Millisecond)
	}
	if a.HedgeDelay == 0 {
		a.HedgeDelay = caddy.Duration(100 * time.Millisecond)
	}
	if a.PeerTimeout == 0 {
		a.PeerTimeout = caddy.Duration(2 * time.Second)
	}
	if a.MaxPeers == 0 {
		a.MaxPeers = 3
	}
	if a.ResolveTimeout < 0 || a.HedgeDelay < 0 || a.PeerTimeout < 0 || a.MaxPeers < 0 {
		return errors.New("resolve_timeout, hedge_delay, peer_timeout and max_peers must not be negative")
	}
	if a.DHT != nil {
		if err := a.DHT.provision(); err != nil {
			return fmt.Errorf("dht: %w", err)
		}
	}
	return nil
}

// provisionFilters compiles the reference filters.
func (a *App) provisionFilters() error {
	a.filters = a.filters[:0]
	for _, expr := range a.FilterReferences {
		re, err := regexp.Compile(expr)
		if err != nil {
			return fmt.Errorf("filter_reference %q: %w", expr, err)
		}
		a.filters = append(a.filters, re)
	}
	return nil
}

// filtered reports whether ref (registry/repository:tag) is kept out of
// the mirror by a reference filter.
func (a *App) filtered(ref string) bool {
	for _, re := range a.filters {
		if re.MatchString(ref) {
			return true
		}
	}
	return false
}

// sharesWithPeers reports whether a request from another node for req
// may be served: with private registries set, only what this node
// advertises is (so private content never leaves it, even asked by
// digest), nothing of a private registry, and downloads in progress
// (ingest) only for a registry named and not private.
func (a *App) sharesWithPeers(ctx context.Context, req ociRequest, ingest bool) bool {
	if len(a.private) == 0 {
		return true
	}
	if a.private[req.registry] {
		return false
	}
	key := req.ref()
	if req.tag == "" {
		key = req.digest.String()
	}
	if adv := a.advertiser.Load(); adv != nil && adv.has(key) {
		return true
	}
	// a cold pull follows a download that is not advertised yet: only
	// for a registry named and not private, and only while the content
	// is not committed here (committed, unadvertised content is private)
	if ingest && req.registry != "" && req.tag == "" {
		if s := a.Store(); s != nil {
			if _, err := s.Descriptor(ctx, req.digest); err == nil {
				return false
			}
		}
		return true
	}
	return false
}

// coordinates reports whether cold pulls are coordinated.
func (a *App) coordinates() bool {
	return a.DHT != nil && (a.CoordinatePulls == nil || *a.CoordinatePulls)
}

// resolvesTags reports whether tags are resolved through peers.
func (a *App) resolvesTags() bool { return a.ResolveTags == nil || *a.ResolveTags }

// peers returns the peer fetcher, or nil when peer to peer is off or not
// started.
func (a *App) peers() *peerFetcher { return a.fetcher.Load() }

// advertisable reports whether img's keys may go into the DHT: its
// registry is mirrored and no reference filter matches it.
func (a *App) advertisable(img contentstore.Image) bool {
	if img.Ref == nil || !a.Mirrors(reference.Domain(img.Ref)) || a.private[reference.Domain(img.Ref)] {
		return false
	}
	return !a.filtered(img.Name)
}

// Validate is part of caddy.Validator; Provision has already checked the
// fields.
func (a *App) Validate() error { return nil }

// validRegistry checks that r is a registry host as containerd puts it in
// `ns`: a domain with an optional port, nothing more.
func validRegistry(r string) error {
	named, err := reference.WithName(r + "/x")
	if err != nil || reference.Domain(named) != r {
		return fmt.Errorf("registries: %q is not a registry host name", r)
	}
	return nil
}

// Start connects to containerd (or shares the connection of the config
// being replaced). It does not wait for containerd: while containerd is
// away, requests are answered with misses.
func (a *App) Start() error {
	val, loaded, err := stores.LoadOrNew(a.poolKey, func() (caddy.Destructor, error) {
		s := contentstore.New(a.storeCfg, a.logger.Named("contentstore"))
		if err := s.Start(); err != nil {
			return nil, err
		}
		return pooledStore{s}, nil
	})
	if err != nil {
		return fmt.Errorf("starting containerd store: %w", err)
	}
	a.store.Store(val.(pooledStore).Store)
	if a.DHT != nil {
		if err := a.startP2P(); err != nil {
			_ = a.releaseStore()
			return err
		}
	}
	running.Store(a)
	a.logger.Info("peermirror started",
		zap.String("containerd", a.storeCfg.Address),
		zap.String("namespace", a.storeCfg.Namespace),
		zap.Strings("registries", a.Registries),
		zap.Bool("shared_with_previous_config", loaded))
	return nil
}

// Stop releases this config's hold on the containerd connection.
func (a *App) Stop() error {
	running.CompareAndSwap(a, nil)
	return a.releaseStore()
}

// Cleanup releases whatever Start had taken, for the case where Start or a
// sibling app failed and Stop is never called. It is safe after Stop.
func (a *App) Cleanup() error {
	return a.releaseStore()
}

func (a *App) releaseStore() error {
	var err error
	a.release.Do(func() {
		if a.DHT != nil {
			err = a.stopP2P()
		}
		if a.store.Load() == nil {
			return
		}
		if _, derr := stores.Delete(a.poolKey); derr != nil {
			err = errors.Join(err, fmt.Errorf("closing containerd store: %w", derr))
		}
	})
	return err
}

// Store returns the containerd store, or nil before Start.
func (a *App) Store() *contentstore.Store { return a.store.Load() }

// Mirrors reports whether requests for registry ns are served.
func (a *App) Mirrors(ns string) bool {
	return len(a.registries) == 0 || a.registries[ns]
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
