package hoststoml_test

import (
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/peermirror/peermirror/hoststoml"
	"github.com/peermirror/peermirror/internal/testenv"
)

// registryHost is the name images carry; containerd reaches it only
// through the hosts.toml files under test.
const registryHost = "registry.test"

// recordingProxy forwards to target and records each request as
// "METHOD PATH?QUERY".
type recordingProxy struct {
	URL  string
	mu   sync.Mutex
	reqs []string
}

func startProxy(t *testing.T, network, addr, target string) *recordingProxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatalf("listening on %s: %v", addr, err)
	}
	p := &recordingProxy{URL: "http://" + l.Addr().String()}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.reqs = append(p.reqs, r.Method+" "+r.URL.RequestURI())
		p.mu.Unlock()
		rp.ServeHTTP(w, r)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return p
}

func (p *recordingProxy) requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.reqs...)
}

// deadURL is a loopback URL where nothing listens.
func deadURL(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "http://" + l.Addr().String()
}

// TestContainerdUsesWrittenHosts checks, with a real containerd, that the
// files Configure writes are the ones containerd follows: pulls with ctr
// and through the CRI reach the mirror while the upstream is dead, IPv6
// targets work, a pull-only mirror leaves tags to the upstream, kept hosts
// come after the mirror, and Cleanup gives back the original bytes.
func TestContainerdUsesWrittenHosts(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containerd and a registry; skipped with -short")
	}
	c := testenv.StartContainerd(t)
	reg := testenv.StartRegistry(t)

	// the harness's own containerd config passes the check
	findings, err := hoststoml.CheckContainerdConfig(hoststoml.CheckOptions{
		ConfigFile: filepath.Join(c.Dir, "config.toml"),
		CertsDir:   c.CertsDir,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range findings {
		if f.Severity > hoststoml.SeverityInfo {
			t.Errorf("harness config: %s %s", f.Severity, f)
		}
	}

	dead := deadURL(t)
	v4 := startProxy(t, "tcp4", "127.0.0.1:0", reg.URL)
	v6 := startProxy(t, "tcp6", "[::1]:0", reg.URL)

	tests := []struct {
		name string
		// original hosts.toml, "" for none
		original string
		opts     hoststoml.Options
		pull     func(ref string) (string, error)
		// the proxy that must have served the pull, and what it must not
		// have seen
		via     *recordingProxy
		notSeen string
	}{
		{
			name: "ctr, IPv4 mirror, dead upstream",
			opts: hoststoml.Options{Mirrors: []string{v4.URL}, Upstreams: map[string]string{registryHost: dead}},
			pull: func(ref string) (string, error) {
				return c.Ctr(t, "images", "pull", "--hosts-dir", c.CertsDir, ref)
			},
			via: v4,
		},
		{
			name: "CRI, IPv6 mirror in brackets, dead upstream",
			opts: hoststoml.Options{Mirrors: []string{strings.TrimPrefix(v6.URL, "http://")}, Upstreams: map[string]string{registryHost: dead}},
			pull: func(ref string) (string, error) { return c.Crictl(t, "pull", ref) },
			via:  v6,
		},
		{
			name: "CRI, pull-only mirror: tags resolved upstream",
			opts: hoststoml.Options{Mirrors: []string{v4.URL}, PullOnly: true, Upstreams: map[string]string{registryHost: reg.URL}},
			pull: func(ref string) (string, error) { return c.Crictl(t, "pull", ref) },
			via:  v4, notSeen: "/manifests/v",
		},
		{
			name:     "ctr, dead mirror, kept host answers",
			original: "server = \"" + dead + "\"\n\n[host.\"" + v6.URL + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
			opts:     hoststoml.Options{Mirrors: []string{dead}, KeepExisting: true},
			pull: func(ref string) (string, error) {
				return c.Ctr(t, "images", "pull", "--hosts-dir", c.CertsDir, ref)
			},
			via: v6,
		},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := reg.PushRandomImage(t, "team/app", "v"+string(rune('1'+i)), 2, 64<<10)
			dir := filepath.Join(c.CertsDir, registryHost)
			hostsPath := filepath.Join(dir, "hosts.toml")
			if tt.original != "" {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(hostsPath, []byte(tt.original), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			opts := tt.opts
			opts.CertsDir = c.CertsDir
			opts.Registries = []string{registryHost}
			if _, err := hoststoml.Configure(opts); err != nil {
				t.Fatal(err)
			}
			written, _ := os.ReadFile(hostsPath)

			before := len(tt.via.requests())
			if out, err := tt.pull(img.Ref(registryHost)); err != nil {
				t.Fatalf("pull through the written hosts.toml: %v\n%s\nhosts.toml:\n%s", err, out, written)
			}
			seen := tt.via.requests()[before:]
			var blobs int
			for _, r := range seen {
				if strings.Contains(r, "/blobs/sha256:") {
					blobs++
				}
				if !strings.Contains(r, "ns="+registryHost) {
					t.Errorf("request without ns=%s: %s", registryHost, r)
				}
				if tt.notSeen != "" && strings.Contains(r, tt.notSeen) {
					t.Errorf("the mirror was asked %s", r)
				}
			}
			t.Logf("%s served %d requests, %d of them blobs", tt.via.URL, len(seen), blobs)
			if blobs == 0 {
				t.Errorf("no blob came through %s; it saw %q\nhosts.toml:\n%s", tt.via.URL, seen, written)
			}

			if _, err := hoststoml.Cleanup(c.CertsDir); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(hostsPath)
			switch {
			case tt.original == "" && !os.IsNotExist(err):
				t.Errorf("after cleanup hosts.toml is still there (%v)", err)
			case tt.original != "" && string(got) != tt.original:
				t.Errorf("after cleanup hosts.toml = %q, %v; want the original", got, err)
			}
			_ = os.RemoveAll(dir)
		})
	}
}

// TestDiscardUnpackedLayers checks the reason the check calls
// discard_unpacked_layers an error: with it, a real containerd keeps no
// layer of an image it pulled through the CRI, so the node's mirror has
// nothing to serve; without it, every layer stays.
func TestDiscardUnpackedLayers(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containerd and a registry; skipped with -short")
	}
	reg := testenv.StartRegistry(t)
	for _, discard := range []bool{false, true} {
		name := map[bool]string{false: "default", true: "discard_unpacked_layers"}[discard]
		t.Run(name, func(t *testing.T) {
			var opts []testenv.ContainerdOption
			if discard {
				opts = append(opts, testenv.WithExtraConfig("[plugins.\"io.containerd.cri.v1.images\"]\n  discard_unpacked_layers = true"))
			}
			c := testenv.StartContainerd(t, opts...)

			findings, err := hoststoml.CheckContainerdConfig(hoststoml.CheckOptions{
				ConfigFile: filepath.Join(c.Dir, "config.toml"),
				CertsDir:   c.CertsDir,
			})
			if err != nil {
				t.Fatal(err)
			}
			var flagged bool
			for _, f := range findings {
				if f.Severity == hoststoml.SeverityError && strings.HasSuffix(f.Setting, "discard_unpacked_layers") {
					flagged = true
				}
			}
			if flagged != discard {
				t.Errorf("check flagged discard_unpacked_layers: %v, want %v (findings %v)", flagged, discard, findings)
			}

			img := reg.PushRandomImage(t, "team/app", name, 2, 64<<10)
			if _, err := hoststoml.Configure(hoststoml.Options{CertsDir: c.CertsDir,
				Registries: []string{registryHost}, Mirrors: []string{reg.URL},
				Upstreams: map[string]string{registryHost: deadURL(t)}}); err != nil {
				t.Fatal(err)
			}
			if out, err := c.Crictl(t, "pull", img.Ref(registryHost)); err != nil {
				t.Fatalf("crictl pull: %v\n%s", err, out)
			}
			// a synchronous garbage collection, as a busy node has often
			if out, err := c.Ctr(t, "images", "tag", img.Ref(registryHost), "gc.test/trigger:1"); err != nil {
				t.Fatalf("ctr images tag: %v\n%s", err, out)
			}
			if out, err := c.Ctr(t, "images", "rm", "--sync", "gc.test/trigger:1"); err != nil {
				t.Fatalf("ctr images rm --sync: %v\n%s", err, out)
			}
			var kept int
			for _, l := range img.Layers {
				if _, err := os.Stat(filepath.Join(c.ContentDir, "blobs", "sha256", l.Encoded())); err == nil {
					kept++
				}
			}
			if want := map[bool]int{false: len(img.Layers), true: 0}[discard]; kept != want {
				t.Errorf("%d of %d layers left in the content store, want %d", kept, len(img.Layers), want)
			}
		})
	}
}
