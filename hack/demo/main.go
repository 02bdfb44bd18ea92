// Command demo shows peermirror at work on one machine: three nodes, each
// a containerd and a Caddy with the plugin, and a registry, all on loopback
// in temporary folders. It pushes a generated image, pulls it on node A
// (from the registry), then on B and C through their own mirrors (from A,
// found through the DHT), and prints where each piece came from and how
// long it took. Run it with `make demo` (as root: containerd needs it).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

const upstreamHost = "registry.test"

func main() {
	d := &demo{}
	code := 0
	func() {
		defer func() {
			if r := recover(); r != nil {
				if !errors.Is(asError(r), errFatal) {
					panic(r)
				}
				code = 1
			}
		}()
		d.run()
	}()
	d.cleanup()
	if d.failed {
		code = 1
	}
	os.Exit(code)
}

func (d *demo) run() {
	reg := testenv.StartRegistry(d)
	img := reg.PushRandomImage(d, "demo/app", "v1", 4, 8<<20)
	say("pushed %s to the registry: %d layers of 8 MiB, root %s", img.Ref(upstreamHost), len(img.Layers), img.Digest)

	a := testenv.StartNode(d, "A", upstreamHost, reg.URL, testenv.NodeOptions{})
	boot := testenv.NodeOptions{Bootstrap: []string{a.Mirror.URL + dht.PeerListPath}}
	b := testenv.StartNode(d, "B", upstreamHost, reg.URL, boot)
	c := testenv.StartNode(d, "C", upstreamHost, reg.URL, boot)
	say("three nodes, each a containerd and a Caddy with peermirror: A %s, B %s, C %s",
		a.Mirror.URL, b.Mirror.URL, c.Mirror.URL)

	start := time.Now()
	a.Ctrd.PullRef(d, img.Ref(upstreamHost))
	say("node A pulled it in %s: its mirror missed, the registry served it", since(start))
	upstreamRequests := len(reg.Requests())

	waitServable(d, b, "/v2/"+img.Repo+"/manifests/"+img.Tag+"?ns="+upstreamHost)
	ttfb := firstByte(d, c, "/v2/"+img.Repo+"/blobs/"+img.Layers[0].String()+"?ns="+upstreamHost)
	say("node C's mirror sent the first byte of a layer that only A holds after %s", ttfb)

	for _, n := range []*testenv.Node{b, c} {
		start = time.Now()
		n.Ctrd.PullRef(d, img.Ref(upstreamHost))
		say("node %s pulled it in %s, through its own mirror", n.Name, since(start))
	}
	say("registry requests since A's pull: %d", len(reg.Requests())-upstreamRequests)
	for _, n := range []*testenv.Node{a, b, c} {
		report(n, img)
	}
	showAdmin(c)
}

// showAdmin prints what node C's admin endpoint answers: the node, and
// the peermirror lines of its metrics.
func showAdmin(n *testenv.Node) {
	get := func(path string) string {
		resp, err := testenv.HTTPClient().Get("http://" + n.Mirror.AdminAddr + path)
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	say("node %s, GET /peermirror/node on its admin endpoint: %s", n.Name, strings.TrimSpace(get("/peermirror/node")))
	var lines []string
	for _, l := range strings.Split(get("/metrics"), "\n") {
		if strings.HasPrefix(l, "peermirror_") && !strings.Contains(l, "_bucket{") {
			lines = append(lines, "  "+l)
		}
	}
	say("node %s, peermirror lines of /metrics:\n%s", n.Name, strings.Join(lines, "\n"))
}

// waitServable waits until n's mirror answers path.
func waitServable(t testenv.T, n *testenv.Node, path string) {
	deadline := time.Now().Add(time.Minute)
	for {
		resp, _ := n.Mirror.Get(t, path)
		if resp.StatusCode == http.StatusOK {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s never found %s through the DHT", n.Name, path)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// firstByte returns how long n's mirror takes to send the first byte of
// path.
func firstByte(t testenv.T, n *testenv.Node, path string) time.Duration {
	var first time.Time
	trace := &httptrace.ClientTrace{GotFirstResponseByte: func() { first = time.Now() }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace),
		http.MethodGet, n.Mirror.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	resp, err := testenv.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s on %s: %d %v", path, n.Name, resp.StatusCode, err)
	}
	return first.Sub(start).Round(10 * time.Microsecond)
}

func since(t time.Time) time.Duration { return time.Since(t).Round(time.Millisecond) }

// report prints, for each digest of the image, where node n's mirror got
// it and how long that took.
func report(n *testenv.Node, img testenv.Image) {
	say("node %s:", n.Name)
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "  KIND\tDIGEST\tSIZE\tSOURCE\tTIME")
	for _, dg := range img.All() {
		kind, source, took := "-", "upstream (mirror missed)", "-"
		for _, line := range n.Mirror.LogLines(`"msg":"served"`, dg.String()) {
			var entry map[string]any
			if json.Unmarshal([]byte(line), &entry) != nil || entry["forwarded"] == true {
				continue
			}
			kind = fmt.Sprint(entry["kind"])
			source = fmt.Sprint(entry["source"])
			if secs, ok := entry["duration"].(float64); ok {
				took = fmt.Sprintf("%.1f ms", secs*1000)
			}
		}
		fmt.Fprintf(w, "  %s\t%s\t%d\t%s\t%s\n", kind, dg.String()[:19], img.Sizes[dg], source, took)
	}
	w.Flush()
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stdout, "demo: "+format+"\n", args...)
}

// demo implements testenv.T for a program: Fatal stops the run and the
// clean-ups run at exit, so no process or folder is left behind.
type demo struct {
	cleanups []func()
	failed   bool
}

var errFatal = errors.New("demo failed")

func asError(r any) error {
	if err, ok := r.(error); ok {
		return err
	}
	return nil
}

func (d *demo) Helper()          {}
func (d *demo) Cleanup(f func()) { d.cleanups = append(d.cleanups, f) }
func (d *demo) Failed() bool     { return d.failed }
func (d *demo) Logf(f string, args ...any) {
	if os.Getenv("DEMO_VERBOSE") != "" {
		fmt.Fprintf(os.Stderr, f+"\n", args...)
	}
}
func (d *demo) Errorf(f string, args ...any) {
	d.failed = true
	fmt.Fprintf(os.Stderr, "demo: error: "+f+"\n", args...)
}
func (d *demo) Fatal(args ...any) { d.Fatalf("%s", fmt.Sprint(args...)) }
func (d *demo) Fatalf(f string, args ...any) {
	d.Errorf(f, args...)
	panic(errFatal)
}
func (d *demo) TempDir() string {
	dir, err := os.MkdirTemp("", "pm-demo-")
	if err != nil {
		d.Fatal(err)
	}
	d.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// cleanup runs the clean-ups in reverse order, as testing does.
func (d *demo) cleanup() {
	for i := len(d.cleanups) - 1; i >= 0; i-- {
		d.cleanups[i]()
	}
}
