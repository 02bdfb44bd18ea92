package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/peermirror/peermirror/contentstore"
	"github.com/peermirror/peermirror/dht"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// maxManifestSize bounds the manifests served; registries refuse larger
// ones.
const maxManifestSize = 4 << 20

// Handler serves the OCI distribution pull API (GET and HEAD of manifests
// and blobs under /v2/) from this node's containerd, through the peermirror
// app. Requests outside /v2 go to the next handler, so the mirror can share
// a site with other routes.
type Handler struct {
	// PeersOnly treats every request as one from another node, whatever
	// its headers: served from this node's store only, within the upload
	// limits, and with private_registries only what this node advertises.
	// For a listener that only peers reach, such as one behind mutual
	// TLS. Caddyfile: `peermirror { peers_only }`.
	PeersOnly bool `json:"peers_only,omitempty"`

	app    *App
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.peermirror",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision finds the peermirror app, loading it with its defaults when
// the config has none.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	appIface, err := ctx.App("peermirror")
	if err != nil {
		return fmt.Errorf("loading peermirror app: %w", err)
	}
	h.app = appIface.(*App)
	return nil
}

// ServeHTTP answers one OCI request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	switch r.URL.Path {
	case dht.PeerListPath:
		h.servePeerList(w, r)
		return nil
	case livePath, readyPath:
		h.serveProbe(w, r)
		return nil
	}
	if strings.HasPrefix(r.URL.Path, claimsPath) {
		h.serveClaim(w, r)
		return nil
	}
	if r.URL.Path != "/v2" && !strings.HasPrefix(r.URL.Path, "/v2/") {
		return next.ServeHTTP(w, r)
	}
	// every answer below is counted: by registry, kind, source and bytes
	cw := &countingWriter{ResponseWriter: w}
	w = cw
	start := time.Now()
	var req ociRequest
	source := "invalid"
	defer func() {
		took := time.Since(start)
		observeRequest(r, req, source, cw, took)
		recentRequests.add(r, req, source, cw, start, took)
	}()

	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		h.refuse(w, r, &requestError{status: http.StatusMethodNotAllowed, code: codeUnsupported,
			message: "this mirror is read-only: only GET and HEAD are allowed"})
		return nil
	}
	req, rerr := parseRequest(r.URL)
	if rerr != nil {
		h.refuse(w, r, rerr)
		return nil
	}
	source = "miss"
	if req.kind == kindBase {
		source = "local"
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			_, _ = io.WriteString(w, "{}")
		}
		return nil
	}

	if req.kind == kindManifest && req.tag != "" && req.registry == "" {
		h.miss(w, r, req, "a tag can only be resolved with the ns query parameter naming its registry")
		return nil
	}
	if req.registry != "" && !h.app.Mirrors(req.registry) {
		h.miss(w, r, req, "registry "+req.registry+" is not mirrored here")
		return nil
	}
	if req.tag != "" && h.app.filtered(req.ref()) {
		h.miss(w, r, req, "reference "+req.ref()+" is filtered out: it is always pulled from its registry")
		return nil
	}
	// a request from another node is served from this store only, and
	// only what this node shares, within its upload limits
	forwarded := h.PeersOnly || r.Header.Get(headerForwarded) != ""
	if forwarded {
		if !h.app.sharesWithPeers(r.Context(), req, r.Header.Get(headerIngest) != "") {
			h.miss(w, r, req, "not shared with other nodes (a private registry, or not advertised here)")
			return nil
		}
		if !h.app.uploads.acquire() {
			source = "busy"
			w.Header().Set("Retry-After", "1")
			writeError(w, r, http.StatusServiceUnavailable, codeTooMany, "this node serves as many peers as it may at once")
			h.logger.Debug("upload refused: at the cap", zap.String("uri", r.RequestURI))
			return nil
		}
		defer h.app.uploads.release()
		cw.ResponseWriter = h.app.uploads.writer(cw.ResponseWriter, r)
	}

	source = "local"
	err := errNotStarted
	store := h.app.Store()
	if store != nil {
		if req.kind == kindManifest {
			err = h.serveManifest(w, r, store, req)
		} else {
			err = h.serveBlob(w, r, store, req)
		}
	}
	// a whole blob that another node's cold pull waits on may still be
	// downloading here
	if err != nil && isMiss(err) && forwarded && store != nil && coldBlob(r, req) &&
		r.Header.Get(headerIngest) != "" && h.app.coordinates() {
		source = "local"
		clearContentHeaders(w.Header())
		if ierr := h.serveIngest(w, r, store, req); ierr != nil {
			err = fmt.Errorf("%v; %w", err, ierr)
		} else {
			err = nil
		}
	}
	if err != nil && !errors.Is(err, errWrongKind) && !forwarded && isMiss(err) && !h.app.private[req.registry] {
		if f := h.app.peers(); f != nil && (req.tag == "" || h.app.resolvesTags()) {
			source = "peer"
			clearContentHeaders(w.Header())
			perr := h.servePeer(w, r, f, req)
			if errors.Is(perr, errNoPeer) && coldBlob(r, req) && h.app.coordinates() {
				clearContentHeaders(w.Header())
				perr = h.serveCold(w, r, f, req)
			}
			if perr != nil {
				err = fmt.Errorf("%v; %w", err, perr)
			} else {
				err = nil
			}
		}
	}
	switch {
	case err == nil:
	case isMiss(err) || errors.Is(err, errWrongKind) || errors.Is(err, errNoPeer):
		source = "miss"
		h.miss(w, r, req, err.Error())
	default:
		source = "error"
		h.logger.Error("serving content", zap.String("uri", r.RequestURI), zap.Error(err))
		writeError(w, r, http.StatusInternalServerError, codeInternal, "reading content failed")
	}
	if ce := h.logger.Check(zapcore.DebugLevel, "served"); ce != nil && err == nil {
		ce.Write(zap.String("kind", req.kind.String()), zap.String("registry", req.registry),
			zap.String("name", req.name), zap.String("reference", req.reference()),
			zap.String("source", source), zap.Bool("forwarded", forwarded),
			zap.Duration("duration", time.Since(start)))
	}
	return nil
}

// coldBlob reports whether req is a request that cold pull coordination
// handles: a GET of a whole blob.
func coldBlob(r *http.Request, req ociRequest) bool {
	return req.kind == kindBlob && r.Method == http.MethodGet && r.Header.Get("Range") == ""
}

// isMiss reports whether err means the local store does not have the
// content (or cannot be asked).
func isMiss(err error) bool {
	return errors.Is(err, contentstore.ErrNotFound) || errors.Is(err, contentstore.ErrUnavailable) ||
		errors.Is(err, errNotStarted)
}

// errNotStarted is a request that arrives before the app has started, as
// happens during a config reload.
var errNotStarted = errors.New("peermirror is not started yet")

// Probe paths for Kubernetes. Liveness: the process answers HTTP. Readiness:
// the mirror can answer from its own containerd; peers are not needed, so a
// single-node cluster becomes ready.
const (
	livePath  = "/.well-known/peermirror/v1/live"
	readyPath = "/.well-known/peermirror/v1/ready"
)

// probeStatus is the body of a probe answer.
type probeStatus struct {
	Status     string `json:"status"`
	Containerd bool   `json:"containerd"`
	Peers      *int   `json:"peers,omitempty"`
}

// serveProbe answers the liveness and readiness probes.
func (h *Handler) serveProbe(w http.ResponseWriter, r *http.Request) {
	st := probeStatus{Status: "ok"}
	store := h.app.Store()
	st.Containerd = store != nil && store.Connected()
	if router := h.app.router.Load(); router != nil {
		n := len(router.Peers())
		st.Peers = &n
	}
	status := http.StatusOK
	if r.URL.Path == readyPath && !st.Containerd {
		st.Status = "containerd unreachable"
		status = http.StatusServiceUnavailable
	}
	body, _ := json.Marshal(st)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}

// errWrongKind is a digest asked for as the wrong kind: a manifest under
// /blobs/ or a layer under /manifests/.
var errWrongKind = errors.New("content is not of the kind asked for")

// serveManifest answers a manifest request by tag or digest.
func (h *Handler) serveManifest(w http.ResponseWriter, r *http.Request, store *contentstore.Store,
	req ociRequest) error {
	ctx := r.Context()
	var desc ocispec.Descriptor
	var err error
	if req.tag != "" {
		var img contentstore.Image
		img, err = store.ResolveImage(ctx, req.ref())
		desc = img.Target
		if err == nil {
			w.Header().Set(headerUpdated, formatUpdated(img.UpdatedAt))
		}
	} else {
		desc, err = store.Descriptor(ctx, req.digest)
	}
	if err != nil {
		return err
	}
	if !contentstore.IsManifest(desc.MediaType) {
		return fmt.Errorf("%s is a %s: %w", desc.Digest, desc.MediaType, errWrongKind)
	}
	setContentHeaders(w.Header(), desc)
	w.Header().Set(headerSource, "local")
	if checkNotModified(w, r, desc) {
		return nil
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return nil
	}
	b, err := store.ReadBlob(ctx, desc, maxManifestSize)
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	return nil
}

// serveBlob answers a blob request, whole or a single range.
func (h *Handler) serveBlob(w http.ResponseWriter, r *http.Request, store *contentstore.Store, req ociRequest) error {
	ctx := r.Context()
	desc, err := store.Descriptor(ctx, req.digest)
	if err != nil {
		return err
	}
	if contentstore.IsManifest(desc.MediaType) {
		return fmt.Errorf("%s is a manifest: %w", desc.Digest, errWrongKind)
	}
	hdr := w.Header()
	setContentHeaders(hdr, desc)
	hdr.Set("Accept-Ranges", "bytes")
	hdr.Set(headerSource, "local")
	if checkNotModified(w, r, desc) {
		return nil
	}

	rng, partial, rerr := blobRange(r, desc)
	if rerr != nil {
		hdr.Set("Content-Range", "bytes */"+strconv.FormatInt(desc.Size, 10))
		hdr.Del("Content-Type")
		hdr.Del("Content-Length")
		h.refuse(w, r, &requestError{status: http.StatusRequestedRangeNotSatisfiable,
			code: codeRangeInvalid, message: "range " + quoteShort(r.Header.Get("Range")) +
				" cannot be served from a blob of " + strconv.FormatInt(desc.Size, 10) + " bytes"})
		return nil
	}
	status := http.StatusOK
	if partial {
		status = http.StatusPartialContent
		hdr.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", rng.start, rng.start+rng.length-1, desc.Size))
		hdr.Set("Content-Length", strconv.FormatInt(rng.length, 10))
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return nil
	}

	c, err := store.OpenDescriptor(ctx, desc)
	if err != nil {
		return err
	}
	defer c.Close()
	w.WriteHeader(status)
	n, err := copyContent(w, c, rng)
	if err != nil {
		// the status line is gone; returning short of Content-Length makes
		// the server close the connection, so the client sees the cut
		if isClientGone(ctx, err) {
			h.logger.Debug("client left during blob transfer", zap.String("digest", desc.Digest.String()),
				zap.Int64("sent", n), zap.Int64("wanted", rng.length), zap.Error(err))
		} else {
			h.logger.Warn("blob transfer from containerd failed", zap.String("digest", desc.Digest.String()),
				zap.Int64("sent", n), zap.Int64("wanted", rng.length), zap.Error(err))
		}
	}
	return nil
}

// blobRange returns the part of the blob to send: all of it unless the
// request carries a single satisfiable Range (and, with If-Range, the
// validator still matches).
func blobRange(r *http.Request, desc ocispec.Descriptor) (byteRange, bool, error) {
	whole := byteRange{start: 0, length: desc.Size}
	header := r.Header.Get("Range")
	if header == "" {
		return whole, false, nil
	}
	if ir := r.Header.Get("If-Range"); ir != "" && ir != etag(desc) {
		return whole, false, nil
	}
	rng, ok, err := parseRange(header, desc.Size)
	if err != nil || !ok {
		return whole, false, err
	}
	return rng, true, nil
}

// copyBufs holds buffers for relaying peers' bodies.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// grpcBufs holds buffers for reading from containerd over gRPC: each read
// is one round trip, so a larger buffer nearly doubles throughput (1 MiB:
// about 460 MB/s against 240 MB/s with 256 KiB, see bench/).
var grpcBufs = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// copyContent sends rng of c to w. An open-ended range of a blob file is
// handed to the response writer as the bare *os.File, which lets the
// server send it with sendfile; other copies go through a pooled buffer.
func copyContent(w http.ResponseWriter, c *contentstore.Content, rng byteRange) (int64, error) {
	if f := c.File(); f != nil && rng.start+rng.length == c.Size() {
		if _, err := f.Seek(rng.start, io.SeekStart); err != nil {
			return 0, err
		}
		n, err := io.Copy(w, f)
		if err == nil && n != rng.length {
			err = io.ErrUnexpectedEOF
		}
		return n, err
	}
	bp := grpcBufs.Get().(*[]byte)
	defer grpcBufs.Put(bp)
	n, err := io.CopyBuffer(writerOnly{w}, c.Section(rng.start, rng.length), *bp)
	if err == nil && n != rng.length {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// writerOnly hides a ResponseWriter's ReadFrom, so io.CopyBuffer uses the
// given buffer instead of the writer's own small one.
type writerOnly struct{ io.Writer }

// isClientGone reports whether a copy failed because the client left.
func isClientGone(ctx context.Context, err error) bool {
	return ctx.Err() != nil || errors.Is(err, context.Canceled)
}

// clearContentHeaders drops what a failed local attempt may have set.
func clearContentHeaders(h http.Header) {
	for _, k := range relayed {
		h.Del(k)
	}
	h.Del(headerSource)
	h.Del(headerUpdated)
}

// etag is a blob's entity tag: its digest, which never changes.
func etag(desc ocispec.Descriptor) string {
	return `"` + desc.Digest.String() + `"`
}

// setContentHeaders sets the headers a GET and a HEAD of content share.
func setContentHeaders(h http.Header, desc ocispec.Descriptor) {
	mt := desc.MediaType
	if mt == "" {
		mt = contentstore.MediaTypeOctetStream
	}
	h.Set("Content-Type", mt)
	h.Set("Content-Length", strconv.FormatInt(desc.Size, 10))
	h.Set("Docker-Content-Digest", desc.Digest.String())
	h.Set("Docker-Distribution-API-Version", "registry/2.0")
	h.Set("ETag", etag(desc))
	h.Set("X-Content-Type-Options", "nosniff")
}

// checkNotModified answers 304 when If-None-Match names the content's
// entity tag (or is *), and reports whether it did.
func checkNotModified(w http.ResponseWriter, r *http.Request, desc ocispec.Descriptor) bool {
	inm := r.Header.Get("If-None-Match")
	if inm == "" {
		return false
	}
	tag := etag(desc)
	for _, candidate := range strings.Split(inm, ",") {
		candidate = strings.TrimPrefix(strings.TrimSpace(candidate), "W/")
		if candidate == tag || candidate == "*" {
			w.Header().Del("Content-Length")
			w.WriteHeader(http.StatusNotModified)
			return true
		}
	}
	return false
}

// miss answers 404 with the OCI error for the kind asked for, so containerd
// moves on to the next host at once.
func (h *Handler) miss(w http.ResponseWriter, r *http.Request, req ociRequest, why string) {
	code := codeBlobUnknown
	if req.kind == kindManifest {
		code = codeManifestUnknown
	}
	h.refuse(w, r, &requestError{status: http.StatusNotFound, code: code, message: why})
}

// refuse sends an OCI error and logs it at debug level: a refused or
// missed request is routine for a mirror.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, e *requestError) {
	if ce := h.logger.Check(zapcore.DebugLevel, "request refused"); ce != nil {
		ce.Write(zap.String("method", r.Method), zap.String("uri", r.RequestURI),
			zap.Int("status", e.status), zap.String("code", e.code), zap.String("reason", e.message))
	}
	writeError(w, r, e.status, e.code, e.message)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
