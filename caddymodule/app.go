// Package caddymodule plugs peermirror into Caddy: the peermirror app owns
// the connection to this node's containerd, and the http.handlers.peermirror
// handler answers the OCI distribution pull API from it.
package caddymodule

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/distribution/reference"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/contentstore"
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

	storeCfg   contentstore.Config
	poolKey    string
	registries map[string]bool
	store      atomic.Pointer[contentstore.Store]
	release    sync.Once
	logger     *zap.Logger
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
	cc := ContainerdConfig{}
	if a.Containerd != nil {
		cc = *a.Containerd
	}
	a.storeCfg = contentstore.Config{
		Address:    cc.Address,
		Namespace:  cc.Namespace,
		ContentDir: cc.ContentDir,
	}
	a.storeCfg = contentstore.New(a.storeCfg, nil).Config() // fill defaults
	a.poolKey = strings.Join([]string{a.storeCfg.Address, a.storeCfg.Namespace, a.storeCfg.ContentDir}, "\x00")

	a.registries = make(map[string]bool, len(a.Registries))
	for _, r := range a.Registries {
		if err := validRegistry(r); err != nil {
			return err
		}
		a.registries[r] = true
	}
	return nil
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
	a.logger.Info("peermirror started",
		zap.String("containerd", a.storeCfg.Address),
		zap.String("namespace", a.storeCfg.Namespace),
		zap.Strings("registries", a.Registries),
		zap.Bool("shared_with_previous_config", loaded))
	return nil
}

// Stop releases this config's hold on the containerd connection.
func (a *App) Stop() error {
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
		if a.store.Load() == nil {
			return
		}
		_, err = stores.Delete(a.poolKey)
		if err != nil {
			err = fmt.Errorf("closing containerd store: %w", err)
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
