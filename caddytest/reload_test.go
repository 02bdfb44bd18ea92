package caddytest

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// TestReloadKeepsNode reloads a node with changed settings: a reference
// filter (the app) and the reprovide interval (the DHT). The filter takes
// effect at once; the libp2p node, its peer ID and its peers stay.
func TestReloadKeepsNode(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/reload", "v1", 1, 64<<10)
	a := startNode(t, "A", reg, "")
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	tag := "/v2/team/reload/manifests/v1?ns=" + upstreamHost
	waitServable(t, b, tag)

	var before, after struct {
		PeerID string `json:"peer_id"`
	}
	adminGet(t, a.Mirror, "/peermirror/node", &before)

	changed := strings.Replace(a.Mirror.Caddyfile(), "\t\tdht {\n",
		"\t\tfilter_reference \"team/reload:v1$\"\n\t\tdht {\n\t\t\treprovide_interval 20s\n", 1)
	if changed == a.Mirror.Caddyfile() {
		t.Fatal("test Caddyfile has no dht block to change")
	}
	a.Mirror.Reload(t, changed)

	// the filter holds on A for its own tag; digests are still served
	if resp, _ := a.Mirror.Get(t, tag); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("filtered tag on A after reload: %d, want 404", resp.StatusCode)
	}
	expectBlob(t, a.Mirror, "/v2/team/reload/blobs/"+img.Layers[0].String(), img.Layers[0])

	// same node: same peer ID, B still finds A's content
	adminGet(t, a.Mirror, "/peermirror/node", &after)
	if after.PeerID == "" || after.PeerID != before.PeerID {
		t.Fatalf("peer ID changed across the reload: %s -> %s", before.PeerID, after.PeerID)
	}
	if len(a.Mirror.LogLines("applied new DHT settings")) == 0 {
		t.Error("A did not apply the new DHT settings in place")
	}
	if lines := a.Mirror.LogLines("peer to peer started", `"shared_with_previous_config":true`); len(lines) == 0 {
		t.Error("the reload did not keep the libp2p node")
	}
	deadline := time.Now().Add(30 * time.Second) // hang detector
	for {
		resp, _ := b.Mirror.Get(t, "/v2/team/reload/blobs/"+img.Layers[0].String()+"?ns="+upstreamHost)
		if resp.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B no longer gets A's layer after A's reload: %d", resp.StatusCode)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// slowGet reads url at about rate bytes per second, pausing after the
// first quarter of the body until hold is closed, and reports whether the
// whole body arrived and matches d; it returns when the body ended.
func slowGet(url string, d digest.Digest, rate int, hold <-chan struct{}) (time.Time, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute) // hang detector
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return time.Time{}, err
	}
	resp, err := plainClient().Do(req)
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return time.Time{}, fmt.Errorf("status %d", resp.StatusCode)
	}
	h := d.Algorithm().Hash()
	buf := make([]byte, 256<<10)
	var n int64
	for {
		k, err := io.ReadFull(resp.Body, buf)
		h.Write(buf[:k])
		n += int64(k)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			break
		}
		if err != nil {
			return time.Time{}, fmt.Errorf("after %d bytes: %w", n, err)
		}
		if hold != nil && n >= resp.ContentLength/4 {
			<-hold
			hold = nil
		}
		time.Sleep(time.Duration(len(buf)) * time.Second / time.Duration(rate))
	}
	end := time.Now()
	if n != resp.ContentLength || digest.NewDigest(d.Algorithm(), h) != d {
		return end, fmt.Errorf("got %d bytes (want %d), digest match %v", n, resp.ContentLength,
			digest.NewDigest(d.Algorithm(), h) == d)
	}
	return end, nil
}

// TestReloadDuringPulls reloads both nodes, several times, while large
// blobs stream through them (from A's own store on A, and from A through
// B's mirror) at a slow client's pace, and while B's containerd pulls the
// image through B's mirror: every transfer ends whole and correct, and
// neither node's peer ID changes.
func TestReloadDuringPulls(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	const layerSize = 32 << 20
	img := reg.PushRandomImage(t, "team/reloadpull", "v1", 3, layerSize)
	a := startNode(t, "A", reg, "")
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitServable(t, b, tagPath(img))
	idA, idB := peerID(t, a), peerID(t, b)
	before := len(contentRequests(reg))
	leaksA, leaksB := leakCheck(t, a), leakCheck(t, b)
	defer leaksA()
	defer leaksB()

	var wg sync.WaitGroup
	var mu sync.Mutex
	var ends []time.Time // when each slow transfer ended
	hold := make(chan struct{})
	errs := make(chan error, 2*len(img.Layers)+1)
	for _, n := range []*node{a, b} {
		for _, d := range img.Layers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// 32 MiB at 8 MiB/s: about four seconds in flight
				end, err := slowGet(n.Mirror.URL+blobPath(img, d), d, 8<<20, hold)
				if err != nil {
					errs <- fmt.Errorf("%s GET %s: %w", n.Name, d, err)
				}
				mu.Lock()
				ends = append(ends, end)
				mu.Unlock()
			}()
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if out, err := b.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", b.Ctrd.CertsDir, img.Ref(upstreamHost)); err != nil {
			errs <- fmt.Errorf("B's pull: %v\n%s", err, out)
		}
	}()

	// reload each node three times while the transfers run (each reader
	// waits, a quarter through, for the reloads to end), changing an app
	// setting each time
	for i := 0; i < 3; i++ {
		time.Sleep(500 * time.Millisecond)
		for _, n := range []*node{a, b} {
			cf := n.Mirror.Caddyfile()
			changed := strings.Replace(cf, "\t\tdht {\n", fmt.Sprintf("\t\thedge_delay %dms\n\t\tdht {\n", 150+i), 1)
			if changed == cf {
				t.Fatal("test Caddyfile has no dht block")
			}
			n.Mirror.Reload(t, changed)
		}
	}
	lastReload := time.Now()
	close(hold)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// the test means something only if the transfers outlived the reloads
	for _, end := range ends {
		if end.Before(lastReload) {
			t.Errorf("a slow transfer ended %s before the last reload", lastReload.Sub(end))
		}
	}
	checkImage(t, b.Ctrd, img)
	if got := peerID(t, a); got != idA {
		t.Errorf("A's peer ID changed: %s -> %s", idA, got)
	}
	if got := peerID(t, b); got != idB {
		t.Errorf("B's peer ID changed: %s -> %s", idB, got)
	}
	if n := len(b.Mirror.LogLines("peer to peer started", `"shared_with_previous_config":true`)); n < 3 {
		t.Errorf("B kept its libp2p node over %d reloads, want 3", n)
	}
	if after := contentRequests(reg); len(after) != before {
		t.Errorf("the registry served %d requests during the reloads:\n%s", len(after)-before,
			strings.Join(after[before:], "\n"))
	}
}
