package caddytest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// adminGet GETs path on a Caddy's admin endpoint and decodes the JSON.
func adminGet(t *testing.T, c *testenv.Caddy, path string, into any) int {
	t.Helper()
	resp, err := testenv.HTTPClient().Get("http://" + c.AdminAddr + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if into != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, into); err != nil {
			t.Fatalf("GET %s: %v in %s", path, err, body)
		}
	}
	return resp.StatusCode
}

// TestAdminAPI checks the admin routes on two nodes: identity, peers,
// advertised keys and a lookup; then on a Caddy without peermirror.
func TestAdminAPI(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/admin", "v1", 1, 64<<10)
	a := startNode(t, "A", reg, "")
	b := startNode(t, "B", reg, a.Mirror.URL+dht.PeerListPath)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))

	var node struct {
		PeerToPeer bool     `json:"peer_to_peer"`
		PeerID     string   `json:"peer_id"`
		Addrs      []string `json:"addrs"`
		Containerd struct {
			Connected bool `json:"connected"`
		} `json:"containerd"`
	}
	if code := adminGet(t, a.Mirror, "/peermirror/node", &node); code != 200 || !node.PeerToPeer ||
		node.PeerID == "" || len(node.Addrs) == 0 || !node.Containerd.Connected {
		t.Fatalf("node: %d %+v", code, node)
	}

	var adv struct {
		Tags, Digests int
		Keys          []string
	}
	tag := img.Ref(upstreamHost)
	deadline := time.Now().Add(30 * time.Second) // hang detector
	for adminGet(t, a.Mirror, "/peermirror/advertised?keys=true", &adv); !slices.Contains(adv.Keys, tag); adminGet(t, a.Mirror, "/peermirror/advertised?keys=true", &adv) {
		if time.Now().After(deadline) {
			t.Fatalf("A never advertised %s: %+v", tag, adv)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if adv.Tags != 1 || adv.Digests != len(img.All()) {
		t.Fatalf("advertised %d tags and %d digests, want 1 and %d", adv.Tags, adv.Digests, len(img.All()))
	}
	// the same counts on /metrics
	resp, err := testenv.HTTPClient().Get("http://" + a.Mirror.AdminAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metricsBody, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`peermirror_advertised_keys{kind="tag"} 1`,
		fmt.Sprintf(`peermirror_advertised_keys{kind="digest"} %d`, len(img.All()))} {
		if !strings.Contains(string(metricsBody), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	var lookup struct {
		Providers []struct {
			ID        string `json:"id"`
			MirrorURL string `json:"mirror_url"`
		}
	}
	for {
		adminGet(t, b.Mirror, "/peermirror/lookup?timeout=2s&key="+tag, &lookup)
		if len(lookup.Providers) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B's lookup of %s: %+v", tag, lookup)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if p := lookup.Providers[0]; p.ID != node.PeerID || p.MirrorURL != a.Mirror.URL {
		t.Fatalf("B found %+v, want A (%s at %s)", p, node.PeerID, a.Mirror.URL)
	}
	var peers struct {
		Peers []struct{ ID string } `json:"peers"`
	}
	if adminGet(t, b.Mirror, "/peermirror/peers", &peers); len(peers.Peers) == 0 || peers.Peers[0].ID != node.PeerID {
		t.Fatalf("B's peers: %+v", peers)
	}
	if code := adminGet(t, b.Mirror, "/peermirror/lookup", nil); code != http.StatusBadRequest {
		t.Fatalf("lookup without a key: %d", code)
	}

	// a Caddy whose config has no peermirror at all
	plain := testenv.StartCaddy(t, func(port int, admin string) string {
		return "{\n\tadmin " + admin + "\n}\n:" + strconv.Itoa(port) + " {\n\trespond /v2/ 200\n}\n"
	})
	if code := adminGet(t, plain, "/peermirror/node", nil); code != http.StatusServiceUnavailable {
		t.Fatalf("node on a Caddy without peermirror: %d, want 503", code)
	}
}
