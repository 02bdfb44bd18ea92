//go:build linux

package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/peermirror/peermirror/contentstore"
	"github.com/peermirror/peermirror/internal/testenv"
)

// recordingResolver is a peer resolver that records every lookup and
// finds no one.
type recordingResolver struct {
	mu   sync.Mutex
	keys []string
}

func (r *recordingResolver) resolve(ctx context.Context, key string, max int) <-chan peerCandidate {
	r.mu.Lock()
	r.keys = append(r.keys, key)
	r.mu.Unlock()
	ch := make(chan peerCandidate)
	close(ch)
	return ch
}

func (r *recordingResolver) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	keys := r.keys
	r.keys = nil
	return keys
}

// openWatch reports the files opened under a set of folders, through
// inotify.
type openWatch struct {
	fd   int
	dirs map[int32]string
}

func watchOpens(t *testing.T, dirs ...string) *openWatch {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_NONBLOCK | syscall.IN_CLOEXEC)
	if err != nil {
		t.Fatalf("inotify: %v", err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	w := &openWatch{fd: fd, dirs: map[int32]string{}}
	for _, d := range dirs {
		wd, err := syscall.InotifyAddWatch(fd, d, syscall.IN_OPEN|syscall.IN_ACCESS)
		if err != nil {
			t.Fatalf("inotify watch %s: %v", d, err)
		}
		w.dirs[int32(wd)] = d
	}
	return w
}

// take returns the paths opened or read since the last call.
func (w *openWatch) take(t *testing.T) []string {
	t.Helper()
	var out []string
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.Read(w.fd, buf)
		if err == syscall.EAGAIN || n == 0 {
			return out
		}
		if err != nil {
			t.Fatalf("reading inotify events: %v", err)
		}
		for off := 0; off+syscall.SizeofInotifyEvent <= n; {
			ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := buf[off+syscall.SizeofInotifyEvent : off+syscall.SizeofInotifyEvent+int(ev.Len)]
			out = append(out, filepath.Join(w.dirs[ev.Wd], string(bytes.TrimRight(name, "\x00"))))
			off += syscall.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

// badRequestRig is a Handler over a real containerd whose content folder,
// as the mirror sees it, is a copy under watch, next to a file that a path
// trick would aim at; its peer resolver records every lookup.
type badRequestRig struct {
	h        *Handler
	logs     *observer.ObservedLogs
	resolver *recordingResolver
	opens    *openWatch
	blob     []byte
	manifest []byte
	root     string
}

func newBadRequestRig(t *testing.T) *badRequestRig {
	t.Helper()
	if testing.Short() {
		t.Skip("starts containerd; skipped with -short")
	}
	ctrd := testenv.StartContainerd(t)
	rig := &badRequestRig{blob: randomBytes(4 << 10), root: t.TempDir()}
	rig.manifest = []byte(`{"schemaVersion":2,"mediaType":"` + ocispec.MediaTypeImageManifest + `",` +
		`"config":{"mediaType":"` + ocispec.MediaTypeImageConfig + `","digest":"` +
		digest.FromBytes(rig.blob).String() + `","size":4096},"layers":[]}`)

	// both in containerd, and as files in the folder the store reads
	c := ctrd.Client(t)
	ctx := namespaces.WithNamespace(context.Background(), ctrd.Namespace)
	keep := content.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)})
	contentDir := filepath.Join(rig.root, "content")
	blobDir := filepath.Join(contentDir, "blobs", "sha256")
	etc := filepath.Join(rig.root, "etc")
	for _, d := range []string{blobDir, etc} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(etc, "passwd"), []byte("root:x:0:0::/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for i, b := range [][]byte{rig.blob, rig.manifest} {
		d := digest.FromBytes(b)
		desc := ocispec.Descriptor{Digest: d, Size: int64(len(b))}
		if err := content.WriteBlob(ctx, c.ContentStore(), "bad-request-"+string(rune('a'+i)), bytes.NewReader(b), desc, keep); err != nil {
			t.Fatalf("writing blob: %v", err)
		}
		if err := os.WriteFile(filepath.Join(blobDir, d.Encoded()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	core, logs := observer.New(zapcore.DebugLevel)
	logger := zap.New(core)
	store := contentstore.New(contentstore.Config{Address: ctrd.Socket, Namespace: ctrd.Namespace,
		ContentDir: contentDir}, logger)
	if err := store.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	waitFor(t, "store to connect", store.Connected)

	// wired as peerOnlyServer wires its fetcher, with a local store too
	rig.resolver = &recordingResolver{}
	f := newPeerFetcher(rig.resolver, 200*time.Millisecond, 200*time.Millisecond, time.Second, 3, logger)
	t.Cleanup(f.close)
	app := &App{Registries: []string{testRegistry}, registries: map[string]bool{testRegistry: true}, logger: logger}
	app.store.Store(store)
	app.fetcher.Store(f)
	rig.h = &Handler{app: app, logger: logger}
	rig.logs = logs
	rig.opens = watchOpens(t, rig.root, etc, contentDir, filepath.Join(contentDir, "blobs"), blobDir)
	return rig
}

// serve runs r through the Handler itself, so that no server or client
// cleans its path first.
func (rig *badRequestRig) serve(t *testing.T, r *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	rig.logs.TakeAll()
	w := httptest.NewRecorder()
	next := caddyHandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTeapot) })
	if err := rig.h.ServeHTTP(w, r, next); err != nil {
		t.Fatalf("handler returned %v", err)
	}
	return w
}

func TestBadRequests(t *testing.T) {
	rig := newBadRequestRig(t)
	hex := digest.FromBytes(rig.blob).Encoded()
	blob := "sha256:" + hex
	manifest := digest.FromBytes(rig.manifest).String()
	ns := "?ns=" + testRegistry

	// target is sent as the request line's target; path, when set,
	// replaces the parsed path with bytes no request line could carry
	tests := []struct {
		name    string
		methods []string // GET and HEAD when empty
		target  string
		path    string
		status  int
		code    string
	}{
		// path tricks
		{name: "dot dot out of v2", target: "/v2/../etc/passwd", status: 404, code: codeUnsupported},
		{name: "dot dot to a blob", target: "/v2/a/../../blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "dot dot in the name", target: "/v2/../../etc/passwd/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "dot dot after the digest", target: "/v2/a/blobs/" + blob + "/../../../etc/passwd", status: 404,
			code: codeUnsupported},
		{name: "empty name", target: "/v2//blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "empty component", target: "/v2/a//b/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "encoded dots", target: "/v2/%2e%2e/%2e%2e/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "encoded slashes", target: "/v2/a%2F..%2F..%2Fetc/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "encoded slashes out of v2", target: "/v2%2F..%2F..%2Fetc%2Fpasswd", status: 400, code: codeNameInvalid},
		{name: "encoded colon", target: "/v2/a/blobs/sha256%3A" + hex, status: 400, code: codeNameInvalid},
		{name: "encoded letter", target: "/v2/%61/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "encoded nul in the name", target: "/v2/a%00/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "encoded nul in the digest", target: "/v2/a/blobs/" + blob + "%00", status: 400, code: codeDigestInvalid},
		{name: "encoded nul in a tag", target: "/v2/a/manifests/v1%00" + ns, status: 400, code: codeTagInvalid},
		{name: "nul in the name", path: "/v2/a\x00/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "nul in the digest", path: "/v2/a/blobs/sha256:\x00" + hex[1:], status: 400, code: codeDigestInvalid},
		{name: "backslashes", target: `/v2/a\..\..\etc/blobs/` + blob, status: 400, code: codeNameInvalid},
		{name: "backslashes in the digest", target: `/v2/a/blobs/sha256:..\..\` + hex[6:], status: 400, code: codeNameInvalid},
		{name: "bare backslashes", path: `/v2/a\..\..\etc/blobs/` + blob, status: 400, code: codeNameInvalid},
		{name: "registry in the name", target: "/v2/localhost:5000/a/blobs/" + blob, status: 400, code: codeNameInvalid},
		{name: "upper case in the name", target: "/v2/Team/app/blobs/" + blob, status: 400, code: codeNameInvalid},

		// lengths
		{name: "name over 255", target: "/v2/" + strings.Repeat("a", 256) + "/blobs/" + blob, status: 400,
			code: codeNameInvalid},
		{name: "long path name", target: "/v2/" + strings.Repeat("ab/", 90) + "c/blobs/" + blob, status: 400,
			code: codeNameInvalid},
		{name: "tag over 128", target: "/v2/a/manifests/" + strings.Repeat("t", 129) + ns, status: 400,
			code: codeTagInvalid},

		// digests
		{name: "md5", target: "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", status: 400, code: codeDigestInvalid},
		{name: "md5 manifest", target: "/v2/a/manifests/md5:d41d8cd98f00b204e9800998ecf8427e", status: 400,
			code: codeDigestInvalid},
		{name: "sha512 of sha256 length", target: "/v2/a/blobs/sha512:" + hex, status: 400, code: codeDigestInvalid},
		{name: "short hex", target: "/v2/a/blobs/sha256:" + hex[:63], status: 400, code: codeDigestInvalid},
		{name: "long hex", target: "/v2/a/blobs/sha256:" + hex + "0", status: 400, code: codeDigestInvalid},
		{name: "no hex", target: "/v2/a/blobs/sha256:", status: 400, code: codeDigestInvalid},
		{name: "upper case hex", target: "/v2/a/blobs/sha256:" + strings.ToUpper(hex), status: 400, code: codeDigestInvalid},
		{name: "tag as blob", target: "/v2/a/blobs/latest", status: 400, code: codeDigestInvalid},

		// ns
		{name: "tag without ns", target: "/v2/a/manifests/v1", status: 404, code: codeManifestUnknown},
		{name: "ns twice", target: "/v2/a/blobs/" + blob + ns + "&ns=" + testRegistry, status: 400, code: codeNameInvalid},
		{name: "ns twice for a tag", target: "/v2/a/manifests/v1" + ns + "&ns=other.test", status: 400, code: codeNameInvalid},
		{name: "ns with a path", target: "/v2/a/manifests/v1?ns=registry.test/evil", status: 400, code: codeNameInvalid},
		{name: "ns with dot dot", target: "/v2/a/manifests/v1?ns=..", status: 400, code: codeNameInvalid},
		{name: "ns with a space", target: "/v2/a/manifests/v1?ns=a%20b", status: 400, code: codeNameInvalid},
		{name: "ns with nul", target: "/v2/a/manifests/v1?ns=%00", status: 400, code: codeNameInvalid},
		{name: "ns too long", target: "/v2/a/manifests/v1?ns=" + strings.Repeat("%FF", 2000), status: 400,
			code: codeNameInvalid},
		{name: "malformed query", target: "/v2/a/manifests/v1?ns=%zz", status: 400, code: codeNameInvalid},

		// methods
		{name: "writes", methods: []string{"POST", "PUT", "DELETE", "PATCH", "OPTIONS"},
			target: "/v2/a/blobs/" + blob + ns, status: 405, code: codeUnsupported},
		{name: "upload", methods: []string{"POST"}, target: "/v2/a/blobs/uploads/", status: 405, code: codeUnsupported},
		{name: "write to a bad path", methods: []string{"PUT"}, target: "/v2/../etc/passwd", status: 405,
			code: codeUnsupported},

		// content of the wrong kind
		{name: "manifest asked as blob", target: "/v2/a/blobs/" + manifest + ns, status: 404, code: codeBlobUnknown},
		{name: "layer asked as manifest", target: "/v2/a/manifests/" + blob + ns, status: 404, code: codeManifestUnknown},
	}
	for _, tt := range tests {
		methods := tt.methods
		if methods == nil {
			methods = []string{http.MethodGet, http.MethodHead}
		}
		for _, method := range methods {
			t.Run(tt.name+"/"+method, func(t *testing.T) {
				var r *http.Request
				if tt.path != "" {
					r = httptest.NewRequest(method, "/", nil)
					r.URL.Path, r.URL.RawPath, r.RequestURI = tt.path, "", tt.path
				} else {
					r = httptest.NewRequest(method, tt.target, nil)
				}
				w := rig.serve(t, r)
				rig.checkRefused(t, method, w, tt.status, tt.code)
			})
		}
	}

	// the checks above can fail: a good blob is read from the watched
	// folder, and a blob not here is looked up among peers
	t.Run("controls", func(t *testing.T) {
		w := rig.serve(t, httptest.NewRequest(http.MethodGet, "/v2/a/blobs/"+blob+ns, nil))
		if w.Code != http.StatusOK || !bytes.Equal(w.Body.Bytes(), rig.blob) {
			t.Fatalf("good blob: %d, %d bytes", w.Code, w.Body.Len())
		}
		if opened := rig.opens.take(t); !containsPath(opened, hex) {
			t.Fatalf("serving a blob opened %q; the watch saw no blob file", opened)
		}
		missing := digest.FromString("not here").String()
		w = rig.serve(t, httptest.NewRequest(http.MethodGet, "/v2/a/blobs/"+missing+ns, nil))
		if w.Code != http.StatusNotFound {
			t.Fatalf("missing blob: %d", w.Code)
		}
		if keys := rig.resolver.take(); len(keys) == 0 || keys[0] != missing {
			t.Fatalf("a missing blob was looked up as %q, want %s", keys, missing)
		}
	})
}

// checkRefused checks one refusal: the status, one OCI error with the
// code, a debug line saying why, no peer asked and no file opened.
func (rig *badRequestRig) checkRefused(t *testing.T, method string, w *httptest.ResponseRecorder, status int, code string) {
	t.Helper()
	if w.Code != status {
		t.Errorf("status %d, want %d; body %.200q", w.Code, status, w.Body)
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
	if status == http.StatusMethodNotAllowed && w.Header().Get("Allow") != "GET, HEAD" {
		t.Errorf("Allow %q, want GET, HEAD", w.Header().Get("Allow"))
	}
	if method == http.MethodHead {
		if w.Body.Len() != 0 {
			t.Errorf("HEAD sent a body of %d bytes", w.Body.Len())
		}
	} else {
		var body ociErrors
		dec := json.NewDecoder(bytes.NewReader(w.Body.Bytes()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&body); err != nil || len(body.Errors) != 1 {
			t.Errorf("body %.300q is not one OCI error: %v", w.Body, err)
		} else if e := body.Errors[0]; e.Code != code || e.Message == "" || len(e.Message) > 256 {
			t.Errorf("error %+.300v, want code %s and a short message", e, code)
		}
	}

	refused := rig.logs.FilterMessage("request refused").FilterField(zap.String("code", code)).
		FilterField(zap.Int("status", status)).All()
	if len(refused) != 1 || refused[0].Level != zapcore.DebugLevel {
		var logged []string
		for _, e := range rig.logs.All() {
			logged = append(logged, fmt.Sprintf("%s %s %v", e.Level, e.Message, e.ContextMap()))
		}
		t.Errorf("logged %.500q, want one debug line for the refusal", logged)
	}
	if keys := rig.resolver.take(); len(keys) != 0 {
		t.Errorf("peers were asked about %q", keys)
	}
	if opened := rig.opens.take(t); len(opened) != 0 {
		t.Errorf("files opened: %q", opened)
	}
}

func containsPath(paths []string, part string) bool {
	for _, p := range paths {
		if strings.Contains(p, part) {
			return true
		}
	}
	return false
}
