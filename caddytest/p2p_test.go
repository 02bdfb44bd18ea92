package caddytest

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// node is a test cluster member.
type node = testenv.Node

// startNode starts a node mirroring upstreamHost with reg as its upstream;
// bootstrap, when set, is a peer list URL.
func startNode(t *testing.T, name string, reg *testenv.Registry, bootstrap string) *node {
	t.Helper()
	opts := testenv.NodeOptions{}
	if bootstrap != "" {
		opts.Bootstrap = []string{bootstrap}
	}
	return testenv.StartNode(t, name, upstreamHost, reg.URL, opts)
}

// waitServable waits until n's mirror answers path with 200.
func waitServable(t *testing.T, n *node, path string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second) // hang detector
	for {
		resp, _ := n.Mirror.Get(t, path)
		if resp.StatusCode == http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never served %s (last status %d)", n.Name, path, resp.StatusCode)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// contentRequests returns the registry's manifest and blob requests.
func contentRequests(reg *testenv.Registry) []string {
	var out []string
	for _, r := range reg.Requests() {
		if strings.Contains(r, "/manifests/") || strings.Contains(r, "/blobs/") {
			out = append(out, r)
		}
	}
	return out
}

// TestPeerToPeerPull is the main job: node A pulls an image from the
// registry (its mirror misses); nodes B and C then pull it by tag through
// their own mirrors, which fetch from A; the registry serves nothing more.
func TestPeerToPeerPull(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/p2p", "v1", 3, 1<<20)
	multi := reg.PushIndex(t, "team/p2p-multi", "v1", []string{testenv.LocalPlatform(), otherPlatform()}, 2, 256<<10)

	a := startNode(t, "A", reg, "")
	bootstrap := a.Mirror.URL + dht.PeerListPath
	b := startNode(t, "B", reg, bootstrap)
	c := startNode(t, "C", reg, bootstrap)

	// A: mirror first (a miss), then the registry
	for _, im := range []testenv.Image{img, multi} {
		a.Ctrd.PullRef(t, im.Ref(upstreamHost))
		checkImage(t, a.Ctrd, im)
	}
	before := len(contentRequests(reg))
	if before == 0 {
		t.Fatal("A's pull did not reach the registry")
	}

	// B and C find A's tags through the DHT
	for _, n := range []*node{b, c} {
		for _, im := range []testenv.Image{img, multi} {
			waitServable(t, n, "/v2/"+im.Repo+"/manifests/"+im.Tag+"?ns="+upstreamHost)
		}
	}

	// both pull at once, through their own mirrors
	var wg sync.WaitGroup
	for _, n := range []*node{b, c} {
		wg.Add(1)
		go func(n *node) {
			defer wg.Done()
			for _, im := range []testenv.Image{img, multi} {
				if out, err := n.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", n.Ctrd.CertsDir, im.Ref(upstreamHost)); err != nil {
					t.Errorf("%s pulling %s: %v\n%s", n.Name, im.Ref(upstreamHost), err, out)
				}
			}
		}(n)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for _, n := range []*node{b, c} {
		checkImage(t, n.Ctrd, img)
		checkImage(t, n.Ctrd, multi)
		for _, d := range img.Layers {
			if len(n.Mirror.LogLines(`"msg":"served"`, `"source":"peer"`, d.String())) == 0 {
				t.Errorf("%s's mirror did not serve layer %s from a peer", n.Name, d)
			}
		}
	}
	if after := contentRequests(reg); len(after) != before {
		t.Fatalf("the registry served %d more requests after A's pull:\n%s",
			len(after)-before, strings.Join(after[before:], "\n"))
	}
}
