package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Registry is a CNCF distribution registry (the "registry" binary) serving
// plain HTTP on 127.0.0.1, started by [StartRegistry].
type Registry struct {
	// Addr is "127.0.0.1:<port>".
	Addr string
	// URL is "http://" + Addr.
	URL string
	// Dir is the temporary directory holding config, data and log.
	Dir string

	logPath string

	mu   sync.Mutex
	proc *process
}

// Request is one line of the registry's access log.
type Request struct {
	Method    string // "GET", "HEAD", ...
	Path      string // request URI with query, e.g. "/v2/team/app/manifests/v1?ns=registry.test"
	Status    int    // HTTP status code
	Bytes     int64  // body bytes sent
	UserAgent string
}

// String returns "METHOD PATH".
func (r Request) String() string { return r.Method + " " + r.Path }

// StartRegistry starts a registry with filesystem storage in a fresh
// directory and waits until it accepts connections. t.Cleanup stops it and
// removes its directory; if the test failed, the tail of its log is logged.
func StartRegistry(t T) *Registry {
	t.Helper()
	bin := ToolPath(t, "registry")
	dir := makeTempDir(t, "pm-reg-")
	r := &Registry{Dir: dir, logPath: filepath.Join(dir, "registry.log")}
	t.Cleanup(func() { r.Stop(t) })
	logTailOnFailure(t, "registry", r.logPath)
	// FreePort can race with other processes: retry on a new port if the
	// registry exits right away.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		addr := fmt.Sprintf("127.0.0.1:%d", FreePort(t))
		cfgPath := filepath.Join(dir, "config.yml")
		cfg := fmt.Sprintf(`version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: peermirror-testenv
`, filepath.Join(dir, "data"), addr)
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			t.Fatalf("testenv: starting registry: writing config: %v", err)
		}
		p, err := startProcess("registry", r.logPath, childEnv("OTEL_TRACES_EXPORTER=none"), bin, "serve", cfgPath)
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		r.mu.Lock()
		r.proc = p
		r.mu.Unlock()
		err = waitFor(p.done, func(ctx context.Context) bool {
			// A bare TCP connect, so readiness probes leave no access log
			// lines.
			var d net.Dialer
			conn, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return false
			}
			conn.Close()
			return true
		})
		if err == nil {
			r.Addr = addr
			r.URL = "http://" + addr
			t.Logf("testenv: registry ready at %s (log %s)", r.URL, r.logPath)
			return r
		}
		p.kill()
		lastErr = fmt.Errorf("starting registry at %s: %w (exit: %v)", addr, err, p.waitErr)
		if !strings.Contains(logTail(r.logPath, 20, 8<<10), "address already in use") {
			break
		}
	}
	t.Fatalf("testenv: %v (registry log tail follows)", lastErr)
	return nil
}

// Stop stops the registry (SIGTERM, SIGKILL after 30 s) and waits for it to
// exit. It does nothing if the registry is not running.
func (r *Registry) Stop(t T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.proc == nil {
		return
	}
	if err := r.proc.stop(); err != nil {
		t.Errorf("testenv: %v", err)
	}
}

// Log returns the registry's whole log (application log and access log).
func (r *Registry) Log() string {
	b, err := os.ReadFile(r.logPath)
	if err != nil {
		return fmt.Sprintf("(no registry log: %v)", err)
	}
	return string(b)
}

// LogPath returns the path of the registry log file.
func (r *Registry) LogPath() string { return r.logPath }

// accessLogLine matches a combined-log-format line such as
// 127.0.0.1 - - [04/Dec/2026:17:08:48 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
var accessLogLine = regexp.MustCompile(`^\S+ \S+ \S+ \[[^\]]*\] "([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) (\S+) "[^"]*" "([^"]*)"`)

// AccessLog returns every request in the registry's access log so far, in
// order. The registry writes a line once it has handled a request.
func (r *Registry) AccessLog() []Request {
	b, err := os.ReadFile(r.logPath)
	if err != nil {
		return nil
	}
	var reqs []Request
	for _, line := range strings.Split(string(b), "\n") {
		m := accessLogLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		status, _ := strconv.Atoi(m[3])
		n, _ := strconv.ParseInt(m[4], 10, 64) // "-" for none
		reqs = append(reqs, Request{Method: m[1], Path: m[2], Status: status, Bytes: n, UserAgent: m[5]})
	}
	return reqs
}

// Requests returns the request lines logged so far as "METHOD PATH", e.g.
// "GET /v2/team/app/blobs/sha256:...?ns=registry.test". PATH is the request
// URI with its query: containerd adds "?ns=<registry host>" whenever the host
// it asks (server or mirror from hosts.toml) differs from the host in the
// image reference. Readiness probes are bare TCP connects and leave no line.
func (r *Registry) Requests() []string {
	reqs := r.AccessLog()
	out := make([]string, len(reqs))
	for i, q := range reqs {
		out[i] = q.String()
	}
	return out
}

// WaitForRequest waits (30 s bound) until the access log holds a request
// whose "METHOD PATH" equals request, and calls t.Fatal if none appears.
// The registry logs a request when its handler returns, which can be a
// moment after the client has read the response.
func (r *Registry) WaitForRequest(t T, request string) {
	t.Helper()
	deadline := time.Now().Add(hangTimeout)
	for {
		for _, q := range r.Requests() {
			if q == request {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: registry did not log %q in %s; requests:\n%s",
				request, hangTimeout, strings.Join(r.Requests(), "\n"))
		}
		time.Sleep(pollInterval)
	}
}

// Pid returns the registry's process ID, or 0 before it started.
func (r *Registry) Pid() int {
	if r.proc == nil {
		return 0
	}
	return r.proc.cmd.Process.Pid
}
