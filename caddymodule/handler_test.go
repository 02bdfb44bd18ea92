package caddymodule

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap/zaptest"

	"github.com/peermirror/peermirror/contentstore"
	"github.com/peermirror/peermirror/internal/testenv"
)

const testRegistry = "registry.test"

// fixture is one real containerd holding the test images, and mirrors
// serving it.
type fixture struct {
	ctrd    *testenv.Containerd
	oci     testenv.Image // OCI manifest, 2 layers
	docker  testenv.Image // Docker schema 2, 1 layer
	index   testenv.Image // OCI index, local platform and one other
	partial testenv.Image // a layer deleted from the store
	missing digest.Digest // the deleted layer
	empty   digest.Digest // the blob {}
	big     digest.Digest // a layer of the OCI image, for ranges
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	if testing.Short() {
		t.Skip("starts containerd and a registry; skipped with -short")
	}
	f := &fixture{ctrd: testenv.StartContainerd(t)}
	reg := testenv.StartRegistry(t)
	f.oci = reg.PushRandomImage(t, "team/oci", "v1", 2, 300<<10)
	f.docker = reg.PushDockerImage(t, "team/docker", "v1", 1, 64<<10)
	other := "linux/arm64"
	if testenv.LocalPlatform() == other {
		other = "linux/amd64"
	}
	f.index = reg.PushIndex(t, "team/multi", "v1", []string{testenv.LocalPlatform(), other}, 1, 32<<10)
	f.partial = reg.PushRandomImage(t, "team/partial", "v1", 2, 16<<10)
	for _, img := range []testenv.Image{f.oci, f.docker, f.index, f.partial} {
		f.ctrd.PullFromRegistry(t, reg, testRegistry, img)
	}
	f.big = f.oci.Layers[0]

	// take a layer away, as garbage collection or a discarded layer would
	c := f.ctrd.Client(t)
	ctx := namespaces.WithNamespace(context.Background(), f.ctrd.Namespace)
	f.missing = f.partial.Layers[1]
	if err := c.ContentStore().Delete(ctx, f.missing); err != nil {
		t.Fatalf("deleting layer: %v", err)
	}

	// the empty JSON object, a valid blob that names no type
	emptyJSON := []byte("{}")
	f.empty = digest.FromBytes(emptyJSON)
	desc := ocispec.Descriptor{Digest: f.empty, Size: int64(len(emptyJSON))}
	// a gc root label keeps garbage collection from taking it
	keep := content.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)})
	if err := content.WriteBlob(ctx, c.ContentStore(), "test-empty", bytes.NewReader(emptyJSON), desc, keep); err != nil {
		t.Fatalf("writing empty blob: %v", err)
	}
	return f
}

// serve starts an HTTP server with a Handler over a real Store of f's
// containerd. A contentDir of "" lets the store find the directory itself.
func (f *fixture) serve(t *testing.T, contentDir string, registries ...string) *httptest.Server {
	t.Helper()
	logger := zaptest.NewLogger(t)
	store := contentstore.New(contentstore.Config{
		Address:    f.ctrd.Socket,
		Namespace:  f.ctrd.Namespace,
		ContentDir: contentDir,
	}, logger)
	if err := store.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	waitFor(t, "store to connect", store.Connected)

	app := &App{Registries: registries, logger: logger}
	app.registries = map[string]bool{}
	for _, r := range registries {
		app.registries[r] = true
	}
	app.store.Store(store)
	h := &Handler{app: app, logger: logger}
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusTeapot)
	})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := h.ServeHTTP(w, r, caddyHandlerFunc(next)); err != nil {
			t.Errorf("handler returned error: %v", err)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

type caddyHandlerFunc http.HandlerFunc

func (f caddyHandlerFunc) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	f(w, r)
	return nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second) // hang detector
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// want is what one response must hold.
type want struct {
	status  int
	code    string            // OCI error code, for errors
	headers map[string]string // exact header values
	body    func(t *testing.T, body []byte)
}

func hasDigest(d digest.Digest) func(*testing.T, []byte) {
	return func(t *testing.T, body []byte) {
		t.Helper()
		if got := digest.FromBytes(body); got != d {
			t.Errorf("body of %d bytes has digest %s, want %s", len(body), got, d)
		}
	}
}

func TestHandlerAgainstContainerd(t *testing.T) {
	f := newFixture(t)
	// one server reads blob files, the other forces containerd's gRPC reader
	paths := map[string]*httptest.Server{
		"files": f.serve(t, "", testRegistry),
		"grpc":  f.serve(t, "/nonexistent/content/dir"),
	}
	for name, srv := range paths {
		t.Run(name, func(t *testing.T) { f.runTable(t, srv) })
	}
}

func (f *fixture) runTable(t *testing.T, srv *httptest.Server) {
	ns := "?ns=" + testRegistry
	ociType := f.oci.MediaTypes[f.oci.Digest]
	bigSize := f.oci.Sizes[f.big]
	blobBytes := f.fetch(t, srv, "/v2/team/oci/blobs/"+f.big.String())
	localManifest := f.index.ManifestFor[testenv.LocalPlatform()]
	var otherLayer digest.Digest
	for p, layers := range f.index.LayersFor {
		if p != testenv.LocalPlatform() {
			otherLayer = layers[0]
		}
	}

	tests := []struct {
		name    string
		method  string // GET and HEAD both when empty
		uri     string
		headers map[string]string
		want    want
	}{
		{name: "base", uri: "/v2/", want: want{status: 200,
			headers: map[string]string{"Docker-Distribution-API-Version": "registry/2.0"}}},
		{name: "manifest by tag", uri: "/v2/team/oci/manifests/v1" + ns, want: want{status: 200,
			headers: map[string]string{
				"Content-Type":          ociType,
				"Docker-Content-Digest": f.oci.Digest.String(),
				"Content-Length":        strconv.FormatInt(f.oci.Sizes[f.oci.Digest], 10),
				"ETag":                  `"` + f.oci.Digest.String() + `"`,
			},
			body: hasDigest(f.oci.Digest)}},
		{name: "manifest by digest without ns", uri: "/v2/team/oci/manifests/" + f.oci.Digest.String(),
			want: want{status: 200, headers: map[string]string{"Content-Type": ociType},
				body: hasDigest(f.oci.Digest)}},
		{name: "docker manifest keeps docker type", uri: "/v2/team/docker/manifests/v1" + ns,
			want: want{status: 200, headers: map[string]string{
				"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"},
				body: hasDigest(f.docker.Digest)}},
		{name: "docker layer keeps docker type", uri: "/v2/team/docker/blobs/" + f.docker.Layers[0].String(),
			want: want{status: 200, headers: map[string]string{
				"Content-Type": "application/vnd.docker.image.rootfs.diff.tar.gzip"},
				body: hasDigest(f.docker.Layers[0])}},
		{name: "index by tag", uri: "/v2/team/multi/manifests/v1" + ns, want: want{status: 200,
			headers: map[string]string{"Content-Type": ocispec.MediaTypeImageIndex},
			body:    hasDigest(f.index.Digest)}},
		{name: "platform manifest by digest", uri: "/v2/team/multi/manifests/" + localManifest.String() + ns,
			want: want{status: 200, headers: map[string]string{"Content-Type": ocispec.MediaTypeImageManifest},
				body: hasDigest(localManifest)}},
		{name: "other platform layer never fetched", uri: "/v2/team/multi/blobs/" + otherLayer.String() + ns,
			want: want{status: 404, code: codeBlobUnknown}},
		{name: "config blob", uri: "/v2/team/oci/blobs/" + f.oci.Configs[0].String() + ns,
			want: want{status: 200, headers: map[string]string{"Content-Type": ocispec.MediaTypeImageConfig},
				body: hasDigest(f.oci.Configs[0])}},
		{name: "layer", uri: "/v2/team/oci/blobs/" + f.big.String() + ns, want: want{status: 200,
			headers: map[string]string{
				"Accept-Ranges":         "bytes",
				"Content-Length":        strconv.FormatInt(bigSize, 10),
				"Docker-Content-Digest": f.big.String(),
				"Content-Type":          f.oci.MediaTypes[f.big],
			},
			body: hasDigest(f.big)}},
		{name: "empty json blob", uri: "/v2/any/blobs/" + f.empty.String(), want: want{status: 200,
			headers: map[string]string{"Content-Type": contentstore.MediaTypeOctetStream, "Content-Length": "2"},
			body:    hasDigest(f.empty)}},
		{name: "range", uri: "/v2/team/oci/blobs/" + f.big.String(), headers: map[string]string{"Range": "bytes=10-19"},
			want: want{status: 206, headers: map[string]string{
				"Content-Range":  "bytes 10-19/" + strconv.FormatInt(bigSize, 10),
				"Content-Length": "10"},
				body: equalBytes(blobBytes[10:20])}},
		{name: "open range resumes", uri: "/v2/team/oci/blobs/" + f.big.String(),
			headers: map[string]string{"Range": "bytes=1000-"},
			want: want{status: 206, headers: map[string]string{
				"Content-Range": "bytes 1000-" + strconv.FormatInt(bigSize-1, 10) + "/" + strconv.FormatInt(bigSize, 10)},
				body: equalBytes(blobBytes[1000:])}},
		{name: "suffix range", uri: "/v2/team/oci/blobs/" + f.big.String(), headers: map[string]string{"Range": "bytes=-7"},
			want: want{status: 206, body: equalBytes(blobBytes[bigSize-7:])}},
		{name: "unsatisfiable range", uri: "/v2/team/oci/blobs/" + f.big.String(),
			headers: map[string]string{"Range": "bytes=" + strconv.FormatInt(bigSize, 10) + "-"},
			want: want{status: 416, code: codeRangeInvalid,
				headers: map[string]string{"Content-Range": "bytes */" + strconv.FormatInt(bigSize, 10)}}},
		{name: "malformed range", uri: "/v2/team/oci/blobs/" + f.big.String(), headers: map[string]string{"Range": "bytes=9-1"},
			want: want{status: 416, code: codeRangeInvalid}},
		{name: "several ranges send all", uri: "/v2/team/oci/blobs/" + f.big.String(),
			headers: map[string]string{"Range": "bytes=0-1,5-6"}, want: want{status: 200, body: hasDigest(f.big)}},
		{name: "if-range mismatch sends all", uri: "/v2/team/oci/blobs/" + f.big.String(),
			headers: map[string]string{"Range": "bytes=0-1", "If-Range": `"sha256:other"`},
			want:    want{status: 200, body: hasDigest(f.big)}},
		{name: "if-none-match", uri: "/v2/team/oci/blobs/" + f.big.String(),
			headers: map[string]string{"If-None-Match": `"` + f.big.String() + `"`}, want: want{status: 304}},
		{name: "tag without ns", uri: "/v2/team/oci/manifests/v1", want: want{status: 404, code: codeManifestUnknown,
			body: containsText("ns")}},
		{name: "unknown tag", uri: "/v2/team/oci/manifests/nope" + ns, want: want{status: 404, code: codeManifestUnknown}},
		{name: "tag of another registry", uri: "/v2/team/oci/manifests/v1?ns=other.test", want: want{status: 404, code: codeManifestUnknown}},
		{name: "unknown blob", uri: "/v2/team/oci/blobs/" + digest.FromString("nothing").String(),
			want: want{status: 404, code: codeBlobUnknown}},
		{name: "deleted layer", uri: "/v2/team/partial/blobs/" + f.missing.String() + ns, want: want{status: 404, code: codeBlobUnknown}},
		{name: "manifest asked as blob", uri: "/v2/team/oci/blobs/" + f.oci.Digest.String(), want: want{status: 404, code: codeBlobUnknown}},
		{name: "layer asked as manifest", uri: "/v2/team/oci/manifests/" + f.big.String(), want: want{status: 404, code: codeManifestUnknown}},
		{name: "invalid digest", uri: "/v2/team/oci/blobs/sha256:abc", want: want{status: 400, code: codeDigestInvalid}},
		{name: "invalid name", uri: "/v2/Team/blobs/" + f.big.String(), want: want{status: 400, code: codeNameInvalid}},
		{name: "post", method: http.MethodPost, uri: "/v2/team/oci/blobs/uploads/", want: want{status: 405,
			code: codeUnsupported, headers: map[string]string{"Allow": "GET, HEAD"}}},
		{name: "delete", method: http.MethodDelete, uri: "/v2/team/oci/manifests/v1", want: want{status: 405, code: codeUnsupported}},
		{name: "outside v2 goes to next handler", uri: "/healthz", want: want{status: http.StatusTeapot}},
	}
	for _, tt := range tests {
		methods := []string{http.MethodGet, http.MethodHead}
		if tt.method != "" {
			methods = []string{tt.method}
		}
		for _, method := range methods {
			t.Run(tt.name+"/"+method, func(t *testing.T) {
				req, err := http.NewRequest(method, srv.URL+tt.uri, nil)
				if err != nil {
					t.Fatal(err)
				}
				for k, v := range tt.headers {
					req.Header.Set(k, v)
				}
				resp, err := srv.Client().Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatalf("reading body: %v", err)
				}
				checkResponse(t, method, resp, body, tt.want)
			})
		}
	}
}

func checkResponse(t *testing.T, method string, resp *http.Response, body []byte, w want) {
	t.Helper()
	if resp.StatusCode != w.status {
		t.Fatalf("status = %d, want %d; body: %s", resp.StatusCode, w.status, body)
	}
	for k, v := range w.headers {
		if got := resp.Header.Get(k); got != v {
			t.Errorf("header %s = %q, want %q", k, got, v)
		}
	}
	if method == http.MethodHead {
		if len(body) != 0 {
			t.Errorf("HEAD sent a body of %d bytes", len(body))
		}
		return
	}
	if cl := resp.Header.Get("Content-Length"); cl != "" && cl != strconv.Itoa(len(body)) {
		t.Errorf("Content-Length %s but body has %d bytes", cl, len(body))
	}
	if w.code != "" {
		var e ociErrors
		if err := json.Unmarshal(body, &e); err != nil || len(e.Errors) != 1 {
			t.Fatalf("error body %q is not one OCI error: %v", body, err)
		}
		if e.Errors[0].Code != w.code || e.Errors[0].Message == "" {
			t.Errorf("error = %+v, want code %s and a message", e.Errors[0], w.code)
		}
	}
	if w.body != nil {
		w.body(t, body)
	}
}

func equalBytes(want []byte) func(*testing.T, []byte) {
	return func(t *testing.T, body []byte) {
		t.Helper()
		if !bytes.Equal(body, want) {
			t.Errorf("body of %d bytes (sha256 %s) differs from the %d bytes wanted", len(body),
				sha(body), len(want))
		}
	}
}

func containsText(s string) func(*testing.T, []byte) {
	return func(t *testing.T, body []byte) {
		t.Helper()
		if !strings.Contains(string(body), s) {
			t.Errorf("body %q does not mention %q", body, s)
		}
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:8])
}

func (f *fixture) fetch(t *testing.T, srv *httptest.Server, uri string) []byte {
	t.Helper()
	resp, err := srv.Client().Get(srv.URL + uri)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", uri, resp.StatusCode, err)
	}
	return b
}
