package caddytest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// loadSettings reads the load test's size: a short form by default (CI),
// longer with PEERMIRROR_LOAD_DURATION and PEERMIRROR_LOAD_CLIENTS (make
// load).
func loadSettings() (time.Duration, int) {
	d, clients := 8*time.Second, 24
	if v, err := time.ParseDuration(os.Getenv("PEERMIRROR_LOAD_DURATION")); err == nil && v > 0 {
		d = v
	}
	if v, err := strconv.Atoi(os.Getenv("PEERMIRROR_LOAD_CLIENTS")); err == nil && v > 0 {
		clients = v
	}
	return d, clients
}

// loadOp is one kind of request the load sends.
type loadOp int

const (
	opTag loadOp = iota
	opManifest
	opBlob
	opRange
	opHead
	opMissing
	opCount
)

var opNames = [...]string{"manifest by tag", "manifest by digest", "blob", "blob range", "HEAD blob", "missing blob"}

// TestLoad runs many clients against three nodes that each hold part of
// the images, for a bounded time: manifests by tag and digest, whole
// blobs, ranges, HEADs and blobs nobody has, through every node's mirror,
// so a mix of local, peer and miss answers. Every answer must be right:
// no failed request, no wrong byte. It logs p50, p99 and the slowest
// answer per kind, and each node's peak RSS, goroutines and heap.
func TestLoad(t *testing.T) {
	skipShort(t)
	duration, clients := loadSettings()
	reg := testenv.StartRegistry(t)
	var imgs []testenv.Image
	for i, size := range []int64{64 << 10, 512 << 10, 2 << 20, 4 << 20} {
		imgs = append(imgs, reg.PushRandomImage(t, fmt.Sprintf("team/load%d", i), "v1", 3, size))
	}
	// a generous resolve timeout: the clients, three Caddy and three
	// containerd share two vCPUs; the test is about right answers
	opts := testenv.NodeOptions{Extra: "resolve_timeout 1s"}
	a := testenv.StartNode(t, "A", upstreamHost, reg.URL, opts)
	opts.Bootstrap = []string{a.Mirror.URL + dht.PeerListPath}
	b := testenv.StartNode(t, "B", upstreamHost, reg.URL, opts)
	c := testenv.StartNode(t, "C", upstreamHost, reg.URL, opts)
	nodes := []*node{a, b, c}
	for i, img := range imgs {
		nodes[i%len(nodes)].Ctrd.PullRef(t, img.Ref(upstreamHost))
	}
	// the expected bytes of every blob, from the registry
	blobs := map[digest.Digest][]byte{}
	for _, img := range imgs {
		for _, d := range append(slices.Clone(img.Layers), img.Configs...) {
			blobs[d] = registryBlob(t, reg, img.Repo, d)
		}
	}
	for _, n := range nodes {
		for _, img := range imgs {
			waitServable(t, n, tagPath(img))
		}
	}
	leaks := make([]func(), len(nodes))
	for i, n := range nodes {
		leaks[i] = leakCheck(t, n)
	}
	before := len(contentRequests(reg))

	var mu sync.Mutex
	lat := make([][]time.Duration, opCount)
	failures := 0
	fail := func(format string, args ...any) {
		mu.Lock()
		failures++
		n := failures
		mu.Unlock()
		if n <= 20 {
			t.Errorf(format, args...)
		}
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true,
		MaxIdleConnsPerHost: clients, MaxConnsPerHost: 0}}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	var wg sync.WaitGroup
	for w := 0; w < clients; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for ctx.Err() == nil {
				n := nodes[rng.IntN(len(nodes))]
				img := imgs[rng.IntN(len(imgs))]
				op := loadOp(rng.IntN(int(opCount)))
				start := time.Now()
				if err := loadRequest(client, n, img, op, blobs, rng); err != nil {
					fail("%s via %s, %s: %v", opNames[op], n.Name, img.Repo, err)
					continue
				}
				mu.Lock()
				lat[op] = append(lat[op], time.Since(start))
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()

	total := 0
	for op, l := range lat {
		total += len(l)
		slices.Sort(l)
		if len(l) == 0 {
			t.Errorf("no %s requests made", opNames[op])
			continue
		}
		q := func(p float64) time.Duration { return l[min(len(l)-1, int(p*float64(len(l))))] }
		t.Logf("%-18s n=%5d p50=%7.2fms p99=%7.2fms max=%7.2fms", opNames[op], len(l),
			ms(q(0.5)), ms(q(0.99)), ms(l[len(l)-1]))
	}
	t.Logf("%d clients for %s: %d answers, %d failed", clients, duration, total, failures)
	for _, n := range nodes {
		t.Logf("%s: peak RSS %.1f MiB", n.Name, float64(peakRSS(n.Mirror.Pid()))/(1<<20))
	}
	// the clients' idle keep-alive connections hold a goroutine each on
	// the servers: close them before counting
	client.CloseIdleConnections()
	for _, check := range leaks {
		check()
	}
	if after := contentRequests(reg); len(after) != before {
		t.Errorf("the registry served %d requests during the load", len(after)-before)
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// registryBlob fetches a blob's bytes straight from the registry.
func registryBlob(t *testing.T, reg *testenv.Registry, repo string, d digest.Digest) []byte {
	t.Helper()
	resp, body, err := fetch(t, http.MethodGet, reg.URL+"/v2/"+repo+"/blobs/"+d.String())
	if err != nil || resp.StatusCode != http.StatusOK || digest.FromBytes(body) != d {
		t.Fatalf("registry blob %s: %v %v", d, resp, err)
	}
	return body
}

// loadRequest sends one request of kind op and checks the answer.
func loadRequest(client *http.Client, n *node, img testenv.Image, op loadOp, blobs map[digest.Digest][]byte,
	rng *rand.Rand) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute) // hang detector
	defer cancel()
	method, path, rangeHeader := http.MethodGet, "", ""
	var want []byte
	wantStatus := http.StatusOK
	layer := img.Layers[rng.IntN(len(img.Layers))]
	switch op {
	case opTag:
		path = tagPath(img)
	case opManifest:
		path = "/v2/" + img.Repo + "/manifests/" + img.Digest.String() + "?ns=" + upstreamHost
	case opBlob:
		path, want = blobPath(img, layer), blobs[layer]
	case opRange:
		b := blobs[layer]
		from := rng.Int64N(int64(len(b)))
		to := from + rng.Int64N(int64(len(b))-from)
		path, want = blobPath(img, layer), b[from:to+1]
		rangeHeader = fmt.Sprintf("bytes=%d-%d", from, to)
		wantStatus = http.StatusPartialContent
	case opHead:
		method, path = http.MethodHead, blobPath(img, layer)
	case opMissing:
		path = blobPath(img, digest.FromString(fmt.Sprintf("nobody has this %d", rng.Int64())))
		wantStatus = http.StatusNotFound
	}
	req, err := http.NewRequestWithContext(ctx, method, n.Mirror.URL+path, nil)
	if err != nil {
		return err
	}
	if rangeHeader != "" {
		req.Header.Set("Range", rangeHeader)
	}
	if op == opTag || op == opManifest {
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading the body: %w", err)
	}
	if resp.StatusCode != wantStatus {
		return fmt.Errorf("status %d, want %d: %s", resp.StatusCode, wantStatus, body[:min(len(body), 200)])
	}
	switch op {
	case opTag, opManifest:
		if digest.FromBytes(body) != img.Digest {
			return fmt.Errorf("manifest bytes of %s, want %s", digest.FromBytes(body), img.Digest)
		}
	case opBlob, opRange:
		if !bytes.Equal(body, want) {
			return fmt.Errorf("%d bytes that differ from the %d expected (%s)", len(body), len(want), rangeHeader)
		}
	case opHead:
		if resp.ContentLength != int64(len(blobs[layer])) || len(body) != 0 {
			return fmt.Errorf("HEAD: Content-Length %d, body %d bytes", resp.ContentLength, len(body))
		}
	case opMissing:
		if !strings.Contains(string(body), "BLOB_UNKNOWN") {
			return fmt.Errorf("404 without BLOB_UNKNOWN: %s", body)
		}
	}
	return nil
}
