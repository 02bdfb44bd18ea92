package caddytest

import (
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// forwardedGet asks n's mirror for path as another node would.
func forwardedGet(t *testing.T, n *node, path string) (*http.Response, []byte, time.Duration) {
	t.Helper()
	start := time.Now()
	resp, body, err := fetch(t, http.MethodGet, n.Mirror.URL+path, "X-Peermirror-Forwarded", "1")
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp, body, time.Since(start)
}

// TestPrivateRegistries: a node whose images come from a registry listed
// in private_registries advertises none of them, serves none of their
// content to other nodes (even asked by digest), and does not look such
// content up among peers; its own containerd is served as before.
func TestPrivateRegistries(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/private", "v1", 1, 1<<20)
	opts := testenv.NodeOptions{Extra: "private_registries " + upstreamHost}
	a := testenv.StartNode(t, "A", upstreamHost, reg.URL, opts)
	opts.Bootstrap = []string{a.Mirror.URL + dht.PeerListPath}
	b := testenv.StartNode(t, "B", upstreamHost, reg.URL, opts)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	checkImage(t, a.Ctrd, img)

	var adv struct{ Tags, Digests int }
	adminGet(t, a.Mirror, "/peermirror/advertised", &adv)
	if adv.Tags != 0 || adv.Digests != 0 {
		t.Errorf("A advertises %+v of a private registry", adv)
	}
	layer := img.Layers[0]
	for _, path := range []string{blobPath(img, layer), "/v2/" + img.Repo + "/blobs/" + layer.String(), tagPath(img)} {
		if resp, _, _ := forwardedGet(t, a, path); resp.StatusCode != http.StatusNotFound {
			t.Errorf("A served %s to a peer: %d", path, resp.StatusCode)
		}
	}
	// A's own clients are served
	if resp, _ := a.Mirror.Get(t, blobPath(img, layer)); resp.StatusCode != http.StatusOK {
		t.Errorf("A's own mirror: %d", resp.StatusCode)
	}
	// B never looks private content up among peers
	if resp, _ := b.Mirror.Get(t, blobPath(img, layer)); resp.StatusCode != http.StatusNotFound {
		t.Errorf("B's mirror for a private layer: %d", resp.StatusCode)
	}
	if n := len(b.Mirror.LogLines(`"msg":"resolved key"`, layer.String())); n != 0 {
		t.Errorf("B looked a private layer up in the DHT %d times", n)
	}
}

// TestUploadLimits: a node with max_uploads 1 answers a second request
// from a peer with a quick 503 while the first runs; a node with
// upload_rate 4MB sends a blob to a peer no faster than that.
func TestUploadLimits(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/limits", "v1", 1, 8<<20)
	capped := testenv.StartNode(t, "A", upstreamHost, reg.URL, testenv.NodeOptions{Extra: "max_uploads 1"})
	slow := testenv.StartNode(t, "B", upstreamHost, reg.URL, testenv.NodeOptions{Extra: "upload_rate 4MB"})
	for _, n := range []*node{capped, slow} {
		n.Ctrd.PullRef(t, img.Ref(upstreamHost))
	}
	layer := img.Layers[0]
	path := blobPath(img, layer)

	// one upload held open by a client that reads nothing
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, capped.Mirror.URL+path, nil)
	req.Header.Set("X-Peermirror-Forwarded", "1")
	held, err := plainClient().Do(req)
	if err != nil || held.StatusCode != http.StatusOK {
		t.Fatalf("first upload: %v %v", held, err)
	}
	resp, body, took := forwardedGet(t, capped, path)
	t.Logf("second upload at the cap: %d in %s", resp.StatusCode, took)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "TOOMANYREQUESTS") ||
		resp.Header.Get("Retry-After") == "" {
		t.Errorf("second upload: %d %s; want a 503 TOOMANYREQUESTS with Retry-After", resp.StatusCode, body)
	}
	if took > 5*time.Second { // hang detector; expected: milliseconds
		t.Errorf("the refusal took %s", took)
	}
	// the node's own containerd is not capped
	if resp, _ := capped.Mirror.Get(t, path); resp.StatusCode != http.StatusOK {
		t.Errorf("own client at the upload cap: %d", resp.StatusCode)
	}
	_, _ = io.Copy(io.Discard, held.Body)
	held.Body.Close()
	if resp, body, _ := forwardedGet(t, capped, path); resp.StatusCode != http.StatusOK || digest.FromBytes(body) != layer {
		t.Errorf("upload after the first ended: %d", resp.StatusCode)
	}

	resp, body, took = forwardedGet(t, slow, path)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(body) != layer {
		t.Fatalf("rate-capped upload: %d, %d bytes", resp.StatusCode, len(body))
	}
	rate := float64(len(body)) / took.Seconds()
	t.Logf("rate-capped upload: %d bytes in %s, %.1f MB/s", len(body), took.Round(time.Millisecond), rate/1e6)
	// 8 MiB at 4 MB/s, less one 256 KiB burst: 2 s at least
	if rate > 4.5e6 {
		t.Errorf("upload_rate 4MB let a peer get %.1f MB/s", rate/1e6)
	}
}

// TestPeerAuth: the nodes' mirrors sit behind Caddy's basic_auth on their
// content paths. With peer_auth set to the credentials, B's mirror gets A's layer
// from A; a node without it gets A's 401 and falls back to a 404.
func TestPeerAuth(t *testing.T) {
	skipShort(t)
	hash, err := testenv.RunCaddy(t, "hash-password", "--plaintext", "s3cret")
	if err != nil {
		t.Fatalf("caddy hash-password: %v\n%s", err, hash)
	}
	// content only: /v2/ itself stays open for the harness's readiness check
	site := "\t@content path_regexp ^/v2/.+\n\tbasic_auth @content {\n\t\tpeer " + strings.TrimSpace(hash) + "\n\t}\n"
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/auth", "v1", 1, 1<<20)
	opts := testenv.NodeOptions{SiteExtra: site, Extra: "peer_auth peer s3cret"}
	a := testenv.StartNode(t, "A", upstreamHost, reg.URL, opts)
	opts.Bootstrap = []string{a.Mirror.URL + dht.PeerListPath}
	b := testenv.StartNode(t, "B", upstreamHost, reg.URL, opts)
	opts.Extra = ""
	c := testenv.StartNode(t, "C", upstreamHost, reg.URL, opts)
	if out, err := a.Ctrd.Ctr(t, "images", "pull", "--user", "peer:s3cret", "--hosts-dir", a.Ctrd.CertsDir,
		img.Ref(upstreamHost)); err != nil {
		t.Fatalf("A's pull through its own guarded mirror: %v\n%s", err, out)
	}
	layer := img.Layers[0]
	// unauthenticated: refused by A's basic_auth
	if resp, _, _ := forwardedGet(t, a, blobPath(img, layer)); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("A served a peer without credentials: %d", resp.StatusCode)
	}
	waitLog(t, a.Mirror, `"msg":"provided key"`, layer.String())
	get := func(n *node) int {
		resp, body, err := fetch(t, http.MethodGet, n.Mirror.URL+blobPath(img, layer), "Authorization", basicAuth("peer", "s3cret"))
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode == http.StatusOK && digest.FromBytes(body) != layer {
			t.Errorf("%s: wrong bytes", n.Name)
		}
		return resp.StatusCode
	}
	deadline := time.Now().Add(30 * time.Second) // hang detector
	for get(b) != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatal("B never got A's layer with peer_auth")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if status := get(c); status != http.StatusNotFound {
		t.Errorf("C, without peer_auth: %d, want 404 (A refuses it)", status)
	}
	if len(c.Mirror.LogLines(`"msg":"peer attempt failed"`, "401")) == 0 {
		t.Error("C's log does not show A's 401")
	}
}

func basicAuth(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}
