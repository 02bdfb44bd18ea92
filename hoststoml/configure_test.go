package hoststoml

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
)

const mirror = "http://127.0.0.1:30020"

// containerdHosts asks containerd's own hosts.toml reader which hosts it
// tries for registry, in order, as "<scheme>://<host><path> <caps>".
func containerdHosts(t *testing.T, certsDir, registry string) []string {
	t.Helper()
	hosts, err := config.ConfigureHosts(context.Background(), config.HostOptions{
		HostDir: config.HostDirFromRoot(certsDir),
	})(registry)
	if err != nil {
		t.Fatalf("containerd reading hosts for %s: %v", registry, err)
	}
	var out []string
	for _, h := range hosts {
		var caps []string
		for _, c := range []struct {
			bit  docker.HostCapabilities
			name string
		}{{docker.HostCapabilityPull, "pull"}, {docker.HostCapabilityResolve, "resolve"}, {docker.HostCapabilityPush, "push"}} {
			if h.Capabilities.Has(c.bit) {
				caps = append(caps, c.name)
			}
		}
		out = append(out, h.Scheme+"://"+h.Host+h.Path+" "+strings.Join(caps, ","))
	}
	return out
}

// tree maps the files under dir (relative, slash-separated) to their
// contents; folders are listed with a trailing slash.
func tree(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			out[rel+"/"] = ""
			return nil
		}
		b, err := os.ReadFile(p)
		out[rel] = string(b)
		return err
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return out
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if strings.HasSuffix(name, "/") {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestConfigure(t *testing.T) {
	tests := []struct {
		name   string
		before map[string]string // files under certs.d before
		opts   Options           // CertsDir is filled in
		// registry whose hosts containerd is asked for, and its answer
		registry  string
		wantHosts []string
		// substrings of the written hosts.toml, and notes expected
		wantFile   []string
		wantNoFile []string
		wantNotes  []string
	}{
		{
			name:      "new folder for docker.io",
			opts:      Options{Registries: []string{"docker.io"}, Mirrors: []string{mirror}},
			registry:  "docker.io",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://registry-1.docker.io/v2 pull,resolve,push"},
			wantFile:  []string{`server = "https://registry-1.docker.io"`, `dial_timeout = "200ms"`},
		},
		{
			name:      "several mirrors, IPv6 bracketed, pull only, no dial timeout",
			opts:      Options{Registries: []string{"ghcr.io"}, Mirrors: []string{"127.0.0.1", "fd00::5", "http://127.0.0.1:30020"}, PullOnly: true, DialTimeout: -1},
			registry:  "ghcr.io",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull", "http://[fd00::5]:30020/v2 pull", "https://ghcr.io/v2 pull,resolve,push"},
			wantFile:  []string{`[host."http://[fd00::5]:30020"]`},
		},
		{
			name:      "_default has no server, so each registry keeps its own",
			opts:      Options{Registries: []string{DefaultRegistry}, Mirrors: []string{mirror}},
			registry:  "quay.io",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://quay.io/v2 pull,resolve,push"},
		},
		{
			name:      "upstream override",
			opts:      Options{Registries: []string{"docker.io"}, Mirrors: []string{mirror}, Upstreams: map[string]string{"docker.io": "https://proxy.internal"}},
			registry:  "docker.io",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://proxy.internal/v2 pull,resolve,push"},
		},
		{
			name: "existing file replaced, its hosts dropped",
			before: map[string]string{"docker.io/hosts.toml": `server = "https://registry-1.docker.io"
[host."https://corp-cache.internal"]
  capabilities = ["pull"]
`},
			opts:      Options{Registries: []string{"docker.io"}, Mirrors: []string{mirror}},
			registry:  "docker.io",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://registry-1.docker.io/v2 pull,resolve,push"},
			wantNotes: []string{"--keep-existing keeps them"},
		},
		{
			name: "existing hosts kept after ours, with their settings and server",
			before: map[string]string{"docker.io/upstream-ca.pem": "{{CERT}}", "docker.io/hosts.toml": `# the operator's cache
server = "https://upstream.internal"
ca = "upstream-ca.pem"

[host."https://corp-cache.internal"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."https://corp-cache.internal".header]
    X-Team = ["a", "b"]

[host."http://127.0.0.1:30020"]
  capabilities = ["pull"]
`},
			opts:     Options{Registries: []string{"docker.io"}, Mirrors: []string{mirror}, KeepExisting: true},
			registry: "docker.io",
			wantHosts: []string{
				"http://127.0.0.1:30020/v2 pull,resolve",
				"https://corp-cache.internal/v2 pull,resolve",
				"https://upstream.internal/v2 pull,resolve,push",
			},
			wantFile: []string{
				`server = "https://upstream.internal"`, `ca = "upstream-ca.pem"`,
				`header = {X-Team = ["a", "b"]}`, `skip_verify = true`,
			},
			wantNotes: []string{"kept the hosts of the original hosts.toml"},
		},
		{
			name: "_default's hosts kept for a new registry folder, paths rebased",
			before: map[string]string{"_default/corp.pem": "{{CERT}}", "abs.pem": "{{CERT}}", "_default/hosts.toml": `[host."https://corp-cache.internal"]
  ca = ["corp.pem", "{{ABS}}/abs.pem"]
`},
			opts:     Options{Registries: []string{"ghcr.io"}, Mirrors: []string{mirror}, KeepExisting: true},
			registry: "ghcr.io",
			wantHosts: []string{
				"http://127.0.0.1:30020/v2 pull,resolve",
				"https://corp-cache.internal/v2 pull,resolve,push",
				"https://ghcr.io/v2 pull,resolve,push",
			},
			wantFile:  []string{`ca = ["../_default/corp.pem", "{{ABS}}/abs.pem"]`},
			wantNotes: []string{"kept the hosts of _default/hosts.toml"},
		},
		{
			name:      "_default's hosts replaced for a new registry folder",
			before:    map[string]string{"_default/hosts.toml": `[host."https://corp-cache.internal"]` + "\n"},
			opts:      Options{Registries: []string{"ghcr.io"}, Mirrors: []string{mirror}},
			registry:  "ghcr.io",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://ghcr.io/v2 pull,resolve,push"},
			wantNotes: []string{"replaces the hosts of _default/hosts.toml"},
		},
		{
			name:     "Docker certificate files named in the new hosts.toml",
			before:   map[string]string{"registry.internal/ca.crt": "{{CERT}}", "registry.internal/client.cert": "{{CERT}}", "registry.internal/client.key": "{{KEY}}"},
			opts:     Options{Registries: []string{"registry.internal"}, Mirrors: []string{mirror}},
			registry: "registry.internal",
			wantHosts: []string{
				"http://127.0.0.1:30020/v2 pull,resolve",
				"https://registry.internal/v2 pull,resolve,push",
			},
			wantFile:  []string{`ca = ["ca.crt"]`, `client = [["client.cert", "client.key"]]`},
			wantNotes: []string{"certificate files"},
		},
		{
			name:      "registry with a port: the host_port_ folder in use is kept",
			before:    map[string]string{"registry.internal_5000_/": ""},
			opts:      Options{Registries: []string{"registry.internal:5000"}, Mirrors: []string{mirror}},
			registry:  "registry.internal:5000",
			wantHosts: []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://registry.internal:5000/v2 pull,resolve,push"},
		},
		{
			name:     "loopback registry: containerd picks the scheme",
			opts:     Options{Registries: []string{"localhost:5000"}, Mirrors: []string{mirror}},
			registry: "localhost:5000",
			// https first, falling back to http, as without a file
			wantHosts:  []string{"http://127.0.0.1:30020/v2 pull,resolve", "https://localhost:5000/v2 pull,resolve,push"},
			wantFile:   []string{"dial_timeout"},
			wantNoFile: []string{"server ="},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certs := filepath.Join(t.TempDir(), "certs.d")
			fill := strings.NewReplacer("{{CERT}}", testCert, "{{KEY}}", testKey, "{{ABS}}", certs).Replace
			files := map[string]string{}
			for name, content := range tt.before {
				files[name] = fill(content)
			}
			writeFiles(t, certs, files)
			if err := os.MkdirAll(certs, 0o755); err != nil {
				t.Fatal(err)
			}
			before := tree(t, certs)
			opts := tt.opts
			opts.CertsDir = certs

			rep, err := Configure(opts)
			if err != nil {
				t.Fatalf("Configure: %v", err)
			}
			if len(rep.Changes) != len(opts.Registries) || rep.Changes[0].Action != ActionWritten {
				t.Fatalf("changes = %+v, want one written per registry", rep.Changes)
			}
			if got := containerdHosts(t, certs, tt.registry); !slices.Equal(got, tt.wantHosts) {
				t.Errorf("containerd's hosts for %s:\n got %q\nwant %q", tt.registry, got, tt.wantHosts)
			}
			written, err := os.ReadFile(rep.Changes[0].Path)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range tt.wantFile {
				if !strings.Contains(string(written), fill(s)) {
					t.Errorf("hosts.toml lacks %q:\n%s", fill(s), written)
				}
			}
			for _, s := range tt.wantNoFile {
				if strings.Contains(string(written), s) {
					t.Errorf("hosts.toml has %q:\n%s", s, written)
				}
			}
			notes := strings.Join(rep.Changes[0].Notes, "\n")
			for _, s := range tt.wantNotes {
				if !strings.Contains(notes, s) {
					t.Errorf("notes lack %q: %q", s, notes)
				}
			}

			// a second run changes nothing, not even a file's time
			afterFirst := tree(t, certs)
			fi1, _ := os.Stat(rep.Changes[0].Path)
			rep2, err := Configure(opts)
			if err != nil {
				t.Fatalf("second Configure: %v", err)
			}
			if rep2.Changes[0].Action != ActionUnchanged {
				t.Errorf("second run: %+v, want unchanged", rep2.Changes[0])
			}
			fi2, _ := os.Stat(rep.Changes[0].Path)
			if got := tree(t, certs); !mapsEqual(got, afterFirst) || !fi1.ModTime().Equal(fi2.ModTime()) {
				t.Errorf("second run changed files:\nbefore %v\nafter  %v", afterFirst, got)
			}

			// cleanup puts back exactly what was there, and is idempotent
			crep, err := Cleanup(certs)
			if err != nil {
				t.Fatalf("Cleanup: %v", err)
			}
			if len(crep.Changes) != len(opts.Registries) {
				t.Errorf("cleanup changes = %+v", crep.Changes)
			}
			if got := tree(t, certs); !mapsEqual(got, before) {
				t.Errorf("after cleanup:\n got %v\nwant %v", got, before)
			}
			crep, err = Cleanup(certs)
			if err != nil || len(crep.Changes) != 0 {
				t.Errorf("second Cleanup = %+v, %v; want nothing to do", crep, err)
			}
		})
	}
}

// testCert and testKey are a self-signed certificate and its key, PEM,
// for containerd to load where a hosts.toml names them.
var testCert, testKey = func() (string, string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "peermirror test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		panic(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
}()

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestConfigureBackupOnce checks that the original is backed up once and
// stays the source of every later run, whatever the options.
func TestConfigureBackupOnce(t *testing.T) {
	certs := filepath.Join(t.TempDir(), "certs.d")
	orig := "server = \"https://registry-1.docker.io\"\n[host.\"https://cache.internal\"]\n"
	writeFiles(t, certs, map[string]string{"docker.io/hosts.toml": orig})
	path := filepath.Join(certs, "docker.io", "hosts.toml")
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(certs, "docker.io", backupFileName)

	steps := []struct {
		opts      Options
		wantHosts []string
	}{
		{Options{Mirrors: []string{mirror}, KeepExisting: true},
			[]string{"http://127.0.0.1:30020/v2 pull,resolve", "https://cache.internal/v2 pull,resolve,push", "https://registry-1.docker.io/v2 pull,resolve,push"}},
		// other mirrors: rendered from the backup, not from our own file
		{Options{Mirrors: []string{"127.0.0.2"}, KeepExisting: true},
			[]string{"http://127.0.0.2:30020/v2 pull,resolve", "https://cache.internal/v2 pull,resolve,push", "https://registry-1.docker.io/v2 pull,resolve,push"}},
		{Options{Mirrors: []string{"127.0.0.2"}},
			[]string{"http://127.0.0.2:30020/v2 pull,resolve", "https://registry-1.docker.io/v2 pull,resolve,push"}},
	}
	for i, s := range steps {
		s.opts.CertsDir = certs
		s.opts.Registries = []string{"docker.io"}
		rep, err := Configure(s.opts)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if rep.Changes[0].Action != ActionWritten {
			t.Errorf("step %d: %+v, want written", i, rep.Changes[0])
		}
		if got := containerdHosts(t, certs, "docker.io"); !slices.Equal(got, s.wantHosts) {
			t.Errorf("step %d: hosts %q, want %q", i, got, s.wantHosts)
		}
		if b, err := os.ReadFile(backup); err != nil || string(b) != orig {
			t.Fatalf("step %d: backup = %q, %v; want the original", i, b, err)
		}
		if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
			t.Errorf("step %d: hosts.toml mode %v, want the original's 0640", i, fi.Mode().Perm())
		}
	}

	if _, err := Cleanup(certs); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != orig {
		t.Fatalf("restored = %q, %v; want the original bytes", b, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Errorf("restored mode %v, want 0640", fi.Mode().Perm())
	}
}

// TestConfigureCreatesCertsDir checks that a certs folder made by
// Configure goes away with the last registry.
func TestConfigureCreatesCertsDir(t *testing.T) {
	base := t.TempDir()
	certs := filepath.Join(base, "certs.d")
	opts := Options{CertsDir: certs, Registries: []string{"docker.io", "ghcr.io"}, Mirrors: []string{mirror}}
	if _, err := Configure(opts); err != nil {
		t.Fatal(err)
	}
	if _, err := Configure(opts); err != nil {
		t.Fatal(err)
	}
	if _, err := Cleanup(certs); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(certs); !os.IsNotExist(err) {
		t.Errorf("certs folder still there after cleanup: %v (%v)", err, tree(t, certs))
	}
}

// TestConfigureDropsUnlistedRegistries checks that a registry left out of
// a later run is restored.
func TestConfigureDropsUnlistedRegistries(t *testing.T) {
	certs := t.TempDir()
	writeFiles(t, certs, map[string]string{"quay.io/hosts.toml": "server = \"https://quay.io\"\n"})
	opts := Options{CertsDir: certs, Registries: []string{"docker.io", "quay.io"}, Mirrors: []string{mirror}}
	if _, err := Configure(opts); err != nil {
		t.Fatal(err)
	}
	opts.Registries = []string{"docker.io"}
	rep, err := Configure(opts)
	if err != nil {
		t.Fatal(err)
	}
	var restored bool
	for _, c := range rep.Changes {
		if c.Registry == "quay.io" && c.Action == ActionRestored {
			restored = true
		}
	}
	if !restored {
		t.Errorf("changes = %+v, want quay.io restored", rep.Changes)
	}
	got := tree(t, certs)
	if got["quay.io/hosts.toml"] != "server = \"https://quay.io\"\n" || len(got) != 5 {
		t.Errorf("files = %v; want quay.io's original and docker.io's three files", got)
	}
}

// TestCleanupKeepsForeignChanges checks that a hosts.toml changed by
// someone else after Configure is kept aside, not lost.
func TestCleanupKeepsForeignChanges(t *testing.T) {
	certs := t.TempDir()
	if _, err := Configure(Options{CertsDir: certs, Registries: []string{"docker.io"}, Mirrors: []string{mirror}}); err != nil {
		t.Fatal(err)
	}
	edited := "# edited by hand\n"
	if err := os.WriteFile(filepath.Join(certs, "docker.io", "hosts.toml"), []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	rep, err := Cleanup(certs)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"docker.io/": "", "docker.io/" + replacedFileName: edited}
	if got := tree(t, certs); !mapsEqual(got, want) {
		t.Errorf("after cleanup %v, want %v", got, want)
	}
	if len(rep.Changes) != 1 || !strings.Contains(strings.Join(rep.Changes[0].Notes, " "), replacedFileName) {
		t.Errorf("changes = %+v, want a note about the kept file", rep.Changes)
	}
}

// TestCleanupRefusesDamagedBackup checks that a backup that does not match
// its digest is never restored, and nothing is removed.
func TestCleanupRefusesDamagedBackup(t *testing.T) {
	certs := t.TempDir()
	writeFiles(t, certs, map[string]string{"docker.io/hosts.toml": "server = \"https://a\"\n"})
	if _, err := Configure(Options{CertsDir: certs, Registries: []string{"docker.io"}, Mirrors: []string{mirror}}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(certs, "docker.io", backupFileName), []byte("tampered"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := tree(t, certs)
	if _, err := Cleanup(certs); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("Cleanup error = %v, want a digest mismatch", err)
	}
	if got := tree(t, certs); !mapsEqual(got, before) {
		t.Errorf("files changed after a refused cleanup")
	}
}

// TestConfigureBrokenOriginal checks that an original hosts.toml that does
// not parse is never lost: kept hosts cannot be taken from it, and without
// --keep-existing it is backed up and replaced all the same.
func TestConfigureBrokenOriginal(t *testing.T) {
	const broken = "server = [\n"
	for _, keep := range []bool{true, false} {
		t.Run(map[bool]string{true: "keep existing", false: "replace"}[keep], func(t *testing.T) {
			certs := t.TempDir()
			writeFiles(t, certs, map[string]string{"docker.io/hosts.toml": broken})
			opts := Options{CertsDir: certs, Registries: []string{"docker.io"}, Mirrors: []string{mirror}, KeepExisting: keep}
			rep, err := Configure(opts)
			got, _ := os.ReadFile(filepath.Join(certs, "docker.io", "hosts.toml"))
			if keep {
				if err == nil || !strings.Contains(err.Error(), "original hosts.toml") {
					t.Fatalf("Configure error = %v, want one about the original", err)
				}
				if string(got) != broken {
					t.Errorf("hosts.toml = %q, want the original left in place", got)
				}
			} else {
				if err != nil || rep.Changes[0].Action != ActionWritten || !strings.Contains(strings.Join(rep.Changes[0].Notes, " "), "ignored") {
					t.Fatalf("Configure = %+v, %v", rep, err)
				}
			}
			if _, err := Cleanup(certs); err != nil {
				t.Fatal(err)
			}
			got, _ = os.ReadFile(filepath.Join(certs, "docker.io", "hosts.toml"))
			if string(got) != broken {
				t.Errorf("after cleanup hosts.toml = %q, want the original", got)
			}
		})
	}
}

func TestConfigureState(t *testing.T) {
	certs := t.TempDir()
	if _, err := Configure(Options{CertsDir: certs, Registries: []string{"docker.io"}, Mirrors: []string{mirror}}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(certs, "docker.io", stateFileName))
	if err != nil {
		t.Fatal(err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	written, _ := os.ReadFile(filepath.Join(certs, "docker.io", "hosts.toml"))
	if st.Registry != "docker.io" || st.Original.Present || !slices.Equal(st.CreatedDirs, []string{"docker.io"}) || st.Written != digest(written) {
		t.Errorf("state = %+v", st)
	}
}

func TestConfigureRejects(t *testing.T) {
	certs := t.TempDir()
	tests := []struct {
		name    string
		opts    Options
		wantErr string
	}{
		{"no certs dir", Options{Registries: []string{"docker.io"}, Mirrors: []string{mirror}}, "no certs folder"},
		{"no registry", Options{CertsDir: certs, Mirrors: []string{mirror}}, "no registry"},
		{"no mirror", Options{CertsDir: certs, Registries: []string{"docker.io"}}, "no mirror"},
		{"path in registry", Options{CertsDir: certs, Registries: []string{"../etc"}, Mirrors: []string{mirror}}, "bad registry name"},
		{"twice", Options{CertsDir: certs, Registries: []string{"a.io", "a.io"}, Mirrors: []string{mirror}}, "twice"},
		{"bad mirror", Options{CertsDir: certs, Registries: []string{"a.io"}, Mirrors: []string{"ftp://x"}}, "scheme"},
		{"upstream for another registry", Options{CertsDir: certs, Registries: []string{"a.io"}, Mirrors: []string{mirror}, Upstreams: map[string]string{"b.io": "https://b"}}, "not a mirrored registry"},
		{"upstream not a URL", Options{CertsDir: certs, Registries: []string{"a.io"}, Mirrors: []string{mirror}, Upstreams: map[string]string{"a.io": "a.io"}}, "http or https URL"},
		{"upstream IPv6 without brackets", Options{CertsDir: certs, Registries: []string{"a.io"}, Mirrors: []string{mirror}, Upstreams: map[string]string{"a.io": "https://fd00::1:443"}}, "brackets"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Configure(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Configure error = %v, want %q", err, tt.wantErr)
			}
			if got := tree(t, certs); len(got) != 0 {
				t.Errorf("files written on error: %v", got)
			}
		})
	}
}

func TestDialTimeoutDefault(t *testing.T) {
	o := Options{CertsDir: "x", Registries: []string{"a.io"}, Mirrors: []string{mirror}}
	if err := o.validate(); err != nil || o.DialTimeout != 200*time.Millisecond {
		t.Fatalf("validate: %v, DialTimeout %v", err, o.DialTimeout)
	}
}
