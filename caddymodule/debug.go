package caddymodule

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/distribution/reference"
	"github.com/dustin/go-humanize"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/contentstore"
)

func init() {
	caddy.RegisterModule(DebugHandler{})
	httpcaddyfile.RegisterHandlerDirective("peermirror_debug", parseDebugDirective)
	httpcaddyfile.RegisterDirectiveOrder("peermirror_debug", httpcaddyfile.Before, "reverse_proxy")
}

//go:embed debug.html
var debugFS embed.FS

var debugPage = template.Must(template.New("debug.html").Funcs(template.FuncMap{
	"bytes": func(n int64) string { return humanize.IBytes(uint64(max(n, 0))) },
	"ms":    func(d time.Duration) string { return strconv.FormatFloat(d.Seconds()*1000, 'f', 1, 64) },
	"short": shortDigest,
	"clock": func(t time.Time) string { return t.Local().Format("15:04:05.000") },
	"shorter": func(s string) string {
		if len(s) > 16 {
			return s[:8] + "…" + s[len(s)-6:]
		}
		return s
	},
}).ParseFS(debugFS, "debug.html"))

// DebugHandler serves an HTML page about this node: its peers, what it
// advertises, the latest requests by source, and a measure action that
// pulls an image's manifests and blobs through this node's mirror and
// times each. It is off unless placed in a route; put it on a listener
// that only operators reach (the page names peers and content, and a
// measure makes the node fetch). Caddyfile: `peermirror_debug`.
type DebugHandler struct {
	// Mirror is the base URL of this node's mirror, where a measure pulls
	// from. Default: http://127.0.0.1 with the DHT's mirror_port (30020
	// without a dht block); required with peer_tls. Caddyfile:
	// `mirror <url>`.
	Mirror string `json:"mirror,omitempty"`

	app    *App
	client *http.Client
	busy   chan struct{} // one measure at a time
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (DebugHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.peermirror_debug",
		New: func() caddy.Module { return new(DebugHandler) },
	}
}

// Provision finds the peermirror app and checks the mirror URL.
func (h *DebugHandler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	appIface, err := ctx.App("peermirror")
	if err != nil {
		return fmt.Errorf("loading peermirror app: %w", err)
	}
	h.app = appIface.(*App)
	if h.Mirror == "" && h.app.PeerTLS != nil {
		// mirror_port is then the peers' TLS listener
		return errors.New("peermirror_debug: with peer_tls, set mirror to this node's plain listener, " +
			"such as http://127.0.0.1:30020")
	}
	if h.Mirror == "" {
		port := 30020
		if h.app.DHT != nil && h.app.DHT.MirrorPort != 0 {
			port = h.app.DHT.MirrorPort
		}
		h.Mirror = "http://127.0.0.1:" + strconv.Itoa(port)
	}
	u, err := url.Parse(h.Mirror)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") {
		return fmt.Errorf("mirror must be a base URL such as http://127.0.0.1:30020, not %q", h.Mirror)
	}
	h.Mirror = strings.TrimSuffix(h.Mirror, "/")
	h.client = &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true,
		MaxIdleConnsPerHost: 4, IdleConnTimeout: 30 * time.Second}}
	h.busy = make(chan struct{}, 1)
	return nil
}

// Cleanup closes the measure client's idle connections.
func (h *DebugHandler) Cleanup() error {
	if h.client != nil {
		h.client.CloseIdleConnections()
	}
	return nil
}

// debugData is what the page shows; ?format=json answers it as JSON.
type debugData struct {
	Node       adminNode       `json:"node"`
	Peers      []adminPeer     `json:"peers"`
	Tags       int             `json:"advertised_tags"`
	Digests    int             `json:"advertised_digests"`
	BySource   []sourceCount   `json:"requests_by_source"`
	Requests   []requestRecord `json:"recent_requests"`
	Mirror     string          `json:"mirror"`
	Ref        string          `json:"ref,omitempty"`
	Measure    *measureResult  `json:"measure,omitempty"`
	Registries []string        `json:"registries,omitempty"`
	Generated  time.Time       `json:"generated"`
	Platform   string          `json:"platform"`
}

type sourceCount struct {
	Source string `json:"source"`
	Count  int64  `json:"count"`
}

// ServeHTTP answers the page, running a measure when ?measure= names an
// image.
func (h *DebugHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, errors.New("the debug page answers GET and HEAD only"))
	}
	var m *measureResult
	ref := strings.TrimSpace(r.URL.Query().Get("measure"))
	if ref != "" && r.Method == http.MethodGet {
		select {
		case h.busy <- struct{}{}:
			res := h.measure(r.Context(), ref)
			<-h.busy
			m = &res
		default:
			m = &measureResult{Ref: ref, Error: "another measure is running on this node; try again"}
		}
	}
	// collected after the measure, so the page counts its requests
	data := h.collect()
	data.Ref, data.Measure = ref, m
	w.Header().Set("Cache-Control", "no-store")
	if r.URL.Query().Get("format") == "json" {
		return writeJSON(w, data)
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'")
	if r.Method == http.MethodHead {
		return nil
	}
	if err := debugPage.Execute(w, data); err != nil {
		h.logger.Debug("writing debug page", zap.Error(err))
	}
	return nil
}

// collect gathers what the page shows about the node.
func (h *DebugHandler) collect() debugData {
	a := h.app
	d := debugData{Mirror: h.Mirror, Generated: time.Now(), Platform: runtime.GOOS + "/" + runtime.GOARCH,
		Registries: a.Registries, Node: a.nodeView(), Peers: a.peerViews()}
	_, d.Tags, d.Digests = a.advertisedCounts()
	var counts map[string]int64
	d.Requests, counts = recentRequests.snapshot()
	for _, s := range []string{"local", "peer", "miss", "invalid", "error", "busy"} {
		d.BySource = append(d.BySource, sourceCount{Source: s, Count: counts[s]})
	}
	return d
}

// measureResult is what a measure found.
type measureResult struct {
	Ref       string        `json:"ref"`
	Registry  string        `json:"registry,omitempty"`
	Name      string        `json:"name,omitempty"`
	Reference string        `json:"reference,omitempty"`
	Rows      []measureRow  `json:"rows"`
	Bytes     int64         `json:"bytes"`
	Took      time.Duration `json:"took_ns"`
	Error     string        `json:"error,omitempty"`
}

// measureRow is one manifest or blob fetched through the mirror.
type measureRow struct {
	Kind      string        `json:"kind"` // index, manifest, config, layer
	Digest    string        `json:"digest"`
	Size      int64         `json:"size"`
	Providers int           `json:"providers"`       // peers the DHT named
	Lookup    time.Duration `json:"lookup_ns"`       // until the first provider, or the whole lookup
	Status    int           `json:"status"`          // the mirror's answer
	Source    string        `json:"source"`          // local, peer <id>, or miss
	FirstByte time.Duration `json:"first_byte_ns"`   // until the response headers
	Total     time.Duration `json:"total_ns"`        // until the last byte
	MBps      float64       `json:"mb_per_s"`        // body bytes per second
	Verified  bool          `json:"verified"`        // the bytes match the digest
	Error     string        `json:"error,omitempty"` //
	body      []byte        // a manifest's bytes, for its children
	mediaType string        // the Content-Type sent
}

// measureLookupWait bounds each DHT lookup of a measure.
const measureLookupWait = 2 * time.Second

// measureWait bounds a whole measure.
const measureWait = 5 * time.Minute

// measure pulls ref through the mirror as containerd would: its manifest
// (by tag or digest), the manifest for this node's platform when that is
// an index, then the config and every layer, one after the other, each
// looked up in the DHT first.
func (h *DebugHandler) measure(ctx context.Context, ref string) (res measureResult) {
	res = measureResult{Ref: ref, Rows: []measureRow{}}
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		res.Error = fmt.Sprintf("%q is not an image reference: %v", ref, err)
		return res
	}
	named = reference.TagNameOnly(named)
	res.Registry, res.Name = reference.Domain(named), reference.Path(named)
	key := ""
	switch v := named.(type) {
	case reference.Canonical:
		res.Reference, key = v.Digest().String(), v.Digest().String()
	case reference.Tagged:
		res.Reference, key = v.Tag(), res.Registry+"/"+res.Name+":"+v.Tag()
	}
	h.logger.Info("measuring an image through the mirror", zap.String("ref", ref), zap.String("mirror", h.Mirror))
	ctx, cancel := context.WithTimeout(ctx, measureWait)
	defer cancel()
	start := time.Now()
	defer func() { res.Took = time.Since(start) }()

	row := h.measureOne(ctx, res, "manifests", res.Reference, key)
	res.add(row)
	if row.Error != "" {
		return res
	}
	if contentstore.IsIndex(row.mediaType) {
		var idx ocispec.Index
		if err := json.Unmarshal(row.body, &idx); err != nil || len(idx.Manifests) == 0 {
			res.Error = "the index lists no manifests"
			return res
		}
		pick := idx.Manifests[0]
		for _, m := range idx.Manifests {
			if m.Platform != nil && m.Platform.OS == runtime.GOOS && m.Platform.Architecture == runtime.GOARCH {
				pick = m
				break
			}
		}
		row = h.measureOne(ctx, res, "manifests", pick.Digest.String(), pick.Digest.String())
		res.add(row)
		if row.Error != "" {
			return res
		}
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(row.body, &m); err != nil {
		res.Error = "the manifest does not parse: " + err.Error()
		return res
	}
	for i, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		if ctx.Err() != nil {
			res.Error = "the measure ran out of time"
			return res
		}
		row := h.measureOne(ctx, res, "blobs", d.Digest.String(), d.Digest.String())
		row.Kind = "layer"
		if i == 0 {
			row.Kind = "config"
		}
		res.add(row)
	}
	return res
}

func (res *measureResult) add(row measureRow) {
	res.Rows = append(res.Rows, row)
	res.Bytes += row.Size
}

// measureOne looks key up in the DHT and then GETs one manifest or blob
// through the mirror, hashing what arrives.
func (h *DebugHandler) measureOne(ctx context.Context, res measureResult, kind, ref, key string) measureRow {
	row := measureRow{Kind: strings.TrimSuffix(kind, "s"), Digest: ref}
	if router := h.app.router.Load(); router != nil {
		lctx, cancel := context.WithTimeout(ctx, measureLookupWait)
		start := time.Now()
		for range router.Resolve(lctx, key, 3) {
			if row.Providers == 0 {
				row.Lookup = time.Since(start)
			}
			row.Providers++
		}
		if row.Providers == 0 {
			row.Lookup = time.Since(start)
		}
		cancel()
	}

	u := h.Mirror + "/v2/" + res.Name + "/" + kind + "/" + ref + "?ns=" + url.QueryEscape(res.Registry)
	var first time.Time
	trace := &httptrace.ClientTrace{GotFirstResponseByte: func() { first = time.Now() }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodGet, u, nil)
	if err != nil {
		row.Error = err.Error()
		return row
	}
	if kind == "manifests" {
		req.Header.Set("Accept", strings.Join(manifestTypes, ", "))
	}
	start := time.Now()
	resp, err := h.client.Do(req)
	if err != nil {
		row.Error = "asking the mirror: " + err.Error()
		return row
	}
	defer resp.Body.Close()
	row.Status, row.FirstByte = resp.StatusCode, first.Sub(start)
	row.Source = resp.Header.Get(headerSource)
	row.mediaType = resp.Header.Get("Content-Type")
	if resp.StatusCode != http.StatusOK {
		row.Source = "miss"
		row.Error = "the mirror answered " + resp.Status
		return row
	}
	if kind == "manifests" && !contentstore.IsManifest(row.mediaType) {
		row.Error = fmt.Sprintf("the mirror sent %q for a manifest", row.mediaType)
		return row
	}
	if d := resp.Header.Get("Docker-Content-Digest"); d != "" && !strings.HasPrefix(ref, "sha256:") {
		row.Digest = d
	}
	hash := sha256.New()
	var body io.Writer = hash
	var buf strings.Builder
	if kind == "manifests" {
		body = io.MultiWriter(hash, &buf)
	}
	n, err := io.Copy(body, io.LimitReader(resp.Body, max(resp.ContentLength, 0)+1))
	row.Total, row.Size = time.Since(start), n
	if err != nil {
		row.Error = "reading from the mirror: " + err.Error()
		return row
	}
	if s := row.Total.Seconds(); s > 0 {
		row.MBps = float64(n) / 1e6 / s
	}
	row.Verified = digest.NewDigestFromBytes(digest.SHA256, hash.Sum(nil)).String() == row.Digest
	switch {
	case !strings.HasPrefix(row.Digest, "sha256:"):
		row.Error = "the mirror sent no Docker-Content-Digest to check the bytes against"
	case !row.Verified:
		row.Error = "the bytes do not match the digest"
	}
	row.body = []byte(buf.String())
	h.logger.Debug("measured", zap.String("kind", row.Kind), zap.String("digest", row.Digest),
		zap.String("source", row.Source), zap.Int64("bytes", n), zap.Duration("took", row.Total))
	return row
}

// manifestTypes are the manifest media types a measure accepts, as
// containerd sends them.
var manifestTypes = []string{ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest,
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json", "*/*"}

func shortDigest(d string) string {
	if _, hex, ok := strings.Cut(d, ":"); ok && len(hex) > 12 {
		return d[:len(d)-len(hex)] + hex[:12]
	}
	return d
}

// parseDebugDirective reads:
//
//	peermirror_debug {
//		mirror <url>
//	}
func parseDebugDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	d := new(DebugHandler)
	return d, d.UnmarshalCaddyfile(h.Dispenser)
}

// UnmarshalCaddyfile reads the peermirror_debug directive.
func (h *DebugHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "mirror":
			if !d.NextArg() {
				return d.ArgErr()
			}
			h.Mirror = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized peermirror_debug subdirective %q", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*DebugHandler)(nil)
	_ caddy.CleanerUpper          = (*DebugHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*DebugHandler)(nil)
	_ caddyfile.Unmarshaler       = (*DebugHandler)(nil)
)
