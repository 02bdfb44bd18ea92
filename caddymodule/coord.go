package caddymodule

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/contentstore"
	"github.com/peermirror/peermirror/dht"
)

// Cold pulls: when a blob is nowhere in the cluster, every node that
// misses it asks the blob's coordinator, one node that all agree on (the
// highest rendezvous weight of digest and peer ID among the nodes each
// knows). The first to ask is told to fetch it: its mirror answers 404,
// its containerd pulls from upstream, and it renews a short lease while
// the download runs. The others are pointed at that fetcher, whose mirror
// streams the download in progress from containerd's ingest folder. All
// state is in memory and expires with the lease.

// claimsPath is where a coordinator takes claims:
// POST /.well-known/peermirror/v1/claims/<digest> with the claiming node's
// peer ID in headerNode; ?done=1 gives a claim up.
const claimsPath = "/.well-known/peermirror/v1/claims/"

// Headers between nodes for cold pulls.
const (
	headerNode   = "X-Peermirror-Node"   // the asking node's peer ID
	headerIngest = "X-Peermirror-Ingest" // serve a download in progress too
)

// claimLease is how long a claim lasts without renewal.
const claimLease = 5 * time.Second

// ingestStartWait bounds the wait for a fetcher's containerd to start the
// download it was told to make.
const ingestStartWait = 5 * time.Second

// ingestStall is how long a download in progress may stop growing before
// the readers following it give up (and their nodes fall back upstream).
const ingestStall = 2 * time.Second

// claimTimeout bounds a claim request: one round trip between nodes, so a
// silent coordinator costs a cold miss no more than this before its 404.
const claimTimeout = 500 * time.Millisecond

// maxClaims bounds the claims a coordinator holds.
const maxClaims = 16384

// claim names the node fetching a digest from upstream.
type claim struct {
	Fetcher string    `json:"fetcher"` // peer ID
	URL     string    `json:"url"`     // its mirror
	Granted bool      `json:"granted"` // the asker is the fetcher
	until   time.Time // lease end
}

// claimTable is a coordinator's claims. It is one per process, so a
// config reload keeps the leases.
type claimTable struct {
	mu sync.Mutex
	m  map[digest.Digest]claim
}

var claims = &claimTable{m: map[digest.Digest]claim{}}

// take grants d to node id (mirror url) unless another node's lease runs;
// the holder taking it again renews its lease.
func (t *claimTable) take(d digest.Digest, id, url string, now time.Time) (claim, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.m[d]; ok && now.Before(c.until) {
		if c.Fetcher != id {
			c.Granted = false
			return c, nil
		}
		c.until = now.Add(claimLease)
		t.m[d] = c
		c.Granted = true
		return c, nil
	}
	if len(t.m) >= maxClaims {
		for k, c := range t.m {
			if !now.Before(c.until) {
				delete(t.m, k)
			}
		}
		if len(t.m) >= maxClaims {
			return claim{}, errors.New("too many claims")
		}
	}
	c := claim{Fetcher: id, URL: url, until: now.Add(claimLease)}
	t.m[d] = c
	c.Granted = true
	return c, nil
}

// release ends id's claim on d.
func (t *claimTable) release(d digest.Digest, id string) {
	t.mu.Lock()
	if c, ok := t.m[d]; ok && c.Fetcher == id {
		delete(t.m, d)
	}
	t.mu.Unlock()
}

// rendezvous returns the node among candidates with the highest weight
// for d: every node that knows the same set picks the same one.
func rendezvous(d digest.Digest, candidates []dht.Peer) dht.Peer {
	var best dht.Peer
	var bestW uint64
	for i, p := range candidates {
		h := sha256.Sum256([]byte(d.String() + "\x00" + p.ID.String()))
		w := binary.BigEndian.Uint64(h[:8])
		if i == 0 || w > bestW {
			best, bestW = p, w
		}
	}
	return best
}

// coordinator returns d's coordinator among this node (with no mirror
// URL: it does not ask itself over HTTP) and the peers it knows a mirror
// for.
func coordinator(r *dht.Router, d digest.Digest) dht.Peer {
	return rendezvous(d, append(r.Peers(), dht.Peer{ID: r.ID()}))
}

// serveClaim answers a claim from another node (or a release).
func (h *Handler) serveClaim(w http.ResponseWriter, r *http.Request) {
	router := h.app.router.Load()
	if router == nil || !h.app.coordinates() {
		writeError(w, r, http.StatusNotFound, codeUnsupported, "cold pull coordination is off on this node")
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeError(w, r, http.StatusMethodNotAllowed, codeUnsupported, "claims are made with POST")
		return
	}
	d, err := digest.Parse(strings.TrimPrefix(r.URL.Path, claimsPath))
	if err != nil {
		writeError(w, r, http.StatusBadRequest, codeDigestInvalid, "invalid digest")
		return
	}
	id := r.Header.Get(headerNode)
	if r.URL.Query().Get("done") != "" {
		claims.release(d, id)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	// the asker's mirror, as this node reaches it
	url := ""
	for _, p := range router.Peers() {
		if p.ID.String() == id {
			url = h.app.peerURL(p.MirrorURL)
		}
	}
	if url == "" {
		writeError(w, r, http.StatusForbidden, codeUnsupported, "only a connected peer may claim")
		return
	}
	c, err := claims.take(d, id, url, time.Now())
	if err != nil {
		writeError(w, r, http.StatusServiceUnavailable, codeUnsupported, err.Error())
		return
	}
	h.logger.Debug("claim", zap.String("digest", d.String()), zap.String("asker", id),
		zap.String("fetcher", c.Fetcher), zap.Bool("granted", c.Granted))
	_ = writeJSON(w, c)
}

// askClaim asks d's coordinator who fetches d, claiming it for this node.
func (a *App) askClaim(ctx context.Context, f *peerFetcher, r *dht.Router, d digest.Digest, done bool) (claim, error) {
	self := r.ID().String()
	coord := coordinator(r, d)
	if coord.ID.String() == self {
		if done {
			claims.release(d, self)
			return claim{}, nil
		}
		return claims.take(d, self, "", time.Now())
	}
	ctx, cancel := context.WithTimeout(ctx, min(f.stallTimeout, claimTimeout))
	defer cancel()
	u := a.peerURL(coord.MirrorURL) + claimsPath + d.String()
	if done {
		u += "?done=1"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
	if err != nil {
		return claim{}, err
	}
	req.Header.Set(headerForwarded, peerProtocolVersion)
	req.Header.Set(headerNode, self)
	if f.auth != "" {
		req.Header.Set("Authorization", f.auth)
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return claim{}, fmt.Errorf("asking coordinator %s: %w", coord.ID, err)
	}
	defer resp.Body.Close()
	if done {
		return claim{}, nil
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return claim{}, fmt.Errorf("coordinator %s answered %s: %s", coord.ID, resp.Status, bytes.TrimSpace(b))
	}
	var c claim
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&c); err != nil {
		return claim{}, fmt.Errorf("coordinator %s: %w", coord.ID, err)
	}
	if c.Fetcher == self {
		c.Granted = true
	}
	if c.Fetcher == coord.ID.String() {
		// the coordinator fetches it itself: it is reached where it was
		c.URL = a.peerURL(coord.MirrorURL)
	}
	if !c.Granted && c.URL == "" {
		return claim{}, fmt.Errorf("coordinator %s named fetcher %s without an address", coord.ID, c.Fetcher)
	}
	return c, nil
}

// serveCold handles a whole-blob GET that neither this node nor any peer
// can serve: it asks the blob's coordinator. When this node is to fetch
// the blob, it returns errNoPeer (the caller sends the 404 that sends
// containerd upstream) and follows the download; when another node
// fetches it, the download in progress is relayed from that node.
func (h *Handler) serveCold(w http.ResponseWriter, r *http.Request, f *peerFetcher, req ociRequest) error {
	router := h.app.router.Load()
	if router == nil {
		return errNoPeer
	}
	if followingCount.Load() >= maxFollowing {
		metrics.cold.WithLabelValues("uncoordinated").Inc()
		return fmt.Errorf("%w: following %d downloads already", errNoPeer, maxFollowing)
	}
	c, err := h.app.askClaim(r.Context(), f, router, req.digest, false)
	if err != nil {
		h.logger.Debug("cold pull coordination failed", zap.String("digest", req.digest.String()), zap.Error(err))
		metrics.cold.WithLabelValues("uncoordinated").Inc()
		return fmt.Errorf("%w: no coordinator: %v", errNoPeer, err)
	}
	if c.Granted {
		h.logger.Debug("fetching from upstream for the cluster", zap.String("digest", req.digest.String()))
		metrics.cold.WithLabelValues("fetcher").Inc()
		followFetch(h.app, f, router, req.digest)
		return fmt.Errorf("%w: this node fetches it from upstream for the cluster", errNoPeer)
	}
	h.logger.Debug("following another node's download", zap.String("digest", req.digest.String()),
		zap.String("fetcher", c.Fetcher))
	metrics.cold.WithLabelValues("follower").Inc()
	fetcher := peerCandidate{id: c.Fetcher, url: c.URL}
	preq := peerRequest{method: http.MethodGet, path: peerPath(req), ingest: true}
	key := req.digest.String()
	check := func(resp *http.Response) error {
		if got := resp.Header.Get("Docker-Content-Digest"); got != key {
			return fmt.Errorf("fetcher sent Docker-Content-Digest %q for %s", got, key)
		}
		if resp.ContentLength < 0 {
			return errors.New("fetcher sent no Content-Length")
		}
		return nil
	}
	// a fetcher that has only just been told to fetch may answer before
	// its download shows up: one more try after a moment
	var cands *candidates
	var res attemptResult
	for try := 0; try < 2; try++ {
		if try > 0 {
			select {
			case <-time.After(200 * time.Millisecond):
			case <-r.Context().Done():
				return err
			}
		}
		ch := make(chan peerCandidate, 1)
		ch <- fetcher
		close(ch)
		cands = newCandidates(ch, f.bad)
		if res, err = f.open(r.Context(), cands, preq, f.resolveTimeout, check); err == nil {
			break
		}
		h.logger.Debug("following a download failed", zap.String("digest", req.digest.String()),
			zap.String("fetcher", c.Fetcher), zap.Int("try", try+1), zap.Error(err))
	}
	if err != nil {
		return err
	}
	size := res.resp.ContentLength
	body := newPeerBody(f, r.Context(), cands, preq, check, res, 0, size)
	defer body.Close()
	return h.streamVerified(w, r, f, body, res, req.digest, size)
}

// following is the set of digests this node is fetching for the cluster,
// and followingCount its size.
var (
	following      sync.Map
	followingCount atomic.Int64
)

// followPoll is how often a followed download is checked.
const followPoll = 200 * time.Millisecond

// maxFollowing bounds the downloads followed at once: each polls
// containerd every followPoll, and a flood of misses for digests nobody will
// fetch must not turn into a flood of polls. Past it, misses are not
// coordinated (a plain 404).
const maxFollowing = 256

// followFetch renews this node's claim on d while its containerd
// downloads d; it gives the claim up when the download fails, stalls or
// never starts, and lets it run out when the download is committed.
func followFetch(a *App, f *peerFetcher, r *dht.Router, d digest.Digest) {
	if _, busy := following.LoadOrStore(d, true); busy {
		return
	}
	followingCount.Add(1)
	store := a.Store()
	go func() {
		defer func() {
			following.Delete(d)
			followingCount.Add(-1)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Hour) // bounds a lost download
		defer cancel()
		// containerd's commit event ends the follow at once, even when the
		// blob is gone again before the next check (a quick image removal)
		committed := make(chan struct{})
		sub := store.Subscribe()
		defer sub.Close()
		go func() {
			for {
				ev, err := sub.Next(ctx)
				if err != nil {
					return
				}
				if ev.Kind == contentstore.ContentCreated && ev.Digest == d {
					close(committed)
					return
				}
			}
		}()
		start := time.Now()
		var last int64 = -1
		lastGrowth := time.Now()
		seen := false
		// checked often, so that a download that is over within moments
		// (a small blob, a fast upstream) frees its followers at once;
		// the claim is renewed about once a second
		tick := time.NewTicker(followPoll)
		defer tick.Stop()
		outcome := "committed"
		lastRenew := time.Now()
	follow:
		for {
			select {
			case <-committed:
				break follow
			case <-tick.C:
			}
			in, err := store.FindIngest(ctx, d)
			now := time.Now()
			if err == nil {
				seen = true
				if in.Offset != last {
					last, lastGrowth = in.Offset, now
				}
				if now.Sub(lastGrowth) > ingestStall {
					outcome = "stalled"
					break
				}
				if now.Sub(lastRenew) >= time.Second {
					lastRenew = now
					if _, err := a.askClaim(ctx, f, r, d, false); err != nil {
						a.logger.Debug("renewing a claim", zap.String("digest", d.String()), zap.Error(err))
					}
				}
				continue
			}
			if _, derr := store.Descriptor(ctx, d); derr == nil {
				break // committed
			}
			if seen {
				outcome = "failed"
				break
			}
			if now.Sub(start) > ingestStartWait {
				outcome = "never started"
				break
			}
		}
		// a committed blob keeps its claim until the lease runs out: a node
		// that misses it before this node's provider record is in the DHT
		// is pointed here and served the committed blob, instead of being
		// told to fetch it from upstream again
		if outcome != "committed" {
			if _, err := a.askClaim(ctx, f, r, d, true); err != nil {
				a.logger.Debug("releasing a claim", zap.String("digest", d.String()), zap.Error(err))
			}
		}
		a.logger.Debug("cold pull for the cluster ended", zap.String("digest", d.String()),
			zap.String("outcome", outcome), zap.Duration("took", time.Since(start)))
	}()
}

// serveIngest answers a node that follows this node's download of a blob
// that is not committed yet: while this node follows that download, it
// waits for containerd to start it and streams it as containerd writes
// it; otherwise it answers at once. It returns an error
// wrapping contentstore.ErrNotFound when there is no such download.
func (h *Handler) serveIngest(w http.ResponseWriter, r *http.Request, store *contentstore.Store, req ociRequest) error {
	ctx := r.Context()
	deadline := time.Now().Add(ingestStartWait)
	var in contentstore.Ingest
	var file *os.File
	for {
		var err error
		if in, err = store.FindIngest(ctx, req.digest); err == nil {
			// containerd makes the ingest folder, then its ref and data
			// files: a download that has just started may not be open yet
			if file, err = store.OpenIngest(in); err == nil {
				break
			}
		}
		// committed meanwhile: the usual path serves it
		if _, derr := store.Descriptor(ctx, req.digest); derr == nil {
			return h.serveBlob(w, r, store, req)
		}
		// nothing to wait for unless this node follows its own download
		// of it (from the claim until containerd commits or gives up)
		_, active := following.Load(req.digest)
		if !active || time.Now().After(deadline) || ctx.Err() != nil {
			h.logger.Debug("no download in progress to stream", zap.String("digest", req.digest.String()),
				zap.Error(err))
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
	rd := contentstore.NewIngestReader(ctx, file, in.Total, ingestStall)
	defer rd.Close()
	hdr := w.Header()
	hdr.Set("Content-Type", contentstore.MediaTypeOctetStream)
	hdr.Set("Content-Length", fmt.Sprint(in.Total))
	hdr.Set("Docker-Content-Digest", req.digest.String())
	hdr.Set(headerSource, "ingest")
	w.WriteHeader(http.StatusOK)
	metrics.cold.WithLabelValues("streamed").Inc()
	h.logger.Debug("streaming a download in progress", zap.String("digest", req.digest.String()),
		zap.Int64("written", in.Offset), zap.Int64("total", in.Total))
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	n, err := io.CopyBuffer(writerOnly{w}, rd, *bp)
	if err != nil {
		h.logger.Warn("streaming a download in progress failed; response cut",
			zap.String("digest", req.digest.String()), zap.Int64("sent", n), zap.Error(err))
	}
	return nil
}
