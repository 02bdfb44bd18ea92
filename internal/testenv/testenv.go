// Package testenv starts real components for peermirror's integration tests:
// containerd daemons (each with its own root, state, socket and certs.d
// directory), the ctr and crictl clients, and a CNCF distribution registry
// filled with random test images built with go-containerregistry.
//
// The binaries come from <repo root>/.tools/bin (see hack/install-tools.sh,
// "make tools"). Every process runs in its own process group with its output
// in a log file; t.Cleanup stops it and removes its directories, and on test
// failure the tail of each log is added to the test output.
//
// Network rule: everything talks only to 127.0.0.1, or to the addresses of
// the network namespaces and bridges a test makes with [NewNetwork] (private
// ranges that exist only on those bridges, for as long as the network
// lives). Registry host names used in image references (such as
// "registry.test") must only ever be mapped to such servers through
// hosts.toml files written by [Containerd.WriteHostsToml]; they are never
// resolved through DNS.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// hangTimeout bounds every wait for a process to become ready or to
	// exit. It only detects hangs: healthy components answer in well under
	// a second.
	hangTimeout = 30 * time.Second
	// commandTimeout bounds one run of ctr or crictl.
	commandTimeout = 3 * time.Minute
	// pollInterval is the pause between readiness probes.
	pollInterval = 25 * time.Millisecond
	// keepEnv, when set to a non-empty value, keeps the temporary
	// directories (configs, data, logs) after the test for inspection.
	keepEnv = "PEERMIRROR_TESTENV_KEEP"
)

var (
	repoRootOnce sync.Once
	repoRootDir  string
	repoRootErr  error
)

// RepoRoot returns the repository root: the nearest directory at or above the
// working directory that holds go.mod. It calls t.Fatal if there is none.
func RepoRoot(t T) string {
	t.Helper()
	repoRootOnce.Do(func() {
		repoRootDir, repoRootErr = findRepoRoot()
	})
	if repoRootErr != nil {
		t.Fatalf("testenv: %v", repoRootErr)
	}
	return repoRootDir
}

func findRepoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("finding repo root: %w", err)
	}
	for dir := wd; ; {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("finding repo root: no go.mod in %s or any parent", wd)
		}
		dir = parent
	}
}

// ToolPath returns the path of .tools/bin/<name> under the repository root.
// It calls t.Fatal with a hint to run "make tools" if the binary is missing.
func ToolPath(t T, name string) string {
	t.Helper()
	p := filepath.Join(RepoRoot(t), ".tools", "bin", name)
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatalf("testenv: tool %q not found at %s (run make tools, or hack/install-tools.sh): %v", name, p, err)
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		t.Fatalf("testenv: tool %q at %s is not an executable file (run make tools, or hack/install-tools.sh)", name, p)
	}
	return p
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// Another process may still take it before the caller binds it.
func FreePort(t T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// LocalPlatform returns the platform of this machine as "os/arch", e.g.
// "linux/amd64": the platform ctr and CRI unpack by default.
func LocalPlatform() string {
	return runtime.GOOS + "/" + runtime.GOARCH
}

// ownerFile, in each directory made by makeTempDir, holds the pid of the
// test binary that made it.
const ownerFile = ".testenv-owner"

var sweepOnce sync.Once

// makeTempDir creates a short directory under /tmp (unix socket paths are
// limited to 108 bytes, and t.TempDir paths can be long) and registers its
// removal in t.Cleanup, after unmounting anything left mounted below it.
// The first call in a test binary also removes directories left behind by
// test binaries that were killed (their processes died with them).
func makeTempDir(t T, prefix string) string {
	t.Helper()
	sweepOnce.Do(func() { sweepStale(t) })
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatalf("testenv: creating temp dir: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		t.Fatalf("testenv: creating temp dir: %v", err)
	}
	t.Cleanup(func() {
		if os.Getenv(keepEnv) != "" {
			t.Logf("testenv: keeping %s (%s is set)", dir, keepEnv)
			return
		}
		unmountBelow(t, dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("testenv: removing %s: %v", dir, err)
		}
	})
	return dir
}

// sweepStale removes /tmp/pm-* directories whose owner test binary is gone
// (killed before its cleanups ran, e.g. by a test timeout or SIGPIPE).
// Directories of live test binaries, and ones without an owner file, are
// left alone.
func sweepStale(t T) {
	dirs, _ := filepath.Glob("/tmp/pm-*")
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 {
			continue
		}
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			continue // alive (or not ours to judge)
		}
		unmountBelow(t, dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("testenv: removing stale %s: %v", dir, err)
			continue
		}
		t.Logf("testenv: removed stale %s (owner pid %d is gone)", dir, pid)
	}
}

// unmountBelow lazily unmounts every mount point under dir (overlay mounts
// left by an interrupted unpack), deepest first.
func unmountBelow(t T, dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if strings.HasPrefix(mp, dir+"/") {
			points = append(points, mp)
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		if err := syscall.Unmount(points[i], syscall.MNT_DETACH); err != nil {
			t.Logf("testenv: unmounting %s: %v", points[i], err)
		}
	}
}

// unescapeMountinfo decodes the octal escapes (\040 for space, ...) used in
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v := 0
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + int(c-'0')
			}
			if ok {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// childEnv returns the environment for started processes: ours without proxy
// settings (all traffic is to loopback), plus extra "KEY=value" entries.
func childEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "GRPC_PROXY":
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// checkLoopbackURL returns an error unless u is an http or https URL whose
// host is a loopback IP address or an address of a live test [Network].
func checkLoopbackURL(u string) error {
	pu, err := url.Parse(u)
	if err != nil {
		return fmt.Errorf("parsing %q: %w", u, err)
	}
	if pu.Scheme != "http" && pu.Scheme != "https" {
		return fmt.Errorf("%q: scheme must be http or https", u)
	}
	ip, err := netip.ParseAddr(pu.Hostname())
	if err != nil || !allowedIP(ip) {
		return fmt.Errorf(
			"%q: host must be a loopback IP address (127.0.0.0/8 or ::1) or one of "+
				"a test network, never a name or another address", u)
	}
	return nil
}

// loopbackTransport returns an HTTP transport that uses no proxy and refuses
// to connect anywhere but loopback addresses and those of live test
// networks.
func loopbackTransport() *http.Transport {
	d := &net.Dialer{
		Timeout: hangTimeout,
		Control: func(network, address string, _ syscall.RawConn) error {
			host, _, err := net.SplitHostPort(address)
			if err != nil {
				return err
			}
			if ip, err := netip.ParseAddr(host); err != nil || !allowedIP(ip) {
				return fmt.Errorf("testenv: refusing to connect to non-loopback address %s", address)
			}
			return nil
		},
	}
	return &http.Transport{
		Proxy:                 nil,
		DialContext:           d.DialContext,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       30 * time.Second,
		ResponseHeaderTimeout: hangTimeout,
	}
}

// waitFor polls cond every pollInterval until it returns true, the process
// exits (exited is closed) or hangTimeout passes.
func waitFor(exited <-chan struct{}, cond func(ctx context.Context) bool) error {
	deadline := time.Now().Add(hangTimeout)
	for {
		select {
		case <-exited:
			return errors.New("process exited")
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		ok := cond(ctx)
		cancel()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s", hangTimeout)
		}
		select {
		case <-exited:
			return errors.New("process exited")
		case <-time.After(pollInterval):
		}
	}
}

// T is the part of testing.TB the harness uses. Tests pass their
// *testing.T; the demo program passes its own implementation.
type T interface {
	Helper()
	Cleanup(func())
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Failed() bool
	TempDir() string
}
