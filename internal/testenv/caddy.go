package testenv

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// caddyBinaryEnv names a prebuilt Caddy with the plugin (make test sets it
// to bin/caddy); without it the tests build one once per test binary.
const caddyBinaryEnv = "PEERMIRROR_CADDY"

var (
	caddyOnce sync.Once
	caddyBin  string
	caddyErr  error
)

// CaddyBinary returns the path of a Caddy built with the peermirror plugin:
// $PEERMIRROR_CADDY when set, or else one built from ./cmd/caddy into a
// temporary directory (once per test binary).
func CaddyBinary(t T) string {
	t.Helper()
	root := RepoRoot(t)
	if bin := os.Getenv(caddyBinaryEnv); bin != "" {
		// relative to the repository, not to the package under test
		if !filepath.IsAbs(bin) {
			bin = filepath.Join(root, bin)
		}
		return bin
	}
	caddyOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pm-caddy-bin-")
		if err != nil {
			caddyErr = err
			return
		}
		caddyBin = filepath.Join(dir, "caddy")
		cmd := exec.Command("go", "build", "-o", caddyBin, "./cmd/caddy")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			caddyErr = fmt.Errorf("building caddy: %v\n%s", err, out)
		}
	})
	if caddyErr != nil {
		t.Fatalf("testenv: %v", caddyErr)
	}
	return caddyBin
}

// Caddy is a running Caddy process with the peermirror plugin.
type Caddy struct {
	// Dir holds the Caddyfile and the log.
	Dir string
	// URL is the mirror's base URL, http://127.0.0.1:<port>.
	URL string
	// Port is the mirror's port.
	Port int
	// AdminAddr is the admin API's address. With [InNetns] it is on the
	// namespace's own loopback, out of the test's reach.
	AdminAddr string
	// Netns is the network namespace Caddy runs in ([InNetns]), or "".
	Netns string

	caddyfile string
	bin       string
	logPath   string
	proc      *process
}

// StartCaddy runs Caddy with the Caddyfile that site returns for the
// mirror port and admin address it is given, and waits until GET /v2/
// answers 200. Debug logging is on, so each served request is logged.
// t.Cleanup stops it.
func StartCaddy(t T, site func(port int, admin string) string, opts ...CaddyOption) *Caddy {
	t.Helper()
	return StartCaddyWithBinary(t, CaddyBinary(t), site, opts...)
}

// StartCaddyWithBinary is [StartCaddy] with the Caddy binary at bin, such
// as one made by [BuildCaddy].
func StartCaddyWithBinary(t T, bin string, site func(port int, admin string) string, opts ...CaddyOption) *Caddy {
	t.Helper()
	c := &Caddy{bin: bin, Dir: makeTempDir(t, "pm-caddy-")}
	c.logPath = filepath.Join(c.Dir, "caddy.log")
	logTailOnFailure(t, "caddy", c.logPath)
	c.Port = FreePort(t)
	c.AdminAddr = fmt.Sprintf("127.0.0.1:%d", FreePort(t))
	c.URL = fmt.Sprintf("http://127.0.0.1:%d", c.Port)
	c.applyOptions(opts) // network namespace and addresses
	c.caddyfile = site(c.Port, c.AdminAddr)
	t.Cleanup(func() { c.Stop(t) })
	c.start(t)
	return c
}

func (c *Caddy) start(t T) {
	t.Helper()
	path := filepath.Join(c.Dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(c.caddyfile), 0o644); err != nil {
		t.Fatalf("testenv: writing Caddyfile: %v", err)
	}
	bin, args := c.command(t, "run", "--config", path, "--adapter", "caddyfile")
	p, err := startProcess("caddy", c.logPath, childEnv("HOME="+c.Dir, "XDG_DATA_HOME="+c.Dir, "XDG_CONFIG_HOME="+c.Dir),
		bin, args...)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	c.proc = p
	err = waitFor(p.done, func(ctx context.Context) bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.URL+"/v2/", nil)
		resp, err := loopbackClient.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if err != nil {
		t.Fatalf("testenv: starting caddy: %v\nlog tail:\n%s", err, logTail(c.logPath, 40, 16<<10))
	}
	t.Logf("testenv: caddy ready at %s (log %s)", c.URL, c.logPath)
}

// Stop stops Caddy; it is safe to call more than once.
func (c *Caddy) Stop(t T) {
	t.Helper()
	if c.proc == nil {
		return
	}
	if err := c.proc.stop(); err != nil {
		t.Errorf("testenv: %v", err)
	}
}

// Log returns Caddy's log so far.
func (c *Caddy) Log() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

// LogLines returns the log lines that contain every one of parts.
func (c *Caddy) LogLines(parts ...string) []string {
	var out []string
	for _, line := range strings.Split(c.Log(), "\n") {
		ok := line != ""
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// Get sends a GET for path (with query) to the mirror, bounded by a hang
// detector.
func (c *Caddy) Get(t T, path string, header ...string) (*http.Response, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	start := time.Now()
	resp, err := loopbackClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v (after %s)", path, err, time.Since(start))
	}
	defer resp.Body.Close()
	body, err := readAll(resp)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", path, err)
	}
	return resp, body
}

// loopbackClient is the HTTP client the harness uses to talk to the
// servers it starts: no proxy, loopback only.
var loopbackClient = &http.Client{Transport: loopbackTransport()}

// HTTPClient returns an HTTP client that talks only to loopback addresses.
func HTTPClient() *http.Client { return loopbackClient }

func readAll(resp *http.Response) ([]byte, error) {
	return io.ReadAll(resp.Body)
}

// RunCaddy runs the Caddy binary with args (such as "validate" or
// "list-modules") and returns its combined output.
func RunCaddy(t T, args ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	return runTool(childEnv("HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir), CaddyBinary(t), args...)
}

// WriteFile writes data to a file named name in a temporary directory and
// returns its path.
func WriteFile(t T, name, data string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// Caddyfile returns the Caddyfile Caddy was started with, or last loaded.
func (c *Caddy) Caddyfile() string { return c.caddyfile }

// Reload loads caddyfile through the admin API, as `caddy reload` does,
// and fails the test unless Caddy accepts it. Idle connections of the
// harness client are dropped: the old config's server closes them.
func (c *Caddy) Reload(t T, caddyfile string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+c.AdminAddr+"/load", strings.NewReader(caddyfile))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := loopbackClient.Do(req)
	if err != nil {
		t.Fatalf("testenv: reloading caddy: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("testenv: reloading caddy: %d %s", resp.StatusCode, body)
	}
	c.caddyfile = caddyfile
	loopbackClient.CloseIdleConnections()
}
