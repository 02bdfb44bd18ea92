package caddytest

import (
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// slowProxy starts a proxy in front of reg that sends blobs at about
// rate bytes per second, so downloads last long enough for other nodes to
// follow them.
func slowProxy(t *testing.T, reg *testenv.Registry, rate int) *testenv.FaultProxy {
	t.Helper()
	p := testenv.StartFaultProxy(t)
	p.SetTarget(t, reg.URL)
	const piece = 32 << 10
	p.SetFault(t, testenv.Fault{Mode: testenv.FaultTrickle, TrickleBytes: piece,
		TrickleEvery: time.Second * piece / time.Duration(rate),
		Match: func(r *http.Request) bool {
			return r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/")
		}})
	return p
}

// slowUpstream makes the cluster's nodes pull through a slowProxy.
func slowUpstream(t *testing.T, c *netnsCluster, rate int) *testenv.FaultProxy {
	t.Helper()
	p := slowProxy(t, c.reg, rate)
	c.upstream = p.URL
	return p
}

// blobCopies returns the copies of img's blobs that counts add up to.
func blobCopies(img testenv.Image, counts map[digest.Digest]int) float64 {
	var total, served int64
	for _, d := range append([]digest.Digest{img.Configs[0]}, img.Layers...) {
		total += img.Sizes[d]
		served += int64(counts[d]) * img.Sizes[d]
	}
	return float64(served) / float64(total)
}

// upstreamBlobs counts the whole blob GETs the upstream answered with 200,
// by digest.
func upstreamBlobs(p *testenv.FaultProxy) map[digest.Digest]int {
	out := map[digest.Digest]int{}
	for _, r := range p.Requests() {
		if r.Method != http.MethodGet || r.Status != http.StatusOK || !strings.Contains(r.URI, "/blobs/") {
			continue
		}
		i := strings.LastIndex(r.URI, "/")
		d, err := digest.Parse(strings.SplitN(r.URI[i+1:], "?", 2)[0])
		if err == nil {
			out[d]++
		}
	}
	return out
}

// waitFullMesh waits until every node knows a mirror for every other: the
// nodes then agree on each digest's coordinator.
func waitFullMesh(t *testing.T, nodes []*node) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second) // hang detector
	for _, n := range nodes {
		for len(peerList(t, n).Peers) < len(nodes) {
			if time.Now().After(deadline) {
				t.Fatalf("%s knows %d of %d nodes", n.Name, len(peerList(t, n).Peers), len(nodes))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// coldStorm starts n nodes in namespaces behind a slow upstream, with
// cold pull coordination on or off, and pulls one image on all of them at
// once. It returns the nodes, the image, the upstream's blob counts and
// the copies of the image's blobs the upstream sent.
func coldStorm(t *testing.T, n int, coordinate bool) ([]*node, testenv.Image, map[digest.Digest]int, float64) {
	nodes, img, counts, copies, _ := coldStormTimed(t, n, coordinate)
	return nodes, img, counts, copies
}

// coldStormTimed is coldStorm that also returns each node's pull time.
func coldStormTimed(t *testing.T, n int, coordinate bool) ([]*node, testenv.Image, map[digest.Digest]int, float64,
	map[string]time.Duration) {
	t.Helper()
	opts := testenv.NodeOptions{}
	if !coordinate {
		opts.Extra = "coordinate_pulls false"
	}
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4}, opts)
	up := slowUpstream(t, c, 8<<20)
	img := c.reg.PushRandomImage(t, "team/storm", "v1", 4, 4<<20)
	var names []string
	for i := 0; i < n; i++ {
		names = append(names, fmt.Sprintf("s%d", i))
	}
	nodes := c.addNodes(t, names...)
	waitFullMesh(t, nodes)

	start := time.Now()
	times := pullAll(t, nodes, img)
	t.Logf("%d cold pulls at once (coordination %v): %s in all; each: %s", n, coordinate,
		time.Since(start).Round(time.Millisecond), roundTimes(times))
	for _, n := range nodes {
		checkImage(t, n.Ctrd, img)
	}
	counts := upstreamBlobs(up)
	copies := blobCopies(img, counts)
	t.Logf("upstream sent %.2f copies of the image's blobs", copies)
	return nodes, img, counts, copies, times
}

// TestNetnsColdStorm: ten nodes pull the same image, which none holds, at
// the same moment, from an upstream that sends each blob slowly. The
// upstream serves each blob about once (at most 1.2 copies of the image's
// bytes), every node ends with the right image, one node fetches each
// layer, and nodes receive bytes of a blob before its fetcher's
// containerd commits it.
func TestNetnsColdStorm(t *testing.T) {
	skipNetns(t)
	nodes, img, counts, copies := coldStorm(t, 10, true)
	for d, k := range counts {
		if k > 1 {
			t.Logf("upstream sent %s %d times", d, k)
		}
	}
	if copies > 1.2 {
		t.Errorf("upstream sent %.2f copies of the image's blobs, want at most 1.2", copies)
		for d, k := range counts {
			if k < 2 {
				continue
			}
			for _, n := range nodes {
				for _, l := range n.Mirror.LogLines(d.Encoded()) {
					if !strings.Contains(l, `"msg":"served"`) {
						t.Logf("%s: %.400s", n.Name, l)
					}
				}
			}
		}
	}
	for _, d := range img.Layers {
		var fetchers []string
		for _, n := range nodes {
			lines := n.Mirror.LogLines(`"msg":"fetching from upstream for the cluster"`, d.String())
			if len(lines) > 0 {
				fetchers = append(fetchers, n.Name)
			}
		}
		if len(fetchers) != 1 {
			t.Errorf("layer %s fetched for the cluster by %v, want one node", d, fetchers)
		}
	}
	// bytes of a download in progress reached a node before its fetcher's
	// containerd committed the blob
	streamedEarly := 0
	for _, d := range img.Layers {
		for _, n := range nodes {
			streams := n.Mirror.LogLines(`"msg":"streaming a download in progress"`, d.String())
			commits := n.Mirror.LogLines(`"msg":"containerd event"`, `"kind":"content_created"`, d.String())
			if len(streams) == 0 || len(commits) == 0 {
				continue
			}
			s, _ := logNumber(streams[0], "ts")
			cm, _ := logNumber(commits[0], "ts")
			if s < cm {
				streamedEarly++
				t.Logf("%s streamed its download of %s %.0f ms before committing it", n.Name, d, (cm-s)*1000)
			}
		}
	}
	if streamedEarly == 0 {
		t.Error("no node streamed a layer before its containerd committed it")
	}
}

// TestNetnsColdStormOff is the same storm with coordination off: every
// node goes upstream, which shows what the coordination saves.
func TestNetnsColdStormOff(t *testing.T) {
	skipNetns(t)
	_, _, _, copies := coldStorm(t, 10, false)
	if copies < 2 {
		t.Errorf("without coordination the upstream sent only %.2f copies: the storm did not happen", copies)
	}
}

// TestNetnsColdFetcherKilled: four nodes pull an image none holds, from a
// slow upstream; once the others follow the fetcher's download, the
// fetcher (Caddy and containerd) is killed. The others' pulls end with the
// right image, retrying as the kubelet does, from upstream after a fast
// fallback or from a new fetcher, within a stated bound.
func TestNetnsColdFetcherKilled(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4}, testenv.NodeOptions{})
	slowUpstream(t, c, 2<<20)
	img := c.reg.PushRandomImage(t, "team/stormkill", "v1", 1, 8<<20) // about 4 s from upstream
	layer := img.Layers[0]
	nodes := c.addNodes(t, "k0", "k1", "k2", "k3")
	waitFullMesh(t, nodes)

	type result struct {
		n        *node
		attempts int
		err      error
		end      time.Time
	}
	results := make(chan result, len(nodes))
	for _, n := range nodes {
		go func(n *node) {
			r := result{n: n}
			for r.attempts < 8 { // the kubelet retries with backoff; here a second apart
				r.attempts++
				out, err := n.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", n.Ctrd.CertsDir, img.Ref(upstreamHost))
				if r.err = err; err == nil {
					break
				}
				r.err = fmt.Errorf("%v: %s", err, lastLines(out, 3))
				time.Sleep(time.Second)
			}
			r.end = time.Now()
			results <- r
		}(n)
	}

	// the fetcher, once another node streams its download
	var fetcher *node
	deadline := time.Now().Add(60 * time.Second) // hang detector
	for fetcher == nil {
		for _, n := range nodes {
			if len(n.Mirror.LogLines(`"msg":"streaming a download in progress"`, layer.String())) > 0 {
				fetcher = n
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no node streamed its download of the layer")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // well into the download
	killed := time.Now()
	fetcher.Mirror.Kill(t)
	fetcher.Ctrd.Kill(t)
	t.Logf("killed %s, the fetcher, mid-download", fetcher.Name)

	for range nodes {
		r := <-results
		if r.n == fetcher {
			continue
		}
		if r.err != nil {
			t.Errorf("%s: %d pulls failed, the last: %v", r.n.Name, r.attempts, r.err)
			continue
		}
		took := r.end.Sub(killed)
		t.Logf("%s: pulled in %d attempts, %s after the kill", r.n.Name, r.attempts, took.Round(time.Millisecond))
		if took > 60*time.Second { // hang detector; expected: seconds
			t.Errorf("%s took %s after the kill", r.n.Name, took)
		}
		checkImage(t, r.n.Ctrd, img)
	}
}

// TestColdPullSmallClusters: with coordination on, a lone node pulls as
// before (it is its own coordinator and fetches everything itself), and
// two nodes pulling at once get the image's blobs from upstream once.
func TestColdPullSmallClusters(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	up := slowProxy(t, reg, 16<<20)
	one := reg.PushRandomImage(t, "team/cold1", "v1", 2, 2<<20)
	two := reg.PushRandomImage(t, "team/cold2", "v1", 2, 4<<20)
	a := testenv.StartNode(t, "A", upstreamHost, up.URL, testenv.NodeOptions{})

	start := time.Now()
	a.Ctrd.PullRef(t, one.Ref(upstreamHost))
	checkImage(t, a.Ctrd, one)
	t.Logf("a lone node pulled in %s", time.Since(start).Round(time.Millisecond))
	if copies := blobCopies(one, upstreamBlobs(up)); copies != 1 {
		t.Errorf("a lone node's pull: %.2f copies from upstream, want 1", copies)
	}
	for _, d := range one.Layers {
		if len(a.Mirror.LogLines(`"msg":"fetching from upstream for the cluster"`, d.String())) == 0 {
			t.Errorf("the lone node did not coordinate its own pull of %s", d)
		}
	}

	b := testenv.StartNode(t, "B", upstreamHost, up.URL,
		testenv.NodeOptions{Bootstrap: []string{a.Mirror.URL + dht.PeerListPath}})
	waitFullMesh(t, []*node{a, b})
	start = time.Now()
	var wg sync.WaitGroup
	for _, n := range []*node{a, b} {
		wg.Add(1)
		go func(n *node) {
			defer wg.Done()
			if out, err := n.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", n.Ctrd.CertsDir, two.Ref(upstreamHost)); err != nil {
				t.Errorf("%s: %v\n%s", n.Name, err, out)
			}
		}(n)
	}
	wg.Wait()
	t.Logf("two nodes pulled at once in %s", time.Since(start).Round(time.Millisecond))
	for _, n := range []*node{a, b} {
		checkImage(t, n.Ctrd, two)
	}
	if copies := blobCopies(two, upstreamBlobs(up)); copies > 1.2 {
		t.Errorf("two nodes: %.2f copies from upstream, want at most 1.2", copies)
	}
}

// TestColdStormTable is a benchmark run by make bench (with
// PEERMIRROR_BENCH_COLD=1): storms of 1, 3 and 10 nodes, with cold pull
// coordination on and off, as a markdown table of upstream copies and
// per-node pull times.
func TestColdStormTable(t *testing.T) {
	if os.Getenv("PEERMIRROR_BENCH_COLD") == "" {
		t.Skip("a benchmark: set PEERMIRROR_BENCH_COLD=1 (make bench does)")
	}
	skipNetns(t)
	var rows []string
	for _, n := range []int{1, 3, 10} {
		for _, on := range []bool{true, false} {
			var copies float64
			var times map[string]time.Duration
			t.Run(fmt.Sprintf("%d-nodes-coordination-%v", n, on), func(t *testing.T) {
				_, _, _, copies, times = coldStormTimed(t, n, on)
			})
			var d []time.Duration
			for _, v := range times {
				d = append(d, v)
			}
			slices.Sort(d)
			if len(d) == 0 {
				continue
			}
			q := func(p float64) time.Duration { return d[min(len(d)-1, int(p*float64(len(d))))] }
			rows = append(rows, fmt.Sprintf("| %d | %v | %.2f | %.2f | %.2f |", n, on, copies, q(0.5).Seconds(), q(0.99).Seconds()))
		}
	}
	t.Logf("cold storms: one image (4 x 4 MiB layers), every node pulling at once from an upstream sending 8 MiB/s per blob\n\n"+
		"| nodes | coordination | upstream copies | pull p50 (s) | pull p99 (s) |\n| --- | --- | --- | --- | --- |\n%s\n",
		strings.Join(rows, "\n"))
}
