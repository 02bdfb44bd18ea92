package caddytest

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/internal/testenv"
)

// slowUpstream puts a proxy in front of the cluster's registry that sends
// blobs at about rate bytes per second, so downloads last long enough for
// other nodes to follow them, and makes the nodes pull through it.
func slowUpstream(t *testing.T, c *netnsCluster, rate int) *testenv.FaultProxy {
	t.Helper()
	p := testenv.StartFaultProxy(t)
	p.SetTarget(t, c.reg.URL)
	const piece = 32 << 10
	p.SetFault(t, testenv.Fault{Mode: testenv.FaultTrickle, TrickleBytes: piece,
		TrickleEvery: time.Second * piece / time.Duration(rate),
		Match: func(r *http.Request) bool {
			return r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/")
		}})
	c.upstream = p.URL
	return p
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
	var total, served int64
	for _, d := range append([]digest.Digest{img.Configs[0]}, img.Layers...) {
		total += img.Sizes[d]
		served += int64(counts[d]) * img.Sizes[d]
	}
	copies := float64(served) / float64(total)
	t.Logf("upstream sent %.2f copies of the image's blobs", copies)
	return nodes, img, counts, copies
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
