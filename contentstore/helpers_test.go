package contentstore

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/peermirror/peermirror/internal/testenv"
)

const (
	// testRegistry is the registry host in image references; hosts.toml
	// maps it to the test registry, it is never resolved through DNS.
	testRegistry = "registry.test"
	// hangTimeout only detects hangs: healthy containerd answers in far
	// less.
	hangTimeout = 30 * time.Second
	// quickTimeout bounds calls that must fail fast while containerd is
	// down.
	quickTimeout = 10 * time.Second
	// leakGrace is how long goroutines may take to end after Close:
	// containerd's dialer keeps polling for a missing socket until its dial
	// timeout (2 s for a Store), ignoring cancellation.
	leakGrace = 10 * time.Second
)

// TestMain checks that no test leaves goroutines behind once every test's
// cleanups (store Close, containerd and registry stop) have run.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, leakOptions()...)
}

// leakOptions ignores goroutines that are global by design and not ours.
func leakOptions() []goleak.Option {
	return []goleak.Option{
		// testenv starts every child process from one goroutine locked to
		// its OS thread for the life of the test binary, so Pdeathsig
		// fires only when the test binary dies (see testenv.spawn).
		goleak.IgnoreTopFunction("github.com/peermirror/peermirror/internal/testenv.spawn.func1.1"),
	}
}

// verifyNoLeaks fails the test unless, within leakGrace, every goroutine
// is one that opts or leakOptions ignore.
func verifyNoLeaks(t *testing.T, opts ...goleak.Option) {
	t.Helper()
	opts = append(leakOptions(), opts...)
	deadline := time.Now().Add(leakGrace)
	for {
		err := goleak.Find(opts...)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutines left behind after %s: %v", leakGrace, err)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// skipShort skips integration tests under -short.
func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a real containerd and registry; skipped with -short")
	}
}

// env is one real containerd and one registry.
type env struct {
	ctrd   *testenv.Containerd
	reg    *testenv.Registry
	client *client.Client
	ctx    context.Context // carries the containerd namespace
}

func newEnv(t *testing.T) *env {
	t.Helper()
	skipShort(t)
	e := &env{ctrd: testenv.StartContainerd(t), reg: testenv.StartRegistry(t)}
	e.client = e.ctrd.Client(t)
	e.ctx = namespaces.WithNamespace(context.Background(), e.ctrd.Namespace)
	return e
}

// otherPlatform returns a platform that is not this machine's.
func otherPlatform() string {
	if testenv.LocalPlatform() == "linux/arm64" {
		return "linux/amd64"
	}
	return "linux/arm64"
}

// writeBlob commits b to containerd's content store with a gc root label,
// so garbage collection keeps it though no image names it.
func (e *env) writeBlob(t *testing.T, b []byte) digest.Digest {
	t.Helper()
	dgst := digest.FromBytes(b)
	desc := ocispec.Descriptor{Digest: dgst, Size: int64(len(b))}
	keep := content.WithLabels(map[string]string{
		"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339),
	})
	if err := content.WriteBlob(e.ctx, e.client.ContentStore(), "test-"+dgst.Encoded(), bytes.NewReader(b), desc, keep); err != nil {
		t.Fatalf("writing blob %s: %v", dgst, err)
	}
	return dgst
}

// newStore returns a Store of e's containerd with cfg's Address and
// Namespace filled in; t.Cleanup closes it.
func (e *env) newStore(t *testing.T, cfg Config) *Store {
	t.Helper()
	if cfg.Address == "" {
		cfg.Address = e.ctrd.Socket
	}
	if cfg.Namespace == "" {
		cfg.Namespace = e.ctrd.Namespace
	}
	s := New(cfg, zaptest.NewLogger(t))
	t.Cleanup(func() { s.Close() })
	return s
}

// startStore starts a Store of e's containerd and waits until it has
// connected and learnt every image: it subscribes before Start, so the
// subscription's own Resync comes first and the Resync published after the
// first connection second. The returned subscription has both consumed.
func (e *env) startStore(t *testing.T, cfg Config) (*Store, *Subscription) {
	t.Helper()
	s := e.newStore(t, cfg)
	sub := s.Subscribe()
	t.Cleanup(sub.Close)
	if err := s.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if ev := nextEvent(t, sub); ev.Kind != Resync {
		t.Fatalf("first event: got %v, want %v", ev.Kind, Resync)
	}
	if ev := nextEvent(t, sub); ev.Kind != Resync {
		t.Fatalf("event after connecting: got %+v, want %v", ev, Resync)
	}
	if !s.Connected() {
		t.Fatal("Connected() = false after the connection's Resync")
	}
	return s, sub
}

// nextEvent returns the subscription's next event, failing the test if none
// comes within hangTimeout.
func nextEvent(t *testing.T, sub *Subscription) Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	ev, err := sub.Next(ctx)
	if err != nil {
		t.Fatalf("waiting for an event: %v", err)
	}
	return ev
}

// waitEvents reads events until done, given every event so far, returns
// true; it fails the test after hangTimeout. It returns the events read.
func waitEvents(t *testing.T, sub *Subscription, what string, done func(seen []Event) bool) []Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	var seen []Event
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for %s: %v; events so far: %+v", what, err, seen)
		}
		t.Logf("event %v image=%q digest=%s", ev.Kind, ev.Image, ev.Digest)
		seen = append(seen, ev)
		if done(seen) {
			return seen
		}
	}
}

// waitUntil polls cond until it holds, failing the test after hangTimeout.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", hangTimeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// bounded runs f and fails the test if it does not return within
// quickTimeout. It returns how long f took.
func bounded(t *testing.T, what string, f func()) time.Duration {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return time.Since(start)
	case <-time.After(quickTimeout):
		t.Fatalf("%s did not return within %s", what, quickTimeout)
		return 0
	}
}
