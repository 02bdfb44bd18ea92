package contentstore

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"

	"github.com/peermirror/peermirror/internal/testenv"
)

// TestEvents follows a pull, image deletions, and content written and
// deleted by hand.
func TestEvents(t *testing.T) {
	e := newEnv(t)
	s, sub := e.startStore(t, Config{})
	var all []Event // every event, in order
	follow := func(what string, done func(ev Event) bool) {
		t.Helper()
		seen := waitEvents(t, sub, what, func(seen []Event) bool {
			return done(seen[len(seen)-1])
		})
		all = append(all, seen...)
	}

	// a pull: every blob is committed, then the record is created
	img := e.reg.PushRandomImage(t, "team/new", "v1", 2, 16<<10)
	name := img.Ref(testRegistry)
	e.ctrd.PullFromRegistry(t, e.reg, testRegistry, img)
	var created bool
	announced := map[digest.Digest]bool{}
	follow("the pull's events", func(ev Event) bool {
		switch ev.Kind {
		case ImageCreated:
			created = created || ev.Image == name
		case ContentCreated:
			announced[ev.Digest] = true
		}
		for _, d := range img.All() {
			if !announced[d] {
				return false
			}
		}
		return created
	})
	// once ImageCreated is out, the new image's types are known
	for _, d := range img.All() {
		desc, err := s.Descriptor(context.Background(), d)
		if err != nil {
			t.Fatalf("Descriptor(%s) after ImageCreated: %v", d, err)
		}
		if desc.MediaType != img.MediaTypes[d] {
			t.Errorf("Descriptor(%s) after ImageCreated: type %s, want %s", d, desc.MediaType, img.MediaTypes[d])
		}
	}

	// deleting the record
	if err := e.client.ImageService().Delete(e.ctx, name, images.SynchronousDelete()); err != nil {
		t.Fatalf("deleting %s: %v", name, err)
	}
	follow("ImageDeleted "+name, func(ev Event) bool {
		return ev.Kind == ImageDeleted && ev.Image == name
	})
	// CRI keeps a record named by the image ID (the config digest) for
	// every image in k8s.io, which holds the content too; without it,
	// garbage collection removes the content
	idName := img.Configs[0].String()
	if err := e.client.ImageService().Delete(e.ctx, idName, images.SynchronousDelete()); err != nil && !errdefs.IsNotFound(err) {
		t.Fatalf("deleting %s: %v", idName, err)
	}
	waitUntil(t, "garbage collection to remove the image's content", func() bool {
		for _, d := range img.All() {
			if _, err := e.client.ContentStore().Info(e.ctx, d); !errdefs.IsNotFound(err) {
				return false
			}
		}
		return true
	})
	// collected content is gone for the store too, event or no event
	for _, d := range img.All() {
		if _, err := s.Descriptor(context.Background(), d); !errors.Is(err, ErrNotFound) {
			t.Errorf("Descriptor(%s) after its image was deleted and collected: %v, want ErrNotFound", d, err)
		}
	}

	// content committed and deleted by hand
	b := make([]byte, 1000)
	rand.Read(b)
	blob := e.writeBlob(t, b)
	follow("ContentCreated "+blob.String(), func(ev Event) bool {
		return ev.Kind == ContentCreated && ev.Digest == blob
	})
	if err := e.client.ContentStore().Delete(e.ctx, blob); err != nil {
		t.Fatalf("deleting %s: %v", blob, err)
	}
	follow("ContentDeleted "+blob.String(), func(ev Event) bool {
		return ev.Kind == ContentDeleted && ev.Digest == blob
	})

	// events arrive in order, so everything before the last one was seen
	gcDeleted := 0
	for _, ev := range all {
		switch ev.Kind {
		case Resync:
			t.Errorf("Resync while connected")
		case ImageCreated, ImageUpdated, ImageDeleted:
			if strings.HasPrefix(ev.Image, "sha256:") || ev.Image == "" {
				t.Errorf("%v for %q, a record Images leaves out", ev.Kind, ev.Image)
			}
		case ContentDeleted:
			if slices.Contains(img.All(), ev.Digest) {
				gcDeleted++
			}
		}
	}
	// containerd (v2.4) publishes /content/delete for explicit deletes
	// only, never for what garbage collection removes
	t.Logf("ContentDeleted events for the %d blobs garbage collection removed: %d", len(img.All()), gcDeleted)

	// closing the store ends its subscriptions
	other := s.Subscribe()
	if ev := nextEvent(t, other); ev.Kind != Resync {
		t.Errorf("first event of a new subscription: %v, want Resync", ev.Kind)
	}
	bounded(t, "Close", func() { s.Close() })
	for _, sb := range []*Subscription{sub, other} {
		ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
		for {
			ev, err := sb.Next(ctx)
			if err != nil {
				if ctx.Err() != nil {
					t.Errorf("Next after Close hung: %v", err)
				}
				break
			}
			t.Logf("event queued before Close: %+v", ev)
		}
		cancel()
	}
}

// TestEventsNamespace checks that changes in another namespace are not
// reported.
func TestEventsNamespace(t *testing.T) {
	e := newEnv(t)
	_, sub := e.startStore(t, Config{})

	// a blob in another namespace, then a marker in ours: events arrive in
	// order, so the marker proves the first was seen and dropped
	other := &env{ctrd: e.ctrd, reg: e.reg, client: e.client,
		ctx: namespaces.WithNamespace(context.Background(), "default")}
	b := make([]byte, 100)
	rand.Read(b)
	foreign := other.writeBlob(t, b)
	rand.Read(b)
	marker := e.writeBlob(t, b)
	seen := waitEvents(t, sub, "the marker's ContentCreated", func(seen []Event) bool {
		ev := seen[len(seen)-1]
		return ev.Kind == ContentCreated && ev.Digest == marker
	})
	for _, ev := range seen {
		if ev.Digest == foreign {
			t.Errorf("store reported %v for %s, written in another namespace", ev.Kind, foreign)
		}
	}
}

// TestReconnect kills containerd under a started store and brings it back.
func TestReconnect(t *testing.T) {
	e := newEnv(t)
	img := e.reg.PushRandomImage(t, "team/app", "v1", 1, 16<<10)
	e.ctrd.PullFromRegistry(t, e.reg, testRegistry, img)
	name := img.Ref(testRegistry)
	s, sub := e.startStore(t, Config{})
	if _, err := s.Resolve(context.Background(), name); err != nil {
		t.Fatalf("Resolve before the crash: %v", err)
	}

	e.ctrd.Kill(t)
	waitUntil(t, "Connected() to turn false", func() bool { return !s.Connected() })

	ctx := context.Background()
	calls := []struct {
		name string
		call func() error
	}{
		{"Images", func() error { _, err := s.Images(ctx); return err }},
		{"Resolve", func() error { _, err := s.Resolve(ctx, name); return err }},
		{"Descriptor", func() error { _, err := s.Descriptor(ctx, img.Layers[0]); return err }},
		{"Digests", func() error {
			_, err := s.Digests(ctx, descOf(img))
			return err
		}},
		{"Open", func() error {
			c, err := s.Open(ctx, img.Layers[0])
			if err == nil {
				c.Close()
			}
			return err
		}},
		{"ReadBlob", func() error { _, err := s.ReadBlob(ctx, descOf(img), 1<<20); return err }},
	}
	for _, c := range calls {
		var err error
		took := bounded(t, c.name+" while containerd is down", func() { err = c.call() })
		if !errors.Is(err, ErrUnavailable) {
			t.Errorf("%s while containerd is down: %v, want ErrUnavailable", c.name, err)
		}
		t.Logf("%s while containerd is down failed in %s: %v", c.name, took.Round(time.Millisecond), err)
	}
	if s.Connected() {
		t.Errorf("Connected() = true while containerd is down")
	}

	start := time.Now()
	e.ctrd.Restart(t)
	waitUntil(t, "Connected() to turn true", s.Connected)
	waitEvents(t, sub, "Resync after the restart", func(seen []Event) bool {
		return seen[len(seen)-1].Kind == Resync
	})
	t.Logf("store reconnected %s after containerd was restarted", time.Since(start).Round(time.Millisecond))
	desc, err := s.Resolve(context.Background(), name)
	if err != nil {
		t.Fatalf("Resolve after the restart: %v", err)
	}
	if desc.Digest != img.Digest {
		t.Errorf("Resolve after the restart: %s, want %s", desc.Digest, img.Digest)
	}
	if got := s.ContentDir(); got != e.ctrd.ContentDir {
		t.Errorf("ContentDir() after the restart = %q, want %q", got, e.ctrd.ContentDir)
	}

	// events flow again on the same subscription
	b := make([]byte, 100)
	rand.Read(b)
	blob := e.writeBlob(t, b)
	waitEvents(t, sub, "ContentCreated after the restart", func(seen []Event) bool {
		ev := seen[len(seen)-1]
		return ev.Kind == ContentCreated && ev.Digest == blob
	})
}

func descOf(img testenv.Image) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: img.MediaType, Digest: img.Digest, Size: img.Sizes[img.Digest]}
}

// TestStartCloseLeavesNothing starts a store, uses it, closes it, and
// checks that none of its goroutines (nor its gRPC connection's) are left.
func TestStartCloseLeavesNothing(t *testing.T) {
	e := newEnv(t)
	img := e.reg.PushRandomImage(t, "team/app", "v1", 1, 16<<10)
	e.ctrd.PullFromRegistry(t, e.reg, testRegistry, img)
	before := goleak.IgnoreCurrent()

	s := New(Config{Address: e.ctrd.Socket, Namespace: e.ctrd.Namespace, ContentDir: "/nonexistent"}, zaptest.NewLogger(t))
	sub := s.Subscribe()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, sub)
	nextEvent(t, sub)
	// a gRPC read leaves a stream behind if anything is not closed
	c, err := s.Open(context.Background(), img.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(make([]byte, 10), 5); err != nil {
		t.Fatal(err)
	}
	c.Close()
	bounded(t, "Close", func() { s.Close() })
	if s.Connected() {
		t.Error("Connected() = true after Close")
	}
	// events queued before the close may still be read; then Next ends
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	for n := 0; ; n++ {
		ev, err := sub.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				t.Fatal("Next after Close hung")
			}
			break
		}
		if ev.Kind != Resync || n > 2 {
			t.Fatalf("Next after Close returned %v as event %d", ev.Kind, n)
		}
	}
	sub.Close()
	verifyNoLeaks(t, before)
}

// TestCloseWhileAway closes a store whose containerd never answered.
func TestCloseWhileAway(t *testing.T) {
	before := goleak.IgnoreCurrent()
	sock := filepath.Join(t.TempDir(), "nobody.sock")
	s := New(Config{Address: sock, Namespace: "k8s.io", CallTimeout: time.Second}, zaptest.NewLogger(t))
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	if s.Connected() {
		t.Error("Connected() = true without a containerd")
	}
	var err error
	bounded(t, "Resolve without a containerd", func() {
		_, err = s.Resolve(context.Background(), "registry.test/team/app:v1")
	})
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("Resolve without a containerd: %v, want ErrUnavailable", err)
	}
	sub := s.Subscribe()
	defer sub.Close()
	bounded(t, "Close", func() { s.Close() })
	bounded(t, "second Close", func() { s.Close() })
	verifyNoLeaks(t, before)
}

// TestCloseNeverStarted closes a store that was never started, twice.
func TestCloseNeverStarted(t *testing.T) {
	s := New(Config{}, nil)
	sub := s.Subscribe()
	bounded(t, "Close", func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	bounded(t, "second Close", func() {
		if err := s.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
	if s.Connected() {
		t.Error("Connected() = true on a store never started")
	}
	if _, err := s.Resolve(context.Background(), "registry.test/team/app:v1"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Resolve on a closed store: %v, want ErrUnavailable", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	var got []EventKind
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			if ctx.Err() != nil {
				t.Fatal("Next on a closed store hung")
			}
			break
		}
		got = append(got, ev.Kind)
	}
	if !slices.Equal(got, []EventKind{Resync}) {
		t.Errorf("events before the close: %v, want [Resync]", got)
	}
	sub.Close()
}

// TestStall freezes containerd (SIGSTOP) under a started store: calls must
// turn into quick ErrUnavailable misses, and once containerd answers again
// the store must say so, though its event stream never broke.
func TestStall(t *testing.T) {
	e := newEnv(t)
	img := e.reg.PushRandomImage(t, "team/app", "v1", 1, 16<<10)
	e.ctrd.PullFromRegistry(t, e.reg, testRegistry, img)
	name := img.Ref(testRegistry)
	s, sub := e.startStore(t, Config{CallTimeout: time.Second})

	pid := containerdPID(t, e.ctrd)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("stopping containerd: %v", err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
				t.Errorf("resuming containerd: %v", err)
			}
		}
	}
	t.Cleanup(resume) // before the harness stops it

	var err error
	took := bounded(t, "Resolve while containerd is frozen", func() {
		_, err = s.Resolve(context.Background(), name)
	})
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("Resolve while containerd is frozen: %v, want ErrUnavailable", err)
	}
	t.Logf("Resolve while containerd is frozen failed in %s: %v", took.Round(time.Millisecond), err)
	if s.Connected() {
		t.Errorf("Connected() = true after a call timed out")
	}

	resume()
	bounded(t, "Resolve after containerd resumed", func() {
		_, err = s.Resolve(context.Background(), name)
	})
	if err != nil {
		t.Fatalf("Resolve after containerd resumed: %v", err)
	}
	if !s.Connected() {
		t.Errorf("Connected() = false though containerd answered the last call")
	}
	// the event stream lived through the freeze: no resync, events flow
	b := make([]byte, 100)
	rand.Read(b)
	blob := e.writeBlob(t, b)
	seen := waitEvents(t, sub, "ContentCreated after the freeze", func(seen []Event) bool {
		ev := seen[len(seen)-1]
		return ev.Kind == ContentCreated && ev.Digest == blob
	})
	t.Logf("events after the freeze: %d", len(seen))
}

// containerdPID finds the pid of c's daemon by its config file argument,
// which is unique to c.
func containerdPID(t *testing.T, c *testenv.Containerd) int {
	t.Helper()
	cfg := filepath.Join(c.Dir, "config.toml")
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) == "containerd" && slices.Contains(args, cfg) {
			return pid
		}
	}
	t.Fatalf("no containerd process with --config %s", cfg)
	return 0
}
