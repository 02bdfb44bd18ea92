// Command demo shows peermirror at work on one machine: it starts two
// containerd instances, a registry and a Caddy with the plugin, all on
// loopback in temporary folders, pushes a generated image, pulls it on node
// A from the registry, stops the registry, pulls it on node B through the
// mirror, and prints where each piece came from. Run it with `make demo`
// (as root: containerd needs it).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"text/tabwriter"
	"time"

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
	a := testenv.StartContainerd(d)
	b := testenv.StartContainerd(d)
	reg := testenv.StartRegistry(d)

	img := reg.PushRandomImage(d, "demo/app", "v1", 4, 8<<20)
	say("pushed %s: %d layers of 8 MiB, root %s", img.Ref(upstreamHost), len(img.Layers), img.Digest)

	start := time.Now()
	a.PullFromRegistry(d, reg, upstreamHost, img)
	say("node A pulled it from the registry in %s", time.Since(start).Round(time.Millisecond))
	reg.Stop(d)
	say("registry stopped: from now on only node A's containerd has the image")

	mirror := testenv.StartCaddy(d, func(port int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n\tdebug\n\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n\t\t}\n\t}\n}\n:%d {\n\tpeermirror\n}\n",
			admin, a.Socket, port)
	})
	say("caddy with peermirror serves node A's containerd at %s", mirror.URL)

	b.WriteHostsToml(d, upstreamHost, deadUpstream(d), mirror.URL)
	start = time.Now()
	b.PullRef(d, img.Ref(upstreamHost))
	say("node B pulled it through the mirror in %s (upstream unreachable)", time.Since(start).Round(time.Millisecond))

	report(mirror, img)
}

// report prints, for each digest of the image, how the mirror served it.
func report(mirror *testenv.Caddy, img testenv.Image) {
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "KIND\tDIGEST\tSIZE\tSOURCE\tSERVED IN")
	for _, dg := range img.All() {
		kind, source, took := "-", "not served", "-"
		for _, line := range mirror.LogLines(`"msg":"served"`, dg.String()) {
			var entry map[string]any
			if json.Unmarshal([]byte(line), &entry) != nil {
				continue
			}
			kind = fmt.Sprint(entry["kind"])
			source = "mirror: " + fmt.Sprint(entry["source"]) + " containerd"
			if secs, ok := entry["duration"].(float64); ok {
				took = fmt.Sprintf("%.1f ms", secs*1000)
			}
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", kind, dg.String()[:19], img.Sizes[dg], source, took)
	}
	w.Flush()
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stdout, "demo: "+format+"\n", args...)
}

func deadUpstream(t testenv.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "http://" + l.Addr().String()
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
