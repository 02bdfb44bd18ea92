package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves peermirror's routes on Caddy's admin endpoint, under
// /peermirror/. Caddy provisions admin modules for every config, with or
// without peermirror, and never cleans them up: the module holds no state
// and starts nothing; it reads the app of the config that runs, if any.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.peermirror",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/peermirror/node", Handler: caddy.AdminHandlerFunc(handleAdminNode)},
		{Pattern: "/peermirror/peers", Handler: caddy.AdminHandlerFunc(handleAdminPeers)},
		{Pattern: "/peermirror/advertised", Handler: caddy.AdminHandlerFunc(handleAdminAdvertised)},
		{Pattern: "/peermirror/lookup", Handler: caddy.AdminHandlerFunc(handleAdminLookup)},
	}
}

// errNotRunning answers admin requests while no config runs peermirror.
var errNotRunning = caddy.APIError{HTTPStatus: http.StatusServiceUnavailable,
	Err: errors.New("peermirror is not running in the current config")}

// runningApp returns the app of the running config for a GET request.
func runningApp(r *http.Request) (*App, error) {
	if r.Method != http.MethodGet {
		return nil, caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed,
			Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	a := running.Load()
	if a == nil {
		return nil, errNotRunning
	}
	return a, nil
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// adminNode is the answer of GET /peermirror/node.
type adminNode struct {
	PeerToPeer bool           `json:"peer_to_peer"`
	PeerID     string         `json:"peer_id,omitempty"`
	Addrs      []string       `json:"addrs,omitempty"`
	MirrorPort int            `json:"mirror_port,omitempty"`
	Containerd adminContainer `json:"containerd"`
}

type adminContainer struct {
	Address    string `json:"address"`
	Namespace  string `json:"namespace"`
	Connected  bool   `json:"connected"`
	ContentDir string `json:"content_dir"`
}

// handleAdminNode answers this node's identity and announced addresses.
func handleAdminNode(w http.ResponseWriter, r *http.Request) error {
	a, err := runningApp(r)
	if err != nil {
		return err
	}
	return writeJSON(w, a.nodeView())
}

// nodeView describes this node: its identity, announced addresses and
// containerd connection.
func (a *App) nodeView() adminNode {
	out := adminNode{Containerd: adminContainer{Address: a.storeCfg.Address, Namespace: a.storeCfg.Namespace}}
	if s := a.Store(); s != nil {
		out.Containerd.Connected = s.Connected()
		out.Containerd.ContentDir = s.ContentDir()
	}
	if router := a.router.Load(); router != nil {
		out.PeerToPeer = true
		out.PeerID = router.ID().String()
		out.MirrorPort = a.DHT.MirrorPort
		for _, addr := range router.Addrs() {
			out.Addrs = append(out.Addrs, addr.String())
		}
	}
	return out
}

// peerViews lists the peers this node is connected to, with the mirror
// address of each.
func (a *App) peerViews() []adminPeer {
	peers := []adminPeer{}
	if router := a.router.Load(); router != nil {
		for _, p := range router.Peers() {
			peers = append(peers, adminPeer{ID: p.ID.String(), MirrorURL: p.MirrorURL})
		}
	}
	return peers
}

// advertisedCounts returns the keys this node advertises and how many of
// them are tags and digests.
func (a *App) advertisedCounts() (keys []string, tags, digests int) {
	if router := a.router.Load(); router != nil {
		keys = router.Advertised()
	}
	for _, k := range keys {
		if isTagKey(k) == 1 {
			tags++
		} else {
			digests++
		}
	}
	return keys, tags, digests
}

type adminPeer struct {
	ID        string `json:"id"`
	MirrorURL string `json:"mirror_url"`
}

// handleAdminPeers answers the peers this node is connected to, with the
// mirror address of each.
func handleAdminPeers(w http.ResponseWriter, r *http.Request) error {
	a, err := runningApp(r)
	if err != nil {
		return err
	}
	return writeJSON(w, map[string]any{"peers": a.peerViews()})
}

// handleAdminAdvertised answers how many tags and digests this node
// advertises, and the keys themselves with ?keys=true.
func handleAdminAdvertised(w http.ResponseWriter, r *http.Request) error {
	a, err := runningApp(r)
	if err != nil {
		return err
	}
	out := struct {
		Tags    int      `json:"tags"`
		Digests int      `json:"digests"`
		Keys    []string `json:"keys,omitempty"`
	}{}
	var keys []string
	keys, out.Tags, out.Digests = a.advertisedCounts()
	if list, _ := strconv.ParseBool(r.URL.Query().Get("keys")); list {
		out.Keys = keys
	}
	return writeJSON(w, out)
}

// adminLookup is the answer of GET /peermirror/lookup.
type adminLookup struct {
	Key       string           `json:"key"`
	Providers []adminLookupHit `json:"providers"`
	TookMS    float64          `json:"took_ms"`
}

type adminLookupHit struct {
	ID        string  `json:"id"`
	MirrorURL string  `json:"mirror_url"`
	AfterMS   float64 `json:"after_ms"`
}

// maxLookupWait bounds an admin lookup.
const maxLookupWait = 10 * time.Second

// handleAdminLookup looks a key (a digest or registry/repository:tag) up
// in the DHT and answers who holds it and when each was found; ?timeout=
// bounds the wait (default and cap 10s).
func handleAdminLookup(w http.ResponseWriter, r *http.Request) error {
	a, err := runningApp(r)
	if err != nil {
		return err
	}
	router := a.router.Load()
	if router == nil {
		return caddy.APIError{HTTPStatus: http.StatusConflict, Err: errors.New("peer to peer is off on this node")}
	}
	key := r.URL.Query().Get("key")
	if key == "" {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New("the key query parameter is required")}
	}
	wait := maxLookupWait
	if t := r.URL.Query().Get("timeout"); t != "" {
		d, err := caddy.ParseDuration(t)
		if err != nil || d <= 0 {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("invalid timeout %q", t)}
		}
		wait = min(d, maxLookupWait)
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	start := time.Now()
	out := adminLookup{Key: key, Providers: []adminLookupHit{}}
	for p := range router.Resolve(ctx, key, 0) {
		out.Providers = append(out.Providers, adminLookupHit{ID: p.ID.String(), MirrorURL: p.MirrorURL,
			AfterMS: float64(time.Since(start).Microseconds()) / 1000})
	}
	out.TookMS = float64(time.Since(start).Microseconds()) / 1000
	return writeJSON(w, out)
}

// Interface guards
var _ caddy.AdminRouter = (*adminAPI)(nil)
