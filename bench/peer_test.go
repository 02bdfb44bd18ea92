package bench

import (
	"context"
	"io"
	"net/http"
	"net/http/httptrace"
	"testing"
	"time"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

const upstreamHost = "registry.test"

// peerLayerSize is the layer fetched through a peer: 256 MiB unless
// PEERMIRROR_BENCH_PEER_SIZE says otherwise.
func peerLayerSize(b *testing.B) int64 { return envSize(b, "PEERMIRROR_BENCH_PEER_SIZE", 256<<20) }

// BenchmarkPeerBlobGET measures a blob that only node A holds, GET from
// node B's mirror: B finds A through the DHT, fetches from A's mirror and
// checks the digest while streaming. It reports throughput and the time
// to the first byte.
func BenchmarkPeerBlobGET(b *testing.B) {
	size := peerLayerSize(b)
	reg := testenv.StartRegistry(b)
	img := reg.PushRandomImage(b, "bench/peer", "v1", 1, size)
	a := testenv.StartNode(b, "A", upstreamHost, reg.URL, testenv.NodeOptions{Quiet: true})
	nb := testenv.StartNode(b, "B", upstreamHost, reg.URL,
		testenv.NodeOptions{Quiet: true, Bootstrap: []string{a.Mirror.URL + dht.PeerListPath}})
	a.Ctrd.PullRef(b, img.Ref(upstreamHost))
	layer := img.Layers[0]
	url := nb.Mirror.URL + "/v2/" + img.Repo + "/blobs/" + layer.String() + "?ns=" + upstreamHost
	want := img.Sizes[layer]

	// wait until B finds A's layer through the DHT
	deadline := time.Now().Add(time.Minute)
	for {
		resp, _ := nb.Mirror.Get(b, "/v2/"+img.Repo+"/manifests/"+img.Tag+"?ns="+upstreamHost)
		if resp.StatusCode == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("B never found A's image")
		}
		time.Sleep(50 * time.Millisecond)
	}

	client := testenv.HTTPClient()
	var firstBytes time.Duration
	b.SetBytes(want)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var first time.Time
		trace := &httptrace.ClientTrace{GotFirstResponseByte: func() { first = time.Now() }}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace),
			http.MethodGet, url, nil)
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != want || resp.Header.Get("X-Peermirror-Source") == "local" {
			b.Fatalf("GET: %d bytes of %d, source %q, %v", n, want, resp.Header.Get("X-Peermirror-Source"), err)
		}
		firstBytes += first.Sub(start)
	}
	b.ReportMetric(float64(firstBytes.Microseconds())/float64(b.N), "µs-first-byte")
}
