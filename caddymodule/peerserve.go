package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/contentstore"
)

// headerUpdated carries, on a manifest served by tag, when the image record
// was last updated on the serving node: the rule for peers that disagree on
// a tag picks the most recent.
const headerUpdated = "X-Peermirror-Updated"

// relayed are the headers copied from a peer's answer to the client's.
var relayed = []string{"Content-Type", "Content-Length", "Content-Range", "Docker-Content-Digest",
	"ETag", "Accept-Ranges", "Docker-Distribution-API-Version"}

// peerPath is the path and query asked of a peer for req.
func peerPath(req ociRequest) string {
	// the path segments are the kinds' names in the plural
	p := "/v2/" + req.name + "/" + req.kind.String() + "s/" + req.reference()
	if req.registry != "" {
		p += "?ns=" + req.registry
	}
	return p
}

// servePeer answers req from a peer that advertises it. It returns
// errNoPeer (wrapped) when none could answer, for the caller to send a
// miss; once it returns nil the response is written.
func (h *Handler) servePeer(w http.ResponseWriter, r *http.Request, f *peerFetcher, req ociRequest) error {
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	if req.tag != "" {
		d, err := h.resolveTagFromPeers(ctx, f, req)
		if err != nil {
			return err
		}
		req.tag, req.digest = "", d
	}
	key := req.digest.String()
	cands := newCandidates(f.lookup(ctx, key, f.maxPeers), f.bad)
	preq := peerRequest{method: r.Method, path: peerPath(req)}
	check := func(resp *http.Response) error {
		if got := resp.Header.Get("Docker-Content-Digest"); got != "" && got != key {
			return fmt.Errorf("peer sent Docker-Content-Digest %s for %s", got, key)
		}
		if resp.ContentLength < 0 {
			return errors.New("peer sent no Content-Length")
		}
		if req.kind == kindManifest && !contentstore.IsManifest(resp.Header.Get("Content-Type")) {
			return fmt.Errorf("peer sent %q for a manifest", resp.Header.Get("Content-Type"))
		}
		return nil
	}

	// a client range is passed on as it is and relayed unverified: a part
	// of a blob cannot be checked against the blob's digest
	if rng := r.Header.Get("Range"); rng != "" && req.kind == kindBlob {
		return h.relayRange(w, r, f, cands, preq, rng, check)
	}
	if r.Method == http.MethodHead {
		res, err := f.open(ctx, cands, preq, f.resolveTimeout, check)
		if err != nil {
			return err
		}
		defer res.cancel()
		res.resp.Body.Close()
		relayHeaders(w.Header(), res.resp.Header, res.peer)
		w.WriteHeader(http.StatusOK)
		return nil
	}

	// small content and manifests are checked whole before a byte is sent,
	// so a liar costs a retry on the next peer, not a failed pull
	for attempt := 0; attempt < f.maxPeers; attempt++ {
		res, err := f.open(ctx, cands, preq, f.resolveTimeout, check)
		if err != nil {
			return err
		}
		size := res.resp.ContentLength
		body := newPeerBody(f, ctx, cands, preq, check, res, 0, size)
		if req.kind == kindManifest || size <= smallBlobSize {
			b, err := io.ReadAll(body)
			body.Close()
			if err != nil {
				return fmt.Errorf("%w: reading from peer: %v", errNoPeer, err)
			}
			if digest.FromBytes(b) != req.digest {
				h.distrust(f, body, req.digest)
				continue
			}
			if req.kind == kindManifest {
				hintChildren(f, res.peer, res.resp.Header.Get("Content-Type"), b)
			}
			relayHeaders(w.Header(), res.resp.Header, res.peer)
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(b)
			return nil
		}
		err = h.streamVerified(w, r, f, body, res, req.digest, size)
		body.Close()
		return err
	}
	return fmt.Errorf("%w: every peer tried sent wrong bytes", errNoPeer)
}

// hintChildren offers p, which just served an image manifest, for the
// manifest's config and layers: containerd asks for those next, and the
// node that holds a manifest almost always holds its blobs, so the first
// attempt needs no DHT lookup. The lookups still run, for when p does not
// have them. An index is not used: a node holds only the platforms it ran.
func hintChildren(f *peerFetcher, p peerCandidate, mediaType string, b []byte) {
	if contentstore.IsIndex(mediaType) {
		return
	}
	var m ocispec.Manifest
	if json.Unmarshal(b, &m) != nil {
		return
	}
	for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		if d.Digest.Validate() == nil {
			f.recent.hint(d.Digest.String(), p)
		}
	}
}

// smallBlobSize is the largest blob fetched whole from a peer and checked
// before its first byte is sent.
const smallBlobSize = 1 << 20

// holdBack is how many final bytes of a large blob wait until the whole
// blob has matched its digest.
const holdBack = 64 << 10

// streamVerified sends a large blob as it arrives, hashing it, and holds
// its final bytes back until the digest matches. On a mismatch the
// response ends short of its Content-Length, which makes the server cut
// the connection: the client never gets the whole of a wrong blob.
func (h *Handler) streamVerified(w http.ResponseWriter, r *http.Request, f *peerFetcher, body *peerBody,
	res attemptResult, want digest.Digest, size int64) error {
	relayHeaders(w.Header(), res.resp.Header, res.peer)
	w.WriteHeader(http.StatusOK)
	hash := want.Algorithm().Hash()
	head := max(size-holdBack, 0)
	if _, err := hashedCopy(w, body, head, hash); err != nil {
		h.logger.Warn("peer transfer failed", zap.String("digest", want.String()),
			zap.String("peer", res.peer.id), zap.Error(err))
		return nil
	}
	tail := make([]byte, size-head)
	if _, err := io.ReadFull(body, tail); err != nil {
		h.logger.Warn("peer transfer failed", zap.String("digest", want.String()),
			zap.String("peer", res.peer.id), zap.Error(err))
		return nil
	}
	hash.Write(tail)
	if got := digest.NewDigest(want.Algorithm(), hash); got != want {
		h.distrust(f, body, want)
		return nil
	}
	_, _ = w.Write(tail)
	return nil
}

// distrust records that the peers behind body sent bytes that do not match
// the digest. When one peer sent all of it, that peer is never asked again;
// when a resume mixed peers, the culprit is unknown and all are kept.
func (h *Handler) distrust(f *peerFetcher, body *peerBody, d digest.Digest) {
	ids := make([]string, 0, len(body.peers))
	for id := range body.peers {
		ids = append(ids, id)
	}
	if len(ids) == 1 {
		f.bad.add(ids[0])
	}
	// TODO: a resumed stream that mixed peers does not tell which one lied;
	// refetching the pieces from one peer each would.
	h.logger.Warn("peer sent bytes that do not match the digest; response cut",
		zap.String("digest", d.String()), zap.Strings("peers", ids), zap.Bool("peer_excluded", len(ids) == 1))
}

// relayRange passes a client's Range to a peer and relays the answer: a
// 206 (resumed on another peer if it breaks), a 416, or a 200 when the
// peer sends the whole blob.
func (h *Handler) relayRange(w http.ResponseWriter, r *http.Request, f *peerFetcher, cands *candidates,
	preq peerRequest, rng string, check func(*http.Response) error) error {
	ctx := r.Context()
	preq.rng = rng
	preq.partial = true
	var status int
	accept := func(resp *http.Response) error {
		status = resp.StatusCode
		if resp.StatusCode == http.StatusRequestedRangeNotSatisfiable {
			return nil
		}
		return check(resp)
	}
	res, err := f.openAny(ctx, cands, preq, accept,
		http.StatusPartialContent, http.StatusRequestedRangeNotSatisfiable, http.StatusOK)
	if err != nil {
		return err
	}
	defer res.cancel()
	relayHeaders(w.Header(), res.resp.Header, res.peer)
	if status == http.StatusRequestedRangeNotSatisfiable || r.Method == http.MethodHead {
		res.resp.Body.Close()
		w.WriteHeader(status)
		if status == http.StatusRequestedRangeNotSatisfiable && r.Method != http.MethodHead {
			writeRangeErrorBody(w, res.resp)
		}
		return nil
	}
	start, length := int64(0), res.resp.ContentLength
	if status == http.StatusPartialContent {
		var end, total int64
		if _, err := fmt.Sscanf(res.resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &total); err != nil ||
			end-start+1 != length {
			res.resp.Body.Close()
			return fmt.Errorf("%w: peer sent a bad Content-Range", errNoPeer)
		}
	}
	body := newPeerBody(f, ctx, cands, peerRequest{method: http.MethodGet, path: preq.path}, check, res, start, length)
	defer body.Close()
	w.WriteHeader(status)
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	if _, err := io.CopyBuffer(writerOnly{w}, body, *bp); err != nil {
		h.logger.Warn("peer range transfer failed", zap.String("path", preq.path), zap.Error(err))
	}
	return nil
}

// writeRangeErrorBody copies a peer's small 416 error body.
func writeRangeErrorBody(w http.ResponseWriter, resp *http.Response) {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	_, _ = w.Write(b)
}

// openAny is open for a request whose answer may carry one of several
// statuses.
func (f *peerFetcher) openAny(ctx context.Context, cands *candidates, req peerRequest,
	check func(*http.Response) error, statuses ...int) (attemptResult, error) {
	req.anyStatus = statuses
	return f.open(ctx, cands, req, f.resolveTimeout, check)
}

// relayHeaders copies a peer's content headers and names the source.
func relayHeaders(dst, src http.Header, p peerCandidate) {
	for _, k := range relayed {
		if v := src.Get(k); v != "" {
			dst.Set(k, v)
		}
	}
	dst.Set("X-Content-Type-Options", "nosniff")
	dst.Set(headerSource, "peer "+p.id)
}

// tagAnswer is one peer's view of a tag.
type tagAnswer struct {
	peer    peerCandidate
	digest  digest.Digest
	updated time.Time
}

// maxTagPeers bounds the peers asked about one tag.
const maxTagPeers = 3

// tagPeerGrace is how long a tag lookup waits for more peers after the
// first one.
const tagPeerGrace = 10 * time.Millisecond

// resolveTagFromPeers asks the peers that advertise req's tag which digest
// it points at. The peers found within the resolve timeout, and at most
// tagPeerGrace after the first (up to three), are asked together; when they disagree, the most recently updated image
// record wins, and a tie goes to the greatest digest, so the answer never
// depends on which peer happened to answer first.
func (h *Handler) resolveTagFromPeers(ctx context.Context, f *peerFetcher, req ociRequest) (digest.Digest, error) {
	key := req.ref()
	cands := newCandidates(f.lookup(ctx, key, maxTagPeers), f.bad)
	deadline := time.Now().Add(f.resolveTimeout)
	var peers []peerCandidate
	for len(peers) < maxTagPeers {
		p, ok := cands.next(ctx, deadline)
		if !ok {
			break
		}
		if len(peers) == 0 {
			// providers mostly arrive together (stored here, or in one
			// answer from a peer); a lookup is not awaited to its end
			if grace := time.Now().Add(tagPeerGrace); grace.Before(deadline) {
				deadline = grace
			}
		}
		peers = append(peers, p)
	}
	if len(peers) == 0 {
		return "", errNoPeer
	}
	answers := make(chan *tagAnswer, len(peers))
	for _, p := range peers {
		go func(p peerCandidate) {
			answers <- h.askTag(ctx, f, p, req)
		}(p)
	}
	var got []tagAnswer
	for range peers {
		if a := <-answers; a != nil {
			got = append(got, *a)
		}
	}
	if len(got) == 0 {
		return "", fmt.Errorf("%w: no peer answered for tag %s", errNoPeer, key)
	}
	sort.Slice(got, func(i, j int) bool {
		if !got[i].updated.Equal(got[j].updated) {
			return got[i].updated.After(got[j].updated)
		}
		return got[i].digest > got[j].digest
	})
	for _, a := range got {
		if a.digest == got[0].digest {
			f.recent.hint(a.digest.String(), a.peer)
		}
	}
	if len(got) > 1 && got[0].digest != got[len(got)-1].digest {
		h.logger.Debug("peers disagree on a tag; taking the most recently updated",
			zap.String("reference", key), zap.String("digest", got[0].digest.String()),
			zap.String("peer", got[0].peer.id))
	}
	return got[0].digest, nil
}

// askTag sends a HEAD for a tag to one peer, bounded by the stall timeout.
func (h *Handler) askTag(ctx context.Context, f *peerFetcher, p peerCandidate, req ociRequest) *tagAnswer {
	ctx, cancel := context.WithTimeout(ctx, f.stallTimeout)
	defer cancel()
	resp, err := f.send(ctx, p, peerRequest{method: http.MethodHead, path: peerPath(req)}, nil)
	if err != nil {
		h.logger.Debug("peer tag lookup failed", zap.String("peer", p.id), zap.Error(err))
		return nil
	}
	resp.Body.Close()
	d, err := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil || !contentstore.IsManifest(resp.Header.Get("Content-Type")) {
		return nil
	}
	updated, _ := time.Parse(time.RFC3339Nano, resp.Header.Get(headerUpdated))
	return &tagAnswer{peer: p, digest: d, updated: updated}
}

// formatUpdated formats an image record's update time for headerUpdated.
func formatUpdated(t time.Time) string {
	return t.UTC().Format(time.RFC3339Nano)
}
