package caddymodule

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// fakeResolver answers lookups from a fixed table, in order.
type fakeResolver struct {
	mu    sync.Mutex
	peers map[string][]peerCandidate
}

func (r *fakeResolver) resolve(ctx context.Context, key string, max int) <-chan peerCandidate {
	r.mu.Lock()
	list := append([]peerCandidate(nil), r.peers[key]...)
	r.mu.Unlock()
	ch := make(chan peerCandidate)
	go func() {
		defer close(ch)
		for i, p := range list {
			if i >= max {
				return
			}
			select {
			case ch <- p:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch
}

// fakePeer is a peer mirror with a behaviour.
type fakePeer struct {
	id  string
	srv *httptest.Server
	// hits counts requests
	mu   sync.Mutex
	hits int
}

func (p *fakePeer) candidate() peerCandidate { return peerCandidate{id: p.id, url: p.srv.URL} }

func (p *fakePeer) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hits
}

type behaviour int

const (
	good behaviour = iota
	silent
	fail500
	cutHalfway
	trickleThenStall
	wrongBytes
	trickleForever // sends a little, often, never stalling
	noRanges       // ignores Range, as the mirror does for manifests
	cutNoResume    // cuts the body halfway and fails every ranged request
)

// startPeer serves blob (a blob or a manifest of mediaType) the way a peer
// mirror would, with the given fault.
func startPeer(t *testing.T, id string, b behaviour, blob []byte, mediaType string) *fakePeer {
	t.Helper()
	p := &fakePeer{id: id}
	d := digest.FromBytes(blob)
	unblock := make(chan struct{})
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.hits++
		p.mu.Unlock()
		if r.Header.Get(headerForwarded) != peerProtocolVersion {
			t.Errorf("peer %s: request without the forwarded marker", id)
		}
		body := blob
		if b == wrongBytes {
			body = bytes.Clone(blob)
			body[len(body)-1] ^= 0xff
		}
		h := w.Header()
		h.Set("Content-Type", mediaType)
		h.Set("Docker-Content-Digest", d.String())
		h.Set(headerUpdated, formatUpdated(time.Unix(1000, 0)))
		switch b {
		case silent:
			select {
			case <-unblock:
			case <-r.Context().Done():
			}
			return
		case fail500:
			w.WriteHeader(http.StatusInternalServerError)
			return
		case trickleForever:
			if r.Header.Get("Range") != "" {
				break
			}
			h.Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			for off := 0; off < len(body); off += 512 {
				_, _ = w.Write(body[off:min(off+512, len(body))])
				w.(http.Flusher).Flush()
				select {
				case <-time.After(50 * time.Millisecond):
				case <-r.Context().Done():
					return
				case <-unblock:
					return
				}
			}
			return
		case noRanges:
			h.Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(body)
			return
		case cutNoResume:
			if r.Header.Get("Range") != "" {
				w.WriteHeader(http.StatusInternalServerError)
				return
			}
			h.Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		case cutHalfway, trickleThenStall:
			if r.Header.Get("Range") != "" {
				break // a resume asked of a faulty peer fails too
			}
			h.Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			if b == cutHalfway {
				_, _ = w.Write(body[:len(body)/2])
				w.(http.Flusher).Flush() // a small body would stay in the buffer
				panic(http.ErrAbortHandler)
			}
			_, _ = w.Write(body[:100])
			w.(http.Flusher).Flush()
			select {
			case <-unblock:
			case <-r.Context().Done():
			}
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
	}))
	// the silent ones must let go before the server closes
	t.Cleanup(func() { close(unblock); p.srv.Close() })
	return p
}

// peerOnlyServer serves a Handler with no local store, whose peer fetcher
// asks res.
func peerOnlyServer(t *testing.T, res peerResolver) (*httptest.Server, *peerFetcher) {
	t.Helper()
	logger := zaptest.NewLogger(t)
	// a hedge delay long enough that a healthy fake peer answers first even
	// on a loaded machine; the faults under test take longer than that
	f := newPeerFetcher(res, 200*time.Millisecond, 200*time.Millisecond, time.Second, 3, logger)
	t.Cleanup(f.close)
	app := &App{logger: logger, registries: map[string]bool{}}
	app.fetcher.Store(f)
	h := &Handler{app: app, logger: logger}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := h.ServeHTTP(w, r, caddyHandlerFunc(http.NotFound)); err != nil {
			t.Errorf("handler returned %v", err)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, f
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(n)}).Read(b)
	return b
}

func TestPeerFaults(t *testing.T) {
	large := randomBytes(3 << 20) // streamed, checked at the end
	small := randomBytes(200 << 10)
	tests := []struct {
		name   string
		blob   []byte
		first  behaviour
		served string // which peer's bytes reach the client: "first" or "second"
	}{
		{"good", large, good, "first"},
		{"silent then hedged", large, silent, "second"},
		{"500", large, fail500, "second"},
		{"cut halfway resumes", large, cutHalfway, "both"},
		{"stall resumes", large, trickleThenStall, "both"},
		{"trickle resumes", large, trickleForever, "both"},
		{"wrong small blob retried", small, wrongBytes, "second"},
		{"dead peer", large, -1, "second"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := digest.FromBytes(tt.blob)
			var first peerCandidate
			var firstPeer *fakePeer
			if tt.first == -1 {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				first = peerCandidate{id: "first", url: "http://" + l.Addr().String()}
				l.Close()
			} else {
				firstPeer = startPeer(t, "first", tt.first, tt.blob, "application/octet-stream")
				first = firstPeer.candidate()
			}
			second := startPeer(t, "second", good, tt.blob, "application/octet-stream")
			res := &fakeResolver{peers: map[string][]peerCandidate{d.String(): {first, second.candidate()}}}
			srv, _ := peerOnlyServer(t, res)

			start := time.Now()
			client := &http.Client{Timeout: 10 * time.Second} // hang detector
			resp, err := client.Get(srv.URL + "/v2/team/app/blobs/" + d.String() + "?ns=registry.test")
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("GET: %d, %v", resp.StatusCode, err)
			}
			if digest.FromBytes(body) != d {
				t.Fatalf("got %d bytes not matching the digest", len(body))
			}
			if took := time.Since(start); took > 10*time.Second { // hang detector
				t.Fatalf("took %s", took)
			}
			src := resp.Header.Get(headerSource)
			switch tt.served {
			case "first":
				if src != "peer first" || second.count() != 0 {
					t.Errorf("source %q, second peer asked %d times; want only the first", src, second.count())
				}
			case "second":
				if src != "peer second" {
					t.Errorf("source %q, want the second peer", src)
				}
			case "both":
				if src != "peer first" || second.count() == 0 {
					t.Errorf("source %q, second asked %d times; want a start on the first and a resume on the second",
						src, second.count())
				}
			}
		})
	}
}

// TestPeerManifestResume checks that a manifest whose stream breaks is
// finished from a peer that answers the resume with the whole manifest,
// as mirrors do: manifests are never served in ranges.
func TestPeerManifestResume(t *testing.T) {
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",` +
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:` +
		strings.Repeat("ab", 32) + `","size":2},"layers":[]}`)
	d := digest.FromBytes(manifest)
	const mt = "application/vnd.oci.image.manifest.v1+json"
	cut := startPeer(t, "cut", cutNoResume, manifest, mt)
	whole := startPeer(t, "whole", noRanges, manifest, mt)
	res := &fakeResolver{peers: map[string][]peerCandidate{d.String(): {cut.candidate(), whole.candidate()}}}
	srv, _ := peerOnlyServer(t, res)

	resp, err := http.Get(srv.URL + "/v2/team/app/manifests/" + d.String() + "?ns=registry.test")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, manifest) {
		t.Fatalf("GET manifest: %d, %v, %q", resp.StatusCode, err, body)
	}
	if src := resp.Header.Get(headerSource); src != "peer cut" || whole.count() == 0 {
		t.Errorf("source %q, whole asked %d times; want a start on cut and a resume on whole", src, whole.count())
	}
}

// TestPeerWrongLargeBlob checks that a large blob whose bytes do not match
// is cut short, and that the lying peer is not asked again.
func TestPeerWrongLargeBlob(t *testing.T) {
	blob := randomBytes(2 << 20)
	d := digest.FromBytes(blob)
	liar := startPeer(t, "liar", wrongBytes, blob, "application/octet-stream")
	honest := startPeer(t, "honest", good, blob, "application/octet-stream")
	// only the liar is found at first, so hedging cannot hand the first
	// request to the honest peer
	res := &fakeResolver{peers: map[string][]peerCandidate{d.String(): {liar.candidate()}}}
	srv, f := peerOnlyServer(t, res)
	url := srv.URL + "/v2/team/app/blobs/" + d.String()

	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil && digest.FromBytes(body) == d {
		t.Fatal("a lying peer's blob reached the client whole")
	}
	if len(body) >= len(blob) {
		t.Fatalf("client got %d of %d bytes: the final bytes were not held back", len(body), len(blob))
	}
	if !f.bad.has("liar") {
		t.Fatal("the lying peer was not excluded")
	}

	// the retry, as containerd or the kubelet would make it, with both
	// peers advertising the blob
	res.mu.Lock()
	res.peers[d.String()] = []peerCandidate{liar.candidate(), honest.candidate()}
	res.mu.Unlock()
	resp, err = http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || digest.FromBytes(body) != d || resp.Header.Get(headerSource) != "peer honest" {
		t.Fatalf("retry: %v, %d bytes from %q", err, len(body), resp.Header.Get(headerSource))
	}
	if liar.count() != 1 {
		t.Fatalf("the liar was asked %d times, want 1", liar.count())
	}
}

func TestPeerRangeHeadAndMiss(t *testing.T) {
	blob := randomBytes(1 << 20)
	d := digest.FromBytes(blob)
	p := startPeer(t, "p", good, blob, "application/octet-stream")
	res := &fakeResolver{peers: map[string][]peerCandidate{d.String(): {p.candidate()}}}
	srv, _ := peerOnlyServer(t, res)
	url := srv.URL + "/v2/team/app/blobs/" + d.String()

	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Range", "bytes=100-199")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, blob[100:200]) ||
		resp.Header.Get("Content-Range") != "bytes 100-199/"+strconv.Itoa(len(blob)) {
		t.Fatalf("range: %d %q, %d bytes", resp.StatusCode, resp.Header.Get("Content-Range"), len(body))
	}

	resp, err = http.Head(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Length") != strconv.Itoa(len(blob)) ||
		resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("HEAD: %d %v", resp.StatusCode, resp.Header)
	}

	start := time.Now()
	resp, err = http.Get(srv.URL + "/v2/team/app/blobs/" + digest.FromString("none").String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("miss: %d", resp.StatusCode)
	}
	if took := time.Since(start); took > 5*time.Second { // hang detector
		t.Fatalf("a miss took %s", took)
	}

	// a forwarded request never goes to peers
	req, _ = http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set(headerForwarded, peerProtocolVersion)
	before := p.count()
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || p.count() != before {
		t.Fatalf("forwarded request: %d, peer asked %d more times", resp.StatusCode, p.count()-before)
	}
}

// TestPeerTagDisagreement checks the rule for peers that disagree on a tag:
// the most recently updated record wins, whichever answers first.
func TestPeerTagDisagreement(t *testing.T) {
	older := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[],"annotations":{"v":"old"}}`)
	newer := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[],"annotations":{"v":"new"}}`)
	tagPeer := func(id string, m []byte, updated time.Time, delay time.Duration) *httptest.Server {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			time.Sleep(delay)
			w.Header().Set("Content-Type", ocispec.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", digest.FromBytes(m).String())
			w.Header().Set(headerUpdated, formatUpdated(updated))
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(m))
		}))
		t.Cleanup(srv.Close)
		return srv
	}
	fast := tagPeer("fast", older, time.Unix(1000, 0), 0)
	slow := tagPeer("slow", newer, time.Unix(2000, 0), 30*time.Millisecond)
	res := &fakeResolver{peers: map[string][]peerCandidate{
		"registry.test/team/app:v1":      {{id: "fast", url: fast.URL}, {id: "slow", url: slow.URL}},
		digest.FromBytes(newer).String(): {{id: "slow", url: slow.URL}},
		digest.FromBytes(older).String(): {{id: "fast", url: fast.URL}},
	}}
	srv, _ := peerOnlyServer(t, res)
	resp, err := http.Get(srv.URL + "/v2/team/app/manifests/v1?ns=registry.test")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Equal(body, newer) {
		t.Fatalf("tag resolved to %q (%d), want the newer manifest", body, resp.StatusCode)
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/vnd.oci.image.manifest") {
		t.Fatalf("content type %q", resp.Header.Get("Content-Type"))
	}
}

// countingResolver counts lookups and answers none.
type countingResolver struct{ calls atomic.Int32 }

func (r *countingResolver) resolve(ctx context.Context, _ string, _ int) <-chan peerCandidate {
	r.calls.Add(1)
	ch := make(chan peerCandidate)
	go func() {
		<-ctx.Done()
		close(ch)
	}()
	return ch
}

// A key with peers remembered is served from them first: the DHT is asked
// only for a request still running knownFirstWait later.
func TestLookupKnownPeersFirst(t *testing.T) {
	res := &countingResolver{}
	f := newPeerFetcher(res, 200*time.Millisecond, 200*time.Millisecond, time.Second, 3, zap.NewNop())
	defer f.close()
	known := peerCandidate{id: "known", url: "http://127.0.0.1:1"}
	f.recent.add("k", known)

	// served quickly: no lookup
	ctx, cancel := context.WithCancel(context.Background())
	ch := f.lookup(ctx, "k", 3)
	if p := <-ch; p != known {
		t.Fatalf("first candidate = %+v, want the remembered peer", p)
	}
	cancel()
	for range ch {
	}
	time.Sleep(2 * knownFirstWait)
	if n := res.calls.Load(); n != 0 {
		t.Errorf("a request served by a remembered peer asked the DHT %d times", n)
	}

	// still running: the DHT is asked
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	ch = f.lookup(ctx, "k", 3)
	<-ch
	deadline := time.Now().Add(5 * time.Second) // hang detector
	for res.calls.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if res.calls.Load() != 1 {
		t.Errorf("a request still running after knownFirstWait asked the DHT %d times, want 1", res.calls.Load())
	}
	// a key nobody remembers is looked up at once
	f.lookup(ctx, "other", 3)
	for res.calls.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := res.calls.Load(); n != 2 {
		t.Errorf("a key with no remembered peer: %d lookups, want 2", n)
	}
	cancel()
}

// gatedResolver counts lookups and, once released, finds one peer.
type gatedResolver struct {
	calls    atomic.Int32
	canceled atomic.Int32
	release  chan struct{}
	peer     peerCandidate
}

func (r *gatedResolver) resolve(ctx context.Context, _ string, _ int) <-chan peerCandidate {
	r.calls.Add(1)
	ch := make(chan peerCandidate)
	go func() {
		defer close(ch)
		select {
		case <-r.release:
		case <-ctx.Done():
			r.canceled.Add(1)
			return
		}
		select {
		case ch <- r.peer:
		case <-ctx.Done():
		}
	}()
	return ch
}

// A burst of requests for one key makes one DHT lookup, which goes on
// while any of them waits and stops when the last leaves.
func TestLookupShared(t *testing.T) {
	res := &gatedResolver{release: make(chan struct{}), peer: peerCandidate{id: "p", url: "http://127.0.0.1:1"}}
	f := newPeerFetcher(res, 200*time.Millisecond, 200*time.Millisecond, time.Second, 3, zap.NewNop())
	defer f.close()

	const n = 50
	ctxs := make([]context.CancelFunc, n)
	chans := make([]<-chan peerCandidate, n)
	for i := range n {
		ctx, cancel := context.WithCancel(context.Background())
		ctxs[i], chans[i] = cancel, f.lookup(ctx, "k", 3)
	}
	deadline := time.Now().Add(5 * time.Second) // hang detector
	joined := func() int {
		f.recent.mu.Lock()
		defer f.recent.mu.Unlock()
		if e := f.recent.keys["k"]; e != nil && e.lookup != nil {
			return e.lookup.refs
		}
		return 0
	}
	for joined() < n && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	// one request leaves; the others still wait
	ctxs[0]()
	for range chans[0] {
	}
	close(res.release)
	for i := 1; i < n; i++ {
		got := []peerCandidate{}
		for p := range chans[i] {
			got = append(got, p)
		}
		if len(got) != 1 || got[0] != res.peer {
			t.Fatalf("request %d got %v, want the one peer found", i, got)
		}
	}
	if c := res.calls.Load(); c != 1 {
		t.Errorf("%d requests at once made %d lookups, want 1", n, c)
	}
	for _, cancel := range ctxs {
		cancel()
	}

	// a lookup nobody waits for any more is stopped
	res2 := &gatedResolver{release: make(chan struct{})}
	f2 := newPeerFetcher(res2, 200*time.Millisecond, 200*time.Millisecond, time.Second, 3, zap.NewNop())
	defer f2.close()
	ctx, cancel := context.WithCancel(context.Background())
	ch := f2.lookup(ctx, "k", 3)
	for res2.calls.Load() < 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	cancel()
	for range ch {
	}
	for res2.canceled.Load() < 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if res2.canceled.Load() != 1 {
		t.Error("the lookup went on after its only request left")
	}
}
