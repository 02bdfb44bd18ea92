// Package bench measures peermirror against real parts: a Caddy built with
// the plugin serving a real containerd's content store.
//
//	make bench                      # 1 GiB blob, 5 GETs per case
//	PEERMIRROR_BENCH_SIZE=268435456 make bench
package bench

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/peermirror/peermirror/internal/testenv"
)

// blobSize is the size of the blob served: 1 GiB unless
// PEERMIRROR_BENCH_SIZE says otherwise.
func blobSize(b *testing.B) int64 { return envSize(b, "PEERMIRROR_BENCH_SIZE", 1<<30) }

// envSize reads a byte count from the environment variable name, or
// returns def when it is unset.
func envSize(b *testing.B, name string, def int64) int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q is not a positive byte count", name, s)
	}
	return n
}

// randomReader yields size pseudo-random bytes, fast enough not to slow the
// write into containerd.
type randomReader struct {
	src  *rand.ChaCha8
	left int64
}

func (r *randomReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n, _ := r.src.Read(p)
	r.left -= int64(n)
	return n, nil
}

// setup writes one random blob of size bytes into a fresh containerd. It
// returns the containerd and the blob's URL path.
func setup(b *testing.B, size int64) (*testenv.Containerd, string) {
	b.Helper()
	ctrd := testenv.StartContainerd(b)
	c := ctrd.Client(b)
	ctx := namespaces.WithNamespace(context.Background(), ctrd.Namespace)
	return ctrd, writeRandomBlob(b, ctx, c.ContentStore(), size)
}

// writeRandomBlob writes size pseudo-random bytes (seed 1) into cs as a
// blob kept from garbage collection, and returns its URL path.
func writeRandomBlob(t testing.TB, ctx context.Context, cs content.Store, size int64) string {
	t.Helper()
	// digest first, then write: WriteBlob checks the digest as it commits
	h := digest.SHA256.Digester()
	if _, err := io.Copy(h.Hash(), &randomReader{src: rand.NewChaCha8([32]byte{1}), left: size}); err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: "application/octet-stream", Digest: h.Digest(), Size: size}
	keep := content.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)})
	src := &randomReader{src: rand.NewChaCha8([32]byte{1}), left: size}
	if err := content.WriteBlob(ctx, cs, "bench", src, desc, keep); err != nil {
		t.Fatalf("writing blob: %v", err)
	}
	return "/v2/bench/blob/blobs/" + desc.Digest.String()
}

// startMirror starts a Caddy serving ctrd; contentDir, when set, overrides
// the content directory containerd reports.
func startMirror(b *testing.B, ctrd *testenv.Containerd, contentDir string) *testenv.Caddy {
	contentLine := ""
	if contentDir != "" {
		contentLine = "\t\t\tcontent_dir " + contentDir + "\n"
	}
	mirror := testenv.StartCaddy(b, func(port int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n%s\t\t}\n\t}\n}\n:%d {\n\tpeermirror\n}\n",
			admin, ctrd.Socket, contentLine, port)
	})
	return mirror
}

// get fetches path and discards the body, failing unless want bytes came.
func get(b *testing.B, client *http.Client, url, rangeHeader string, want int64) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		b.Fatal(err)
	}
	if rangeHeader != "" {
		req.Header.Set("Range", rangeHeader)
	}
	resp, err := client.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || n != want || resp.StatusCode/100 != 2 {
		b.Fatalf("GET %s: status %d, %d bytes of %d, %v", url, resp.StatusCode, n, want, err)
	}
}

// BenchmarkBlobGET measures one client GETting a large blob from the
// local store: from the blob file (sendfile), and over containerd's gRPC
// reader (content directory unreadable), whole and as an open range.
func BenchmarkBlobGET(b *testing.B) {
	size := blobSize(b)
	cases := []struct {
		name       string
		contentDir string
		rng        string
		want       int64
	}{
		{name: "file/whole", want: size},
		{name: "file/range-from-middle", rng: fmt.Sprintf("bytes=%d-", size/2), want: size - size/2},
		{name: "file/bounded-range", rng: fmt.Sprintf("bytes=0-%d", size/2-1), want: size / 2},
		{name: "grpc/whole", contentDir: "/nonexistent", want: size},
	}
	// a benchmark with sub-benchmarks runs once: set up here, not in b.Run
	ctrd, path := setup(b, size)
	mirrors := map[string]*testenv.Caddy{}
	for _, tc := range cases {
		if mirrors[tc.contentDir] == nil {
			mirrors[tc.contentDir] = startMirror(b, ctrd, tc.contentDir)
		}
	}
	for _, tc := range cases {
		mirror := mirrors[tc.contentDir]
		b.Run(tc.name, func(b *testing.B) {
			client := testenv.HTTPClient()
			get(b, client, mirror.URL+path, tc.rng, tc.want) // warm the page cache
			b.SetBytes(tc.want)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				get(b, client, mirror.URL+path, tc.rng, tc.want)
			}
		})
	}
}
