package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// The harness (make bench, BENCH_QUICK=1 for the short form) measures
// whole processes and writes BENCHMARKS.md: local serving against the
// registry and Caddy's file_server, latency through a peer with 3 and 10
// nodes, memory and start-up with many advertised keys. It reports; it
// does not fail on a missed target (only on wrong bytes or errors).

// harness collects the report.
type harness struct {
	quick  bool
	out    strings.Builder
	local1 float64 // local serving, one stream, GiB/s: the reference for peer serving
}

func (h *harness) printf(format string, args ...any) { fmt.Fprintf(&h.out, format, args...) }

func TestHarness(t *testing.T) {
	if os.Getenv("PEERMIRROR_BENCH_HARNESS") == "" {
		t.Skip("the benchmark harness: make bench (BENCH_QUICK=1 make bench for the short form)")
	}
	h := &harness{quick: os.Getenv("BENCH_QUICK") != ""}
	start := time.Now()
	mode := "full"
	if h.quick {
		mode = "quick (BENCH_QUICK=1: smaller blobs, fewer requests; figures are rougher)"
	}
	h.printf("# Benchmarks\n\nWritten by `make bench` on %s; mode: %s.\n\n%s\n", time.Now().UTC().Format("2006-01-02 15:04 MST"),
		mode, machine())
	h.printf("Every figure comes from one run on this machine, where the clients, the servers and the hashing share " +
		"the CPUs; ratios against a reference measured in the same run drift less than the raw figures.\n\n")
	// each section starts once the last one's files are on disk: the
	// write-back of a GiB blob otherwise lands in the next one's latencies
	for _, section := range []struct {
		name string
		run  func(*testing.T)
	}{{"local", h.local}, {"peer", h.peer}, {"latency", h.latency}, {"rollout", h.rollout}, {"memory", h.memory}} {
		syscall.Sync()
		t.Run(section.name, section.run)
	}
	h.printf("\nThe sections above took %s.\n", time.Since(start).Round(time.Second))
	path := filepath.Join("..", "BENCHMARKS.md")
	if dir := os.Getenv("PEERMIRROR_BENCH_OUT"); dir != "" {
		path = dir
	}
	if err := os.WriteFile(path, []byte(h.out.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s:\n%s", path, h.out.String())
}

// machine describes the machine the figures come from.
func machine() string {
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
		f.Close()
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		first, _, _ := strings.Cut(string(b), "\n")
		if kb, err := strconv.ParseInt(strings.Fields(first)[1], 10, 64); err == nil {
			mem = fmt.Sprintf(", %.1f GiB of memory", float64(kb)/(1<<20))
		}
	}
	kernel, _ := exec.Command("uname", "-r").Output()
	return fmt.Sprintf("Machine: %d vCPUs (%s)%s, Linux %s, %s.\n", runtime.NumCPU(), model, mem,
		strings.TrimSpace(string(kernel)), runtime.Version())
}

// cpuSeconds returns the user and system CPU time a process has used.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndex(s, ")")+2:])
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // clock ticks; 100 a second on Linux
}

// rss returns a process's resident set size and its peak, in MiB.
func rss(pid int) (cur, peak float64) {
	st := procStatus(pid)
	return st["VmRSS"], st["VmHWM"]
}

// procStatus returns the sizes in a process's /proc status file (VmRSS,
// VmHWM, RssAnon, RssFile...), in MiB.
func procStatus(pid int) map[string]float64 {
	out := map[string]float64{}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || f[2] != "kB" {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		out[strings.TrimSuffix(f[0], ":")] = kb / 1024
	}
	return out
}

// settledRSS waits up to 30 s for a process's resident set to stop
// shrinking (the Go runtime hands freed memory back to the kernel over
// some seconds after a burst of work) and returns it with its anonymous
// part, in MiB.
func settledRSS(pid int) (cur, anon float64) {
	last := procStatus(pid)
	for i := 0; i < 15; i++ {
		time.Sleep(2 * time.Second)
		st := procStatus(pid)
		if st["VmRSS"] >= last["VmRSS"]-0.5 {
			return st["VmRSS"], st["RssAnon"]
		}
		last = st
	}
	return last["VmRSS"], last["RssAnon"]
}

// throughput GETs url with streams clients at once, rounds times each,
// and returns the best aggregate rate in GiB/s and the server's CPU
// seconds per GiB over all rounds.
func throughput(t *testing.T, url string, size int64, streams, rounds, pid int) (float64, float64) {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true, MaxIdleConnsPerHost: streams}}
	defer client.CloseIdleConnections()
	best := 0.0
	cpu0 := cpuSeconds(pid)
	var moved int64
	for r := 0; r < rounds; r++ {
		var wg sync.WaitGroup
		start := time.Now()
		for s := 0; s < streams; s++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := client.Get(url)
				if err != nil {
					t.Error(err)
					return
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || n != size || resp.StatusCode != http.StatusOK {
					t.Errorf("GET %s: %d, %d of %d bytes, %v", url, resp.StatusCode, n, size, err)
				}
			}()
		}
		wg.Wait()
		moved += int64(streams) * size
		best = max(best, float64(int64(streams)*size)/(1<<30)/time.Since(start).Seconds())
	}
	return best, (cpuSeconds(pid) - cpu0) / (float64(moved) / (1 << 30))
}

// pushBlob uploads size pseudo-random bytes (seed 1, the same bytes as
// setup writes into containerd) to the registry, monolithically.
func pushBlob(t *testing.T, reg *testenv.Registry, repo string, size int64, d digest.Digest) {
	t.Helper()
	resp, err := http.Post(reg.URL+"/v2/"+repo+"/blobs/uploads/", "application/octet-stream", nil)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("starting an upload: %v %v", resp, err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "http") {
		loc = reg.URL + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	req, _ := http.NewRequest(http.MethodPut, loc+sep+"digest="+d.String(),
		&randomReader{src: rand.NewChaCha8([32]byte{1}), left: size})
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("uploading the blob: %v %v", resp, err)
	}
	resp.Body.Close()
}

// local measures one blob served from this node's containerd against the
// registry and Caddy's file_server serving the same bytes.
func (h *harness) local(t *testing.T) {
	size := int64(1 << 30)
	rounds := 3
	if h.quick {
		size, rounds = 128<<20, 2
	}
	ctrd, path := setup2(t, size)
	d := digest.Digest(path[strings.LastIndex(path, "/")+1:])
	mirror := startMirrorT(t, ctrd)

	reg := testenv.StartRegistry(t)
	pushBlob(t, reg, "bench/blob", size, d)

	dir := t.TempDir()
	blobFile := filepath.Join(ctrd.ContentDir, "blobs", "sha256", d.Encoded())
	if err := os.Link(blobFile, filepath.Join(dir, "blob")); err != nil {
		b, err := os.ReadFile(blobFile)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "blob"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	fileServer := testenv.StartCaddy(t, func(port int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n}\n:%d {\n\troot * %s\n\tfile_server\n\trespond /v2/ 200\n}\n", admin, port, dir)
	})

	type server struct {
		name string
		url  string
		pid  int
	}
	servers := []server{
		{"peermirror (containerd's blob file)", mirror.URL + path, mirror.Pid()},
		{"distribution registry 3.1.2", reg.URL + "/v2/bench/blob/blobs/" + d.String(), reg.Pid()},
		{"Caddy file_server", fileServer.URL + "/blob", fileServer.Pid()},
	}
	h.printf("## 1. Local blob serving\n\nGET of one %s blob held by this node, best of %d rounds, one stream and four "+
		"at once (aggregate), with the server's CPU seconds per GiB sent. Target: peermirror at least 1.0 of the "+
		"registry. peermirror sends the blob file with sendfile(2) (`strace -c` on the Caddy process during GETs "+
		"shows only sendfile calls of 64 KiB on the data path, no read/write pairs).\n\n", sizeName(size), rounds)
	h.printf("| server | 1 stream GiB/s | CPU s/GiB | 4 streams GiB/s | CPU s/GiB | 1 stream vs registry | 4 streams vs registry |\n")
	h.printf("| --- | --- | --- | --- | --- | --- | --- |\n")
	type result struct{ one, cpu1, four, cpu4 float64 }
	res := make([]result, len(servers))
	for i, s := range servers {
		res[i].one, res[i].cpu1 = throughput(t, s.url, size, 1, rounds, s.pid)
		res[i].four, res[i].cpu4 = throughput(t, s.url, size, 4, rounds, s.pid)
	}
	for i, s := range servers {
		h.printf("| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", s.name, res[i].one, res[i].cpu1, res[i].four,
			res[i].cpu4, res[i].one/res[1].one, res[i].four/res[1].four)
	}
	h.printf("\n")
	h.local1 = res[0].one
	profileCPU(t, nil, mirror.AdminAddr, servers[0].url, "local", mirror.Pid())
}

// peer measures a blob fetched through a second node from the first, the
// nodes in two network namespaces, against a plain Caddy reverse_proxy in
// front of a plain file_server over the same two hops.
func (h *harness) peer(t *testing.T) {
	if os.Geteuid() != 0 {
		h.printf("## 2. Peer serving\n\nSkipped: network namespaces need root.\n\n")
		return
	}
	size := int64(1 << 30)
	rounds := 3
	if h.quick {
		size, rounds = 128<<20, 2
	}
	reg := testenv.StartRegistry(t)
	img := reg.PushUncompressedImage(t, "bench/peer", "v1", 1, size)
	layer := img.Layers[0]
	size = img.Sizes[layer]
	network := testenv.NewNetwork(t, testenv.NetworkOptions{Family: testenv.IPv4})
	ha, hb := network.AddHost(t, "a"), network.AddHost(t, "b")
	a := testenv.StartNode(t, "A", "registry.test", reg.URL, testenv.NodeOptions{Host: ha, Quiet: true})
	b := testenv.StartNode(t, "B", "registry.test", reg.URL,
		testenv.NodeOptions{Host: hb, Quiet: true, Bootstrap: []string{a.Mirror.URL + dht.PeerListPath}})
	a.Ctrd.PullRef(t, img.Ref("registry.test"))
	path := "/v2/" + img.Repo + "/blobs/" + layer.String() + "?ns=registry.test"
	deadline := time.Now().Add(2 * time.Minute)
	for {
		resp, err := http.Head(b.Mirror.URL + path)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get("X-Peermirror-Source"), "peer ") {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("B never found A's layer")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// the reference: file_server in A's namespace, reverse_proxy in B's
	dir := t.TempDir()
	blobFile := filepath.Join(a.Ctrd.ContentDir, "blobs", "sha256", layer.Encoded())
	if err := os.Link(blobFile, filepath.Join(dir, "blob")); err != nil {
		t.Fatal(err)
	}
	const port = 30080
	files := testenv.StartCaddy(t, func(_ int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n}\n:%d {\n\troot * %s\n\trespond /v2/ 200\n\tfile_server\n}\n", admin, port, dir)
	}, testenv.InNetns(ha.Netns), testenv.WithMirrorAddr(ha.Addrs[0], port))
	proxy := testenv.StartCaddy(t, func(_ int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n}\n:%d {\n\treverse_proxy %s\n}\n", admin, port,
			strings.TrimPrefix(files.URL, "http://"))
	}, testenv.InNetns(hb.Netns), testenv.WithMirrorAddr(hb.Addrs[0], port))

	mirrorRate, mirrorCPU := throughput(t, b.Mirror.URL+path, size, 1, rounds, b.Mirror.Pid())
	proxyRate, proxyCPU := throughput(t, proxy.URL+"/blob", size, 1, rounds, proxy.Pid())
	profileCPU(t, hb, b.Mirror.AdminAddr, b.Mirror.URL+path, "peer-B", b.Mirror.Pid())
	profileCPU(t, hb, proxy.AdminAddr, proxy.URL+"/blob", "peer-reverse_proxy", proxy.Pid())
	h.printf("## 2. Peer serving\n\nOne %s layer held by node A, fetched by a client through node B's mirror (B "+
		"looks it up in the DHT, fetches it from A and checks its digest while streaming, hashing on a second "+
		"goroutine: "+
		"SHA-256 alone costs about 0.6 CPU s/GiB here), the nodes in two network "+
		"namespaces; best of %d. Reference over the same two hops: a plain Caddy `reverse_proxy` in B's namespace in "+
		"front of a plain `file_server` in A's. Targets: at least 0.8 of local serving (section 1), and at least the "+
		"plain two-hop figure.\n\n", sizeName(size), rounds)
	h.printf("| path | GiB/s | CPU s/GiB (B's process) | vs local serving | vs plain two hops |\n| --- | --- | --- | --- | --- |\n")
	h.printf("| peermirror, B from A | %.2f | %.2f | %.2f | %.2f |\n", mirrorRate, mirrorCPU, mirrorRate/h.local1,
		mirrorRate/proxyRate)
	h.printf("| reverse_proxy to file_server | %.2f | %.2f | %.2f | 1.00 |\n\n", proxyRate, proxyCPU, proxyRate/h.local1)
}

// setup2 is setup for a *testing.T.
func setup2(t *testing.T, size int64) (*testenv.Containerd, string) {
	t.Helper()
	ctrd := testenv.StartContainerd(t)
	c := ctrd.Client(t)
	ctx := namespaces.WithNamespace(context.Background(), ctrd.Namespace)
	return ctrd, writeRandomBlob(t, ctx, c.ContentStore(), size)
}

// startMirrorT starts a Caddy with peermirror serving ctrd.
func startMirrorT(t *testing.T, ctrd *testenv.Containerd) *testenv.Caddy {
	return testenv.StartCaddy(t, func(port int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n\t\t}\n\t}\n}\n:%d {\n\tpeermirror\n}\n",
			admin, ctrd.Socket, port)
	})
}

func sizeName(n int64) string {
	if n >= 1<<30 {
		return fmt.Sprintf("%d GiB", n>>30)
	}
	return fmt.Sprintf("%d MiB", n>>20)
}

// quantiles returns the p50 and p99 of d, in ms.
func quantiles(d []time.Duration) (float64, float64) {
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) float64 {
		return float64(s[min(len(s)-1, int(p*float64(len(s))))].Microseconds()) / 1000
	}
	return q(0.5), q(0.99)
}

// timedGet sends one GET on a new connection and returns the time to the
// first response byte, the total time, and the body's digest.
func timedGet(t *testing.T, url string) (time.Duration, time.Duration, int, digest.Digest) {
	t.Helper()
	var first time.Time
	trace := &httptrace.ClientTrace{GotFirstResponseByte: func() { first = time.Now() }}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, url, nil)
	client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true, DisableCompression: true}}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	dg := digest.Canonical.Digester()
	_, err = io.Copy(dg.Hash(), resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return first.Sub(start), time.Since(start), resp.StatusCode, dg.Digest()
}

// latency measures requests through a node's mirror for content only a
// peer holds, with 3 and 10 nodes, each request on a new connection.
func (h *harness) latency(t *testing.T) {
	n := 60
	if h.quick {
		n = 20
	}
	h.printf("## 3. Latency through a peer\n\nA client asks the last node's mirror for content that only the first node "+
		"holds, each request on a new connection, %d requests per row. Targets: first byte p50 at most 2 ms and p99 at "+
		"most 5 ms; 10 MiB total p99 at most twice its p50; a 404 within 2 ms.\n\n", n)
	h.printf("| nodes | first byte, new digest p50 / p99 ms | first byte, repeated p50 / p99 ms | 10 MiB total p50 / p99 ms | 404 p50 / p99 ms |\n")
	h.printf("| --- | --- | --- | --- | --- |\n")
	for _, nodes := range []int{3, 10} {
		t.Run(strconv.Itoa(nodes), func(t *testing.T) {
			h.latencyRow(t, nodes, n)
		})
	}
	h.printf("\n")
}

func (h *harness) latencyRow(t *testing.T, count, n int) {
	reg := testenv.StartRegistry(t)
	small := reg.PushRandomImage(t, "bench/small", "v1", n, 64<<10)
	big := reg.PushRandomImage(t, "bench/big", "v1", 1, 10<<20)
	first := testenv.StartNode(t, "n0", "registry.test", reg.URL, testenv.NodeOptions{Quiet: true})
	nodes := []*testenv.Node{first}
	boot := testenv.NodeOptions{Quiet: true, Bootstrap: []string{first.Mirror.URL + dht.PeerListPath}}
	for i := 1; i < count; i++ {
		nodes = append(nodes, testenv.StartNode(t, fmt.Sprintf("n%d", i), "registry.test", reg.URL, boot))
	}
	for _, img := range []testenv.Image{small, big} {
		first.Ctrd.PullRef(t, img.Ref("registry.test"))
	}
	last := nodes[len(nodes)-1]
	url := func(img testenv.Image, d digest.Digest) string {
		return last.Mirror.URL + "/v2/" + img.Repo + "/blobs/" + d.String() + "?ns=registry.test"
	}
	// every layer findable from the last node: asked from another node, so
	// the last node has asked for none of them
	probe := nodes[len(nodes)/2]
	deadline := time.Now().Add(2 * time.Minute)
	for _, d := range append(slices.Clone(small.Layers), big.Layers...) {
		for {
			resp, err := http.Head(probe.Mirror.URL + "/v2/x/blobs/" + d.String() + "?ns=registry.test")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("layer %s never findable", d)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	var fresh, repeated, total, missing []time.Duration
	for _, d := range small.Layers {
		fb, _, status, got := timedGet(t, url(small, d))
		if status != http.StatusOK || got != d {
			t.Fatalf("new digest: %d, %s", status, got)
		}
		fresh = append(fresh, fb)
	}
	for i := 0; i < n; i++ {
		d := small.Layers[i%len(small.Layers)]
		fb, _, status, got := timedGet(t, url(small, d))
		if status != http.StatusOK || got != d {
			t.Fatalf("repeated digest: %d, %s", status, got)
		}
		repeated = append(repeated, fb)
		_, all, status, got := timedGet(t, url(big, big.Layers[0]))
		if status != http.StatusOK || got != big.Layers[0] {
			t.Fatalf("10 MiB blob: %d, %s", status, got)
		}
		total = append(total, all)
		_, miss, status, _ := timedGet(t, url(small, digest.FromString(fmt.Sprintf("nobody %d %d", count, i))))
		if status != http.StatusNotFound {
			t.Fatalf("missing digest: %d", status)
		}
		missing = append(missing, miss)
	}
	f50, f99 := quantiles(fresh)
	r50, r99 := quantiles(repeated)
	t50, t99 := quantiles(total)
	m50, m99 := quantiles(missing)
	h.printf("| %d | %.2f / %.2f | %.2f / %.2f | %.1f / %.1f | %.2f / %.2f |\n", count, f50, f99, r50, r99, t50, t99, m50, m99)
}

// memory measures a node's RSS idle and with many advertised tags, and
// how long a node takes from its start until it advertises them all.
func (h *harness) memory(t *testing.T) {
	tags := 10000
	if h.quick {
		tags = 1000
	}
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "bench/many", "v1", 1, 64<<10)
	a := testenv.StartNode(t, "A", "registry.test", reg.URL, testenv.NodeOptions{Quiet: true})
	b := testenv.StartNode(t, "B", "registry.test", reg.URL,
		testenv.NodeOptions{Quiet: true, Bootstrap: []string{a.Mirror.URL + dht.PeerListPath}})
	_ = b
	a.Ctrd.PullRef(t, img.Ref("registry.test"))
	idle, idleAnon := settledRSS(a.Mirror.Pid())
	saveProfile(t, nil, a.Mirror.AdminAddr, "debug/pprof/heap?gc=1", "memory-idle.heap.pprof")

	cl := a.Ctrd.Client(t)
	ctx := namespaces.WithNamespace(context.Background(), a.Ctrd.Namespace)
	target, err := cl.ImageService().Get(ctx, img.Ref("registry.test"))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < tags; i++ {
		name := fmt.Sprintf("registry.test/bench/many:t%05d", i)
		if _, err := cl.ImageService().Create(ctx, images.Image{Name: name, Target: target.Target}); err != nil {
			t.Fatal(err)
		}
	}
	waitTags(t, a.Mirror, tags+1)
	with, withAnon := settledRSS(a.Mirror.Pid())
	_, peak := rss(a.Mirror.Pid())
	saveProfile(t, nil, a.Mirror.AdminAddr, "debug/pprof/heap?gc=1", "memory-tags.heap.pprof")

	// a node that starts with them all in its containerd: the time until
	// its provider records for all of them are in the DHT (it logs each)
	start := time.Now()
	c := testenv.StartCaddy(t, func(port int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n\tdebug\n\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n\t\t}\n"+
			"\t\tdht {\n\t\t\tlisten /ip4/127.0.0.1/tcp/%d\n\t\t\tmirror_port %d\n\t\t\tbootstrap_http %s\n\t\t}\n\t}\n}\n:%d {\n\tpeermirror\n}\n",
			admin, a.Ctrd.Socket, testenv.FreePort(t), port, a.Mirror.URL+dht.PeerListPath, port)
	})
	deadline := time.Now().Add(5 * time.Minute)
	for len(c.LogLines(`"msg":"provided key"`, "registry.test/bench/many:")) < tags+1 {
		if time.Now().After(deadline) {
			t.Fatalf("after %s, %d of %d tags provided", time.Since(start),
				len(c.LogLines(`"msg":"provided key"`, "registry.test/bench/many:")), tags+1)
		}
		time.Sleep(50 * time.Millisecond)
	}
	startup := time.Since(start)
	_, cPeak := rss(c.Pid())
	h.printf("## 5 and 6. Memory and start-up\n\nOne node's Caddy process; %d tags are image records pointing at one "+
		"image. Targets: at most 64 MiB RSS with 10,000 keys; under 10 s from process start until 10,000 keys are "+
		"advertised.\n\n", tags)
	h.printf("RSS is measured once it has settled after the keys were advertised; in brackets its anonymous part " +
		"(heap, stacks), the rest being the executable's pages in memory.\n\n")
	h.printf("| RSS idle (MiB) | RSS with %d tags (MiB) | peak RSS (MiB) | start to all %d tags provided in the DHT (s) | "+
		"peak RSS of the starting node (MiB) |\n", tags, tags)
	h.printf("| --- | --- | --- | --- | --- |\n| %.1f (%.1f) | %.1f (%.1f) | %.1f | %.2f | %.1f |\n\n", idle, idleAnon,
		with, withAnon, peak, startup.Seconds(), cPeak)
}

// waitTags waits until c's node advertises n tags.
func waitTags(t *testing.T, c *testenv.Caddy, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		resp, err := http.Get("http://" + c.AdminAddr + "/peermirror/advertised")
		if err == nil {
			var got struct{ Tags int }
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if _, err := fmt.Sscanf(string(b), `{"tags":%d`, &got.Tags); err == nil && got.Tags >= n {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("never advertised %d tags", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// upstreamBytes sums the body bytes the registry sent for manifests and
// blobs since the access log had skip lines.
func upstreamBytes(reg *testenv.Registry, skip int) (int64, int) {
	log := reg.AccessLog()
	var n int64
	for _, r := range log[min(skip, len(log)):] {
		if r.Method == http.MethodGet && (strings.Contains(r.Path, "/blobs/") || strings.Contains(r.Path, "/manifests/")) {
			n += r.Bytes
		}
	}
	return n, len(log)
}

// pullAll pulls ref on every node at once and returns each pull's time.
func pullAll(t *testing.T, nodes []*testenv.Node, ref string) []time.Duration {
	t.Helper()
	times := make([]time.Duration, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			if out, err := n.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", n.Ctrd.CertsDir, ref); err != nil {
				t.Errorf("%s pulling %s: %v\n%s", n.Name, ref, err, out)
			}
			times[i] = time.Since(start)
		}()
	}
	wg.Wait()
	return times
}

// rollout is a rolling update: every node pulls a v1 image at once, then
// a v2 image in waves of 20% of the nodes, for a small and a large image.
func (h *harness) rollout(t *testing.T) {
	count := 10
	sizes := []struct {
		layers int
		size   int64
	}{{1, 10 << 20}, {4, 25 << 20}}
	if h.quick {
		count, sizes = 5, sizes[:1]
	}
	h.printf("## 4. Rolling update\n\n%d nodes on loopback (a containerd and a Caddy each) with one registry: every node "+
		"pulls v1 at once, then v2 in waves of 20%% of the nodes, one wave after the other. Upstream bytes are what the "+
		"registry sent for manifests and blobs, as copies of the image.\n\n", count)
	h.printf("| image | phase | pull p50 (s) | pull p99 (s) | upstream copies |\n| --- | --- | --- | --- | --- |\n")
	for _, sz := range sizes {
		reg := testenv.StartRegistry(t)
		v1 := reg.PushRandomImage(t, "bench/app", "v1", sz.layers, sz.size)
		v2 := reg.PushRandomImage(t, "bench/app", "v2", sz.layers, sz.size)
		first := testenv.StartNode(t, "r0", "registry.test", reg.URL, testenv.NodeOptions{Quiet: true})
		nodes := []*testenv.Node{first}
		boot := testenv.NodeOptions{Quiet: true, Bootstrap: []string{first.Mirror.URL + dht.PeerListPath}}
		for i := 1; i < count; i++ {
			nodes = append(nodes, testenv.StartNode(t, fmt.Sprintf("r%d", i), "registry.test", reg.URL, boot))
		}
		imageBytes := func(img testenv.Image) int64 {
			var n int64
			for _, v := range img.Sizes {
				n += v
			}
			return n
		}
		name := fmt.Sprintf("%d x %d MiB", sz.layers, sz.size>>20)
		_, mark := upstreamBytes(reg, 0)
		times := pullAll(t, nodes, v1.Ref("registry.test"))
		sent, mark := upstreamBytes(reg, mark)
		p50, p99 := quantiles(times)
		h.printf("| %s | v1, all at once | %.2f | %.2f | %.2f |\n", name, p50/1000, p99/1000, float64(sent)/float64(imageBytes(v1)))
		wave := max(1, count/5)
		var all []time.Duration
		for i := 0; i < count; i += wave {
			all = append(all, pullAll(t, nodes[i:min(i+wave, count)], v2.Ref("registry.test"))...)
		}
		sent, _ = upstreamBytes(reg, mark)
		p50, p99 = quantiles(all)
		h.printf("| %s | v2, waves of %d | %.2f | %.2f | %.2f |\n", name, wave, p50/1000, p99/1000,
			float64(sent)/float64(imageBytes(v2)))
		for _, n := range nodes {
			n.Mirror.Stop(t)
			n.Ctrd.Stop(t)
		}
	}
	h.printf("\n")
}
