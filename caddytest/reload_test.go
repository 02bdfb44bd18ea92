package caddytest

import (
	"net/http"
	"strings"
	"testing"
	"time"

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
