package caddytest

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// procStats reads a Caddy's goroutine count (idle keep-alive connections
// left out) and, after a forced GC, its heap in use, through the admin
// endpoint's pprof and expvar routes.
func procStats(t *testing.T, c *testenv.Caddy) (goroutines int, heapInuse uint64) {
	t.Helper()
	get := func(path string) []byte {
		resp, err := testenv.HTTPClient().Get("http://" + c.AdminAddr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
		return b
	}
	// each runs a GC; the second also empties what sync.Pools kept
	// through the first
	get("/debug/pprof/heap?gc=1")
	get("/debug/pprof/heap?gc=1")
	var vars struct {
		MemStats struct {
			HeapInuse uint64
		} `json:"memstats"`
	}
	if err := json.Unmarshal(get("/debug/vars"), &vars); err != nil {
		t.Fatalf("decoding /debug/vars: %v", err)
	}
	return busyGoroutines(t, string(get("/debug/pprof/goroutine?debug=1"))), vars.MemStats.HeapInuse
}

// busyGoroutines counts the goroutines in a goroutine profile (debug=1)
// other than those of idle keep-alive connections, client and server
// side: those are pools bounded by their limits and idle timeouts, not
// leaks.
func busyGoroutines(t *testing.T, profile string) int {
	t.Helper()
	first, rest, _ := strings.Cut(profile, "\n")
	if !strings.HasPrefix(first, "goroutine profile: total ") {
		t.Fatalf("goroutine profile starts %q", first)
	}
	n := 0
	for _, group := range strings.Split(rest, "\n\n") {
		count, _, ok := strings.Cut(strings.TrimSpace(group), " @ ")
		if !ok {
			continue
		}
		c, err := strconv.Atoi(count)
		if err != nil {
			continue
		}
		idle := strings.Contains(group, "(*persistConn).readLoop") ||
			strings.Contains(group, "(*persistConn).writeLoop") ||
			(strings.Contains(group, "net/http.(*conn).serve") && strings.Contains(group, "bufio.(*Reader).Peek"))
		if !idle {
			n += c
		}
	}
	return n
}

// peakRSS returns the peak resident set size of a process, in bytes.
func peakRSS(pid int) uint64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// leakCheck records a node's goroutines and heap now; the function it
// returns checks, at the end of a test, that the goroutines went back to
// about that number and that the heap grew by less than 20 MiB.
func leakCheck(t *testing.T, n *node) func() {
	t.Helper()
	g0, h0 := procStats(t, n.Mirror)
	return func() {
		t.Helper()
		// slack: connections being closed, timers, a DHT query running
		const slack = 25
		deadline := time.Now().Add(30 * time.Second) // hang detector
		for {
			g, h := procStats(t, n.Mirror)
			if g <= g0+slack && h < h0+20<<20 {
				t.Logf("%s: goroutines %d -> %d, heap in use %.1f -> %.1f MiB, peak RSS %.1f MiB", n.Name, g0, g,
					float64(h0)/(1<<20), float64(h)/(1<<20), float64(peakRSS(n.Mirror.Pid()))/(1<<20))
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: goroutines %d -> %d, heap in use %d -> %d bytes: a leak", n.Name, g0, g, h0, h)
				if resp, err := testenv.HTTPClient().Get("http://" + n.Mirror.AdminAddr + "/debug/pprof/goroutine?debug=1"); err == nil {
					b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
					resp.Body.Close()
					t.Logf("%s: goroutines:\n%s", n.Name, b)
				}
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
}

// timedGet sends one GET with a client that never retries and returns the
// status, the body and how long it took.
func timedGet(t *testing.T, url string) (int, []byte, time.Duration) {
	t.Helper()
	start := time.Now()
	resp, body, err := fetch(t, http.MethodGet, url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, body, time.Since(start)
}

// TestPeerGone kills the only node holding an image while its provider
// records stay in the DHT: the other node answers a quick 404 for the
// content (so containerd goes upstream), and its pull completes from the
// registry.
func TestPeerGone(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/gone", "v1", 2, 1<<20)
	a := startNode(t, "A", reg, "")
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitServable(t, b, tagPath(img))
	leaks := leakCheck(t, b)

	a.Mirror.Kill(t)
	for _, path := range []string{tagPath(img), blobPath(img, img.Layers[0])} {
		status, body, took := timedGet(t, b.Mirror.URL+path)
		t.Logf("GET %s with its holder gone: %d in %s", path, status, took.Round(time.Millisecond))
		if status != http.StatusNotFound || !strings.Contains(string(body), `"errors"`) {
			t.Errorf("GET %s = %d %s; want a 404 with an OCI error", path, status, body)
		}
		if took > 10*time.Second { // hang detector; expected: milliseconds
			t.Errorf("the 404 took %s", took)
		}
	}
	if out, err := b.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", b.Ctrd.CertsDir, img.Ref(upstreamHost)); err != nil {
		t.Fatalf("B's pull with A gone: %v\n%s", err, out)
	}
	checkImage(t, b.Ctrd, img)
	leaks()
}

// TestContainerdGC removes an image on A and lets containerd's garbage
// collector delete its content right after A advertised it: A answers 404
// for it, withdraws its keys, B gets a quick 404 for it from its own
// mirror although A's records are still in the DHT, and B's pull
// completes from the registry with the right bytes.
func TestContainerdGC(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/gc", "v1", 2, 1<<20)
	a := startNode(t, "A", reg, "")
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitServable(t, b, tagPath(img))
	leaks := leakCheck(t, a)

	// the CRI plugin keeps a second record named by the image ID (the
	// config digest); the kubelet's image GC removes both, as here
	if out, err := a.Ctrd.Ctr(t, "images", "rm", "--sync", img.Ref(upstreamHost), img.Configs[0].String()); err != nil {
		t.Fatalf("removing the image on A: %v\n%s", err, out)
	}
	for _, d := range img.Layers {
		if _, err := os.Stat(blobFile(a, d)); !os.IsNotExist(err) {
			t.Fatalf("A's garbage collection left layer %s (%v)", d, err)
		}
	}
	layer := blobPath(img, img.Layers[0])
	// A withdraws what it no longer holds
	deadline := time.Now().Add(30 * time.Second) // hang detector; expected: at once
	for {
		var adv struct{ Tags, Digests int }
		adminGet(t, a.Mirror, "/peermirror/advertised", &adv)
		if adv.Tags == 0 && adv.Digests == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A still advertises %+v after the GC", adv)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// B is pointed at A by the records still in the DHT (and by its own
	// recent lookups); A's 404 makes B's a quick 404 too
	status, _, took := timedGet(t, b.Mirror.URL+layer)
	t.Logf("B's mirror for a layer A collected: %d in %s", status, took.Round(time.Millisecond))
	if status != http.StatusNotFound || took > 10*time.Second {
		t.Errorf("B's mirror: %d in %s, want a quick 404", status, took)
	}
	if took > time.Second {
		for _, n := range []*node{a, b} {
			for _, l := range n.Mirror.LogLines(img.Layers[0].Encoded()) {
				t.Logf("%s: %.300s", n.Name, l)
			}
		}
	}
	// A's own clients get a 404 too (asked last: a client that asks A
	// and then does not fetch the blob itself holds A's claim on it, and
	// B would wait for that download until the claim gives up)
	if status, _, took := timedGet(t, a.Mirror.URL+layer); status != http.StatusNotFound {
		t.Errorf("A's mirror after GC: %d in %s, want 404", status, took)
	}
	if out, err := b.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", b.Ctrd.CertsDir, img.Ref(upstreamHost)); err != nil {
		t.Fatalf("B's pull after A's GC: %v\n%s", err, out)
	}
	checkImage(t, b.Ctrd, img)
	leaks()
}

// blobFile is the path of d's committed blob in n's content store.
func blobFile(n *node, d digest.Digest) string {
	return n.Ctrd.ContentDir + "/blobs/" + d.Algorithm().String() + "/" + d.Encoded()
}

// TestContainerdRestartUnderLoad kills and restarts containerd while
// clients keep fetching layers from the node's mirror: every answer is
// either the whole, correct blob or a 404 (containerd gone), never a
// wrong byte, a 5xx or a hang; serving resumes once containerd is back.
func TestContainerdRestartUnderLoad(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/restartload", "v1", 4, 2<<20)
	a := startNode(t, "A", reg, "")
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	leaks := leakCheck(t, a)

	var ok200, ok404, cut atomic.Int64
	var after200 atomic.Int64 // whole blobs served after the restart
	var restarted atomic.Bool
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				d := img.Layers[(i+n)%len(img.Layers)]
				resp, body, err := fetch(t, http.MethodGet, a.Mirror.URL+blobPath(img, d))
				switch {
				case err != nil:
					// a body cut short is allowed (never a wrong one)
					cut.Add(1)
				case resp.StatusCode == http.StatusOK:
					if digest.FromBytes(body) != d {
						t.Errorf("GET %s: 200 with %d bytes of another digest", d, len(body))
					}
					ok200.Add(1)
					if restarted.Load() {
						after200.Add(1)
					}
				case resp.StatusCode == http.StatusNotFound:
					ok404.Add(1)
				default:
					t.Errorf("GET %s: %d %s", d, resp.StatusCode, body)
				}
			}
		}(i)
	}
	time.Sleep(time.Second)
	a.Ctrd.Kill(t)
	time.Sleep(time.Second)
	a.Ctrd.Restart(t)
	restarted.Store(true)
	deadline := time.Now().Add(60 * time.Second) // hang detector; expected: a second or two
	for after200.Load() < 20 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	stop()
	wg.Wait()
	t.Logf("answers: %d whole blobs (%d after the restart), %d 404s, %d cut short",
		ok200.Load(), after200.Load(), ok404.Load(), cut.Load())
	if after200.Load() < 20 {
		t.Errorf("only %d whole blobs after containerd came back", after200.Load())
	}
	if ok404.Load() == 0 {
		t.Errorf("no 404 while containerd was down: the test did not catch it down")
	}
	leaks()
}

// TestManyAdvertisedKeys gives node A 10,000 tags (image records pointing
// at one image) and checks that A advertises all of them, that B resolves
// tags picked among them through the DHT, and that A keeps serving while it
// advertises.
func TestManyAdvertisedKeys(t *testing.T) {
	skipShort(t)
	const tags = 10000
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/many", "v1", 1, 64<<10)
	a := startNode(t, "A", reg, "")
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitServable(t, b, tagPath(img))
	leaks := leakCheck(t, a)

	cl := a.Ctrd.Client(t)
	ctx := namespaces.WithNamespace(context.Background(), a.Ctrd.Namespace)
	target, err := cl.ImageService().Get(ctx, img.Ref(upstreamHost))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for i := 0; i < tags; i++ {
		name := fmt.Sprintf("%s/team/many:t%05d", upstreamHost, i)
		if _, err := cl.ImageService().Create(ctx, images.Image{Name: name, Target: target.Target}); err != nil &&
			!errdefs.IsAlreadyExists(err) {
			t.Fatalf("creating image %s: %v", name, err)
		}
	}
	t.Logf("created %d image records in %s", tags, time.Since(start).Round(time.Millisecond))

	// while A advertises them, its mirror keeps answering
	var served []time.Duration
	deadline := time.Now().Add(5 * time.Minute) // hang detector
	for {
		status, _, took := timedGet(t, a.Mirror.URL+blobPath(img, img.Layers[0]))
		if status != http.StatusOK {
			t.Fatalf("A's mirror while advertising: %d", status)
		}
		served = append(served, took)
		var adv struct{ Tags, Digests int }
		adminGet(t, a.Mirror, "/peermirror/advertised", &adv)
		if adv.Tags >= tags+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A advertises %d tags after %s, want %d", adv.Tags, time.Since(start), tags+1)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("A advertises %d tags %s after the records were made; blob GETs meanwhile: %s",
		tags+1, time.Since(start).Round(time.Millisecond), durationStats(served))

	for _, i := range []int{0, tags / 2, tags - 1} {
		path := fmt.Sprintf("/v2/team/many/manifests/t%05d?ns=%s", i, upstreamHost)
		waitSource(t, b, path, peerID(t, a))
	}
	_, heap := procStats(t, a.Mirror)
	t.Logf("A: heap in use %.1f MiB, peak RSS %.1f MiB", float64(heap)/(1<<20), float64(peakRSS(a.Mirror.Pid()))/(1<<20))
	// the records go: A withdraws them all
	start = time.Now()
	for i := 0; i < tags; i++ {
		name := fmt.Sprintf("%s/team/many:t%05d", upstreamHost, i)
		if err := cl.ImageService().Delete(ctx, name); err != nil {
			t.Fatalf("deleting %s: %v", name, err)
		}
	}
	t.Logf("deleted the records in %s", time.Since(start).Round(time.Millisecond))
	// containerd's CRI plugin, still labelling the images it was told
	// about, re-creates some of them after their deletion; what A
	// advertises must come to match what containerd holds
	deadline = time.Now().Add(3 * time.Minute) // hang detector
	for {
		left, err := cl.ImageService().List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held := 0
		for _, im := range left {
			if strings.Contains(im.Name, ":") && !strings.HasPrefix(im.Name, "sha256:") {
				held++
			}
		}
		var adv struct{ Tags, Digests int }
		adminGet(t, a.Mirror, "/peermirror/advertised", &adv)
		if adv.Tags == held && held < tags/2 {
			t.Logf("A advertises the %d tags containerd still holds, %s after the first deletion",
				held, time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A advertises %d tags; containerd holds %d", adv.Tags, held)
		}
		time.Sleep(200 * time.Millisecond)
	}
	leaks()
}

// durationStats summarizes durations: count, median and slowest.
func durationStats(d []time.Duration) string {
	if len(d) == 0 {
		return "none"
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return fmt.Sprintf("n=%d median %s slowest %s", len(s), s[len(s)/2].Round(time.Microsecond),
		s[len(s)-1].Round(time.Microsecond))
}
