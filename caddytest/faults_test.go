package caddytest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// faultHang bounds one request or pull in these tests: a hang detector,
// not a performance target.
const faultHang = 90 * time.Second

// proxiedNode is a node whose peers reach its mirror only through a fault
// proxy: its mirror_port is the proxy's port.
type proxiedNode struct {
	*node
	proxy *testenv.FaultProxy
	id    string // libp2p peer ID
}

// startProxiedNode starts a node behind a fresh fault proxy (passing
// everything) whose upstream for upstreamHost is upstream.
func startProxiedNode(t *testing.T, name, upstream, bootstrap string, opts testenv.NodeOptions) *proxiedNode {
	t.Helper()
	p := testenv.StartFaultProxy(t)
	opts.MirrorPort = p.Port
	if bootstrap != "" {
		opts.Bootstrap = append(opts.Bootstrap, bootstrap)
	}
	n := testenv.StartNode(t, name, upstreamHost, upstream, opts)
	p.SetTarget(t, n.Mirror.URL)
	return &proxiedNode{node: n, proxy: p, id: peerID(t, n)}
}

// peerID reads n's libp2p peer ID from its peer list, where n comes first.
// Caddy starts its apps in no fixed order: the list may be missing for a
// moment after the mirror answers.
func peerID(t *testing.T, n *node) string {
	t.Helper()
	deadline := time.Now().Add(faultHang)
	resp, body := n.Mirror.Get(t, dht.PeerListPath)
	for resp.StatusCode != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatalf("%s: GET %s = %d %s", n.Name, dht.PeerListPath, resp.StatusCode, body)
		}
		time.Sleep(50 * time.Millisecond)
		resp, body = n.Mirror.Get(t, dht.PeerListPath)
	}
	pl, err := dht.DecodePeerList(bytes.NewReader(body))
	if err != nil || len(pl.Peers) == 0 {
		t.Fatalf("%s: peer list %s: %v", n.Name, body, err)
	}
	return pl.Peers[0].ID.String()
}

// plainClient sends every request once, on a connection of its own: Go's
// transport retries only on reused connections, so it never retries.
func plainClient() *http.Client {
	return &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true, DisableCompression: true}}
}

// fetch sends one request with a plain client, bounded by faultHang, and
// reads the whole body.
func fetch(t *testing.T, method, url string, header ...string) (*http.Response, []byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), faultHang)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := plainClient().Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

// source returns the peer ID named by a response's X-Peermirror-Source,
// or the header itself when it names no peer.
func source(resp *http.Response) string {
	s := resp.Header.Get("X-Peermirror-Source")
	if id, ok := strings.CutPrefix(s, "peer "); ok {
		return id
	}
	return s
}

// waitSource waits until n's mirror answers HEAD path with 200 relayed
// from the peer id: the lookup on n finds that peer.
func waitSource(t *testing.T, n *node, path, id string) {
	t.Helper()
	deadline := time.Now().Add(faultHang)
	last := ""
	for {
		resp, _, err := fetch(t, http.MethodHead, n.Mirror.URL+path)
		if err == nil {
			last = fmt.Sprintf("%d from %q", resp.StatusCode, source(resp))
			if resp.StatusCode == http.StatusOK && source(resp) == id {
				return
			}
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never served HEAD %s from peer %s (last: %s)", n.Name, path, id, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitLogLines waits up to a few seconds until c's log holds more than
// before lines with every one of parts, and returns the new ones. A
// request is logged once its handler returns, a moment after the client
// has read the response.
func waitLogLines(c *testenv.Caddy, before int, parts ...string) []string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		lines := c.LogLines(parts...)
		if len(lines) > before || time.Now().After(deadline) {
			return lines[min(before, len(lines)):]
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitLog waits until c's log holds a line with every one of parts.
func waitLog(t *testing.T, c *testenv.Caddy, parts ...string) {
	t.Helper()
	deadline := time.Now().Add(faultHang)
	for len(c.LogLines(parts...)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q in %s", parts, faultHang)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// isWhole matches requests without a Range header: whole bodies and HEADs.
func isWhole(r *http.Request) bool { return r.Header.Get("Range") == "" }

// TestFaultPeers asks node C's mirror for a large blob and a manifest by
// tag that nodes A and B both hold, while A, behind a fault proxy,
// misbehaves in one way after another. B answers whole requests only
// after a delay (ranged ones at once), so that A, asked first or by the
// hedge, wins the race for the headers whenever it answers at all. Each
// GET, sent once without retries, must return the whole, correct body; the
// X-Peermirror-Source header names the peer whose headers were relayed,
// and a stream that A breaks must have been resumed from B.
func TestFaultPeers(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/faults", "v1", 1, 24<<20)
	layer := img.Layers[0]
	blobPath := "/v2/" + img.Repo + "/blobs/" + layer.String() + "?ns=" + upstreamHost
	tagPath := "/v2/" + img.Repo + "/manifests/" + img.Tag + "?ns=" + upstreamHost

	b := startProxiedNode(t, "B", reg.URL, "", testenv.NodeOptions{})
	bootstrap := b.Mirror.URL + dht.PeerListPath
	a := startProxiedNode(t, "A", reg.URL, bootstrap, testenv.NodeOptions{})
	c := startNode(t, "C", reg, bootstrap)
	a.Ctrd.PullFromRegistry(t, reg, upstreamHost, img)
	b.Ctrd.PullFromRegistry(t, reg, upstreamHost, img)
	t.Logf("peers: A %s, B %s", a.id, b.id)

	// the expected bytes, from A's own store
	resp, want := a.Mirror.Get(t, blobPath)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(want) != layer {
		t.Fatalf("A's own mirror: GET blob = %d, %d bytes", resp.StatusCode, len(want))
	}

	// C must know both holders: each is found while the other answers 404
	slowB := testenv.Fault{Mode: testenv.FaultPass, Match: isWhole, Delay: 700 * time.Millisecond}
	b.proxy.SetFault(t, testenv.Fault{Mode: testenv.Fault404})
	waitSource(t, c, blobPath, a.id)
	waitSource(t, c, tagPath, a.id)
	a.proxy.SetFault(t, testenv.Fault{Mode: testenv.Fault404})
	b.proxy.SetFault(t, testenv.Fault{})
	waitSource(t, c, blobPath, b.id)
	waitSource(t, c, tagPath, b.id)
	b.proxy.SetFault(t, slowB)
	leaks := leakCheck(t, c)
	defer leaks()

	cases := []struct {
		mode       testenv.FaultMode
		wantSource string // for the blob
		resumed    bool   // B resumes A's broken blob stream
	}{
		{testenv.FaultPass, a.id, false},
		{testenv.FaultRefuse, b.id, false},
		{testenv.FaultSilent, b.id, false},
		{testenv.Fault500, b.id, false},
		{testenv.Fault404, b.id, false},
		{testenv.FaultTrickle, a.id, true},
		{testenv.FaultCloseMidBody, a.id, true},
	}
	for _, tc := range cases {
		t.Run(tc.mode.String(), func(t *testing.T) {
			a.proxy.SetFault(t, testenv.Fault{Mode: tc.mode, CutAfter: 8 << 20,
				TrickleBytes: 1 << 10, TrickleEvery: 100 * time.Millisecond})
			defer a.proxy.SetFault(t, testenv.Fault{})
			seenA, seenB := len(a.proxy.Requests()), len(b.proxy.Requests())
			servedB := len(b.Mirror.LogLines(`"msg":"served"`, `"forwarded":true`, layer.String()))

			// the large blob
			start := time.Now()
			resp, body, err := fetch(t, http.MethodGet, c.Mirror.URL+blobPath)
			if err != nil {
				t.Fatalf("GET blob: %v (after %s)", err, time.Since(start))
			}
			t.Logf("GET blob: %d, %d bytes from %s in %s", resp.StatusCode, len(body), source(resp), time.Since(start))
			if resp.StatusCode != http.StatusOK || !bytes.Equal(body, want) {
				t.Fatalf("GET blob = %d with %d bytes (digest %s), want 200 with %d bytes of %s",
					resp.StatusCode, len(body), digest.FromBytes(body), len(want), layer)
			}
			if got := source(resp); got != tc.wantSource {
				t.Errorf("blob relayed from %q, want %q", got, tc.wantSource)
			}
			newA := a.proxy.Requests()[seenA:]
			if tc.mode == testenv.FaultRefuse && len(newA) != 0 {
				t.Errorf("A's proxy refused connections yet got %v", newA)
			}
			if tc.mode != testenv.FaultRefuse && !slices.ContainsFunc(newA, func(r testenv.ProxiedRequest) bool {
				return r.Method == http.MethodGet && strings.Contains(r.URI, layer.String())
			}) {
				t.Errorf("A was never asked for the blob, so its fault went untested: %v", newA)
			}
			if tc.wantSource == b.id || tc.resumed {
				if len(waitLogLines(b.Mirror, servedB, `"msg":"served"`, `"forwarded":true`, layer.String())) == 0 {
					t.Errorf("B's log shows no forwarded request for the blob")
				}
			}
			if tc.resumed && !slices.ContainsFunc(b.proxy.Requests()[seenB:], func(r testenv.ProxiedRequest) bool {
				return strings.Contains(r.URI, layer.String()) && r.Range != "" && r.Status == http.StatusPartialContent
			}) {
				t.Errorf("B was not asked to resume the blob: %v", b.proxy.Requests()[seenB:])
			}

			// the manifest by tag
			start = time.Now()
			resp, body, err = fetch(t, http.MethodGet, c.Mirror.URL+tagPath)
			if err != nil {
				t.Fatalf("GET manifest by tag: %v (after %s)", err, time.Since(start))
			}
			t.Logf("GET manifest by tag: %d, %d bytes from %s in %s", resp.StatusCode, len(body), source(resp), time.Since(start))
			if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != img.Digest ||
				resp.Header.Get("Docker-Content-Digest") != img.Digest.String() {
				t.Fatalf("GET manifest by tag = %d, digest %s (header %s), want 200 with %s",
					resp.StatusCode, digest.FromBytes(body), resp.Header.Get("Docker-Content-Digest"), img.Digest)
			}
			if got := source(resp); got != tc.wantSource {
				t.Errorf("manifest relayed from %q, want %q", got, tc.wantSource)
			}
		})
	}
}

// TestConcurrentRanges sends 200 ranged GETs of one large blob at once
// through node B's mirror, while only node A holds the blob and B has not
// been asked for it before: every answer must carry exactly the bytes
// asked for, and none may be a miss.
func TestConcurrentRanges(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/ranges", "v1", 1, 24<<20)
	layer := img.Layers[0]
	blobPath := "/v2/" + img.Repo + "/blobs/" + layer.String() + "?ns=" + upstreamHost

	a := startNode(t, "A", reg, "")
	// the 200 requests share one DHT lookup: before they did, their 200
	// lookups took up to 160ms under the race detector on a loaded
	// machine, past the default resolve_timeout of 50ms used here
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullFromRegistry(t, reg, upstreamHost, img)
	resp, want := a.Mirror.Get(t, blobPath)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(want) != layer {
		t.Fatalf("A's own mirror: GET blob = %d, %d bytes", resp.StatusCode, len(want))
	}
	// the burst is the first B hears of the blob: wait until A's record
	// is in the DHT (B is A's only peer) without asking B
	waitLog(t, a.Mirror, `"msg":"provided key"`, layer.String())
	size := int64(len(want))
	leaks := leakCheck(t, b)
	defer leaks()

	type rng struct {
		header   string
		from, to int64 // inclusive
	}
	// 194 chunks covering the blob, as a parallel downloader asks, each
	// bounded but the last; then edge cases: 200 requests at once
	var ranges []rng
	const chunks = 194
	chunk := size/chunks + 1
	for from := int64(0); from < size; from += chunk {
		if from+chunk >= size {
			ranges = append(ranges, rng{fmt.Sprintf("bytes=%d-", from), from, size - 1})
			break
		}
		ranges = append(ranges, rng{fmt.Sprintf("bytes=%d-%d", from, from+chunk-1), from, from + chunk - 1})
	}
	ranges = append(ranges,
		rng{"bytes=0-0", 0, 0},
		rng{"bytes=100-65635", 100, 65635},
		rng{fmt.Sprintf("bytes=%d-%d", size/2, size/2+(4<<20)), size / 2, size/2 + (4 << 20)},
		rng{"bytes=-1000", size - 1000, size - 1},
		rng{fmt.Sprintf("bytes=%d-", size-1), size - 1, size - 1},
		rng{fmt.Sprintf("bytes=1-%d", size+5000), 1, size - 1},
	)
	if len(ranges) != 200 {
		t.Fatalf("built %d ranges, want 200", len(ranges))
	}

	var wg sync.WaitGroup
	start := time.Now()
	durations := make([]time.Duration, len(ranges))
	for i, r := range ranges {
		wg.Add(1)
		go func(i int, r rng) {
			defer wg.Done()
			t0 := time.Now()
			resp, body, err := fetch(t, http.MethodGet, b.Mirror.URL+blobPath, "Range", r.header)
			durations[i] = time.Since(t0)
			if err != nil {
				t.Errorf("Range %s: %v", r.header, err)
				return
			}
			wantCR := fmt.Sprintf("bytes %d-%d/%d", r.from, r.to, size)
			if resp.StatusCode != http.StatusPartialContent || resp.Header.Get("Content-Range") != wantCR {
				t.Errorf("Range %s = %d, Content-Range %q; want 206 with %q (%s)", r.header, resp.StatusCode,
					resp.Header.Get("Content-Range"), wantCR, bytes.TrimSpace(body[:min(len(body), 200)]))
				return
			}
			if !bytes.Equal(body, want[r.from:r.to+1]) {
				t.Errorf("Range %s: %d bytes that differ from the blob's bytes %d-%d", r.header, len(body), r.from, r.to)
			}
		}(i, r)
	}
	wg.Wait()
	slices.Sort(durations)
	t.Logf("%d ranged GETs in %s; per request: median %s, slowest %s", len(ranges), time.Since(start),
		durations[len(durations)/2], durations[len(durations)-1])
}

// pullUntil runs ctr images pull on n up to attempts times, a second
// apart, the way the kubelet retries a failed pull, and returns the
// outputs of the failed attempts. After a failed attempt none of layers
// may be committed.
func pullUntil(t *testing.T, n *node, ref string, attempts int, layers ...digest.Digest) []string {
	t.Helper()
	var failed []string
	for i := 1; i <= attempts; i++ {
		out, err := n.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", n.Ctrd.CertsDir, ref)
		if err == nil {
			t.Logf("%s: pull %d of %s succeeded", n.Name, i, ref)
			return failed
		}
		t.Logf("%s: pull %d of %s failed: %v\n%s", n.Name, i, ref, err, lastLines(out, 4))
		failed = append(failed, out)
		noBlobFiles(t, n, layers...)
		logIngests(t, n)
		watchIngests(t, n, time.Second)
	}
	t.Fatalf("%s: %d pulls of %s failed", n.Name, attempts, ref)
	return nil
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// ingests lists containerd's downloads in progress: the folders under the
// content store's ingest directory, with the size of their data.
func ingests(n *node) map[string]int64 {
	out := map[string]int64{}
	dir := filepath.Join(n.Ctrd.ContentDir, "ingest")
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		ref, _ := os.ReadFile(filepath.Join(dir, e.Name(), "ref"))
		fi, err := os.Stat(filepath.Join(dir, e.Name(), "data"))
		size := int64(-1)
		if err == nil {
			size = fi.Size()
		}
		out[string(ref)] = size
	}
	return out
}

// logIngests logs what ctr content active and the ingest directory show.
func logIngests(t *testing.T, n *node) {
	t.Helper()
	out, err := n.Ctrd.Ctr(t, "content", "active")
	t.Logf("%s: ctr content active (%v):\n%s\ningest directory: %v", n.Name, err, strings.TrimSpace(out), ingests(n))
}

// watchIngests logs, for up to d, when containerd drops the downloads
// left by a failed pull, and what leases remain.
func watchIngests(t *testing.T, n *node, d time.Duration) {
	t.Helper()
	start := time.Now()
	for len(ingests(n)) > 0 && time.Since(start) < d {
		time.Sleep(10 * time.Millisecond)
	}
	if left := ingests(n); len(left) > 0 {
		t.Logf("%s: ingest still there %s after the failed pull: %v", n.Name, d, left)
	} else {
		t.Logf("%s: ingest gone within %s of the failed pull's end", n.Name, time.Since(start).Round(10*time.Millisecond))
	}
	out, _ := n.Ctrd.Ctr(t, "leases", "ls")
	t.Logf("%s: ctr leases ls:\n%s", n.Name, lastLines(out, 5))
	time.Sleep(d - min(d, time.Since(start)))
}

// noBlobFiles checks that none of ds is committed in n's content store.
func noBlobFiles(t *testing.T, n *node, ds ...digest.Digest) {
	t.Helper()
	for _, d := range ds {
		if _, err := os.Stat(filepath.Join(n.Ctrd.ContentDir, "blobs", d.Algorithm().String(), d.Encoded())); err == nil {
			t.Errorf("%s: blob %s committed by a failed pull", n.Name, d)
		}
	}
}

// checkBlobFile checks that the committed blob file of d in n's content
// store holds bytes of that digest.
func checkBlobFile(t *testing.T, n *node, d digest.Digest) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.Ctrd.ContentDir, "blobs", d.Algorithm().String(), d.Encoded()))
	if err != nil {
		t.Fatalf("%s: blob %s not committed: %v", n.Name, d, err)
	}
	if got := digest.FromBytes(b); got != d {
		t.Fatalf("%s: blob file %s holds bytes of %s", n.Name, d, got)
	}
}

// TestWrongBytesPull pulls with real containerd through a mirror whose
// peer A sends the large layer with one byte flipped. The pull may fail
// once, but must never commit a wrong blob, and a retried pull must end
// with the right image. First A is the only holder (its stream is cut
// short, the resume finds no other peer); then B holds the image too and
// a fresh node D pulls, A's stream winning the race (B answers whole
// requests after a delay) so that containerd resumes the cut stream from
// B and finds the digest wrong at commit.
func TestWrongBytesPull(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	lone := reg.PushRandomImage(t, "team/wrong-lone", "v1", 1, 16<<20)
	both := reg.PushRandomImage(t, "team/wrong-both", "v1", 1, 16<<20)
	dead := deadUpstream(t)

	a := startProxiedNode(t, "A", reg.URL, "", testenv.NodeOptions{})
	bootstrap := a.Mirror.URL + dht.PeerListPath
	b := startProxiedNode(t, "B", reg.URL, bootstrap, testenv.NodeOptions{})
	c := testenv.StartNode(t, "C", upstreamHost, dead, testenv.NodeOptions{Bootstrap: []string{bootstrap}})
	d := testenv.StartNode(t, "D", upstreamHost, dead, testenv.NodeOptions{Bootstrap: []string{bootstrap}})
	a.Ctrd.PullFromRegistry(t, reg, upstreamHost, lone)
	a.Ctrd.PullFromRegistry(t, reg, upstreamHost, both)
	b.Ctrd.PullFromRegistry(t, reg, upstreamHost, both)
	b.proxy.SetFault(t, testenv.Fault{Mode: testenv.FaultPass, Match: isWhole, Delay: 700 * time.Millisecond})
	flip := func(layers ...digest.Digest) func(*http.Request) bool {
		return func(r *http.Request) bool {
			return r.Method == http.MethodGet && slices.ContainsFunc(layers, func(l digest.Digest) bool {
				return strings.Contains(r.URL.Path, l.String())
			})
		}
	}
	a.proxy.SetFault(t, testenv.Fault{Mode: testenv.FaultFlipByte, FlipAt: 5 << 20,
		Match: flip(lone.Layers[0], both.Layers[0])})

	// A alone: C's mirror cuts A's stream, the resume finds nobody
	lonePath := "/v2/" + lone.Repo + "/blobs/" + lone.Layers[0].String() + "?ns=" + upstreamHost
	waitSource(t, c, lonePath, a.id)
	out, err := c.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", c.Ctrd.CertsDir, lone.Ref(upstreamHost))
	t.Logf("C: first pull with A the only holder: err %v\n%s", err, lastLines(out, 4))
	logIngests(t, c)
	noBlobFiles(t, c, lone.Layers[0])
	watchIngests(t, c, time.Second)
	if len(c.Mirror.LogLines("peer sent bytes that do not match the digest", a.id, `"peer_excluded":true`)) == 0 {
		t.Errorf("C's mirror did not notice A's wrong bytes, or kept asking A")
	}
	// then B gets the image, and C retries
	b.Ctrd.PullFromRegistry(t, reg, upstreamHost, lone)
	waitSource(t, c, lonePath, b.id)
	seenB := len(b.proxy.Requests())
	pullUntil(t, c, lone.Ref(upstreamHost), 5, lone.Layers[0])
	t.Logf("C's retry asked B: %v", b.proxy.Requests()[seenB:])
	checkImage(t, c.Ctrd, lone)
	checkBlobFile(t, c, lone.Layers[0])

	// A and B: D's mirror takes A's stream, containerd resumes from B
	bothPath := "/v2/" + both.Repo + "/blobs/" + both.Layers[0].String() + "?ns=" + upstreamHost
	b.proxy.SetFault(t, testenv.Fault{Mode: testenv.Fault404})
	waitSource(t, d, bothPath, a.id)
	a.proxy.SetFault(t, testenv.Fault{Mode: testenv.Fault404})
	b.proxy.SetFault(t, testenv.Fault{})
	waitSource(t, d, bothPath, b.id)
	b.proxy.SetFault(t, testenv.Fault{Mode: testenv.FaultPass, Match: isWhole, Delay: 700 * time.Millisecond})
	a.proxy.SetFault(t, testenv.Fault{Mode: testenv.FaultFlipByte, FlipAt: 5 << 20, Match: flip(both.Layers[0])})
	leaks := leakCheck(t, d)
	defer leaks()
	seenA, seenB := len(a.proxy.Requests()), len(b.proxy.Requests())
	failed := pullUntil(t, d, both.Ref(upstreamHost), 5, both.Layers[0])
	t.Logf("D: %d failed pulls before success; A was asked %v; B was asked %v", len(failed),
		a.proxy.Requests()[seenA:], b.proxy.Requests()[seenB:])
	checkImage(t, d.Ctrd, both)
	checkBlobFile(t, d, both.Layers[0])
	logIngests(t, d)
}

// newVersions are the -ldflags of a build that speaks newer peer
// protocol versions: the HTTP forwarded marker, the info document and the
// peer list. The key derivation stays, so old and new share the DHT.
const newVersions = "-X github.com/peermirror/peermirror/caddymodule.peerProtocolVersion=2" +
	" -X github.com/peermirror/peermirror/dht.infoVersion=2" +
	" -X github.com/peermirror/peermirror/dht.peerListVersion=2"

// peerListVersion returns the version field of n's peer list.
func peerListVersion(t *testing.T, n *node) int {
	t.Helper()
	resp, body := n.Mirror.Get(t, dht.PeerListPath)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: GET %s = %d", n.Name, dht.PeerListPath, resp.StatusCode)
	}
	pl, err := dht.DecodePeerList(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("%s: peer list: %v", n.Name, err)
	}
	return pl.Version
}

// markers returns the forwarded markers of the requests a proxy received.
func markers(p *testenv.FaultProxy) map[string]int {
	out := map[string]int{}
	for _, r := range p.Requests() {
		out[r.Header.Get("X-Peermirror-Forwarded")]++
	}
	return out
}

// TestUpgradeMixedVersions runs a cluster halfway through a rolling
// upgrade: B and C run a build with newer peer protocol versions, A the
// current one. A joins through B's newer peer list and C through A's
// older one; B (new) pulls an image that only A (old) holds, and A pulls
// one that only C (new) holds, each through its own mirror with the
// upstream unreachable.
func TestUpgradeMixedVersions(t *testing.T) {
	skipShort(t)
	newBin := testenv.BuildCaddy(t, newVersions)
	reg := testenv.StartRegistry(t)
	fromOld := reg.PushRandomImage(t, "team/upgrade-old", "v1", 2, 1<<20)
	fromNew := reg.PushRandomImage(t, "team/upgrade-new", "v1", 2, 1<<20)
	dead := deadUpstream(t)

	b := startProxiedNode(t, "B", dead, "", testenv.NodeOptions{CaddyBinary: newBin})
	a := startProxiedNode(t, "A", dead, b.Mirror.URL+dht.PeerListPath, testenv.NodeOptions{})
	c := startProxiedNode(t, "C", dead, a.Mirror.URL+dht.PeerListPath, testenv.NodeOptions{CaddyBinary: newBin})
	for n, want := range map[*proxiedNode]int{a: 1, b: 2, c: 2} {
		if got := peerListVersion(t, n.node); got != want {
			t.Fatalf("%s serves peer list version %d, want %d (was the build flag applied?)", n.Name, got, want)
		}
	}

	// new pulls from old
	a.Ctrd.PullFromRegistry(t, reg, upstreamHost, fromOld)
	waitServable(t, b.node, "/v2/"+fromOld.Repo+"/manifests/"+fromOld.Tag+"?ns="+upstreamHost)
	b.Ctrd.PullRef(t, fromOld.Ref(upstreamHost))
	checkImage(t, b.Ctrd, fromOld)

	// old pulls from new
	c.Ctrd.PullFromRegistry(t, reg, upstreamHost, fromNew)
	a.Ctrd.WriteHostsToml(t, upstreamHost, dead, a.Mirror.URL)
	waitServable(t, a.node, "/v2/"+fromNew.Repo+"/manifests/"+fromNew.Tag+"?ns="+upstreamHost)
	a.Ctrd.PullRef(t, fromNew.Ref(upstreamHost))
	checkImage(t, a.Ctrd, fromNew)

	// each side took the other's requests as forwarded, whatever the version
	for _, tc := range []struct {
		server *proxiedNode
		img    testenv.Image
		marker string
	}{{a, fromOld, "2"}, {c, fromNew, "1"}} {
		if m := markers(tc.server.proxy); len(m) != 1 || m[tc.marker] == 0 {
			t.Errorf("%s was asked with forwarded markers %v, want only %q", tc.server.Name, m, tc.marker)
		}
		for _, l := range tc.img.Layers {
			if len(tc.server.Mirror.LogLines(`"msg":"served"`, `"forwarded":true`, l.String())) == 0 {
				t.Errorf("%s did not serve layer %s as a forwarded request", tc.server.Name, l)
			}
		}
	}
}
