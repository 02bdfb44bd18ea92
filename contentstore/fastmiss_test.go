package contentstore

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Once the content directory proved to be containerd's, a digest with no
// blob file is a miss without a round trip to containerd; until then, and
// for a folder that never proves itself, containerd is asked.
func TestDescriptorFastMiss(t *testing.T) {
	e := newEnv(t)
	img := e.reg.PushRandomImage(t, "team/fast", "v1", 1, 8<<10)
	e.ctrd.PullFromRegistry(t, e.reg, testRegistry, img)
	missing := digest.FromString("nobody has this")
	ctx := context.Background()

	// a folder that is not containerd's: never trusted for a miss
	s := e.newStore(t, Config{})
	s.useContentDir(t.TempDir())
	if _, err := s.Descriptor(ctx, img.Layers[0]); err == nil {
		t.Fatal("Descriptor before Start succeeded") // premise: no connection yet
	}
	s, _ = e.startStore(t, Config{})
	s.useContentDir(t.TempDir())
	if d, err := s.Descriptor(ctx, img.Layers[0]); err != nil || d.Size != img.Sizes[img.Layers[0]] {
		t.Fatalf("with a wrong content folder, Descriptor(layer) = %+v, %v; want it found through containerd", d, err)
	}
	s.confirmDir(img.Layers[0], img.Sizes[img.Layers[0]])
	if s.contentDir.Load().confirmed.Load() {
		t.Fatal("a folder without the blob was confirmed")
	}

	// containerd's own folder, confirmed by the walk of the pulled image
	s2, _ := e.startStore(t, Config{})
	deadline := time.Now().Add(30 * time.Second) // hang detector
	for !s2.contentDir.Load().confirmed.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !s2.contentDir.Load().confirmed.Load() {
		t.Fatalf("content folder %q never confirmed", s2.ContentDir())
	}
	// with containerd stopped, only the file check can answer
	e.ctrd.Stop(t)
	if _, err := s2.Descriptor(ctx, missing); !errors.Is(err, ErrNotFound) {
		t.Errorf("Descriptor(missing) with containerd stopped = %v, want ErrNotFound from the file check", err)
	}
	if _, err := s2.Descriptor(ctx, img.Layers[0]); errors.Is(err, ErrNotFound) || err == nil {
		t.Errorf("Descriptor(present) with containerd stopped = %v, want it to need containerd", err)
	}

	// a confirmed folder that goes away (an unmounted volume) is no longer
	// trusted for misses
	layer := img.Layers[0]
	b, err := os.ReadFile(filepath.Join(s2.ContentDir(), "blobs", "sha256", layer.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	copyDir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(copyDir, "blobs", "sha256"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(copyDir, "blobs", "sha256", layer.Encoded()), b, 0o644); err != nil {
		t.Fatal(err)
	}
	s2.useContentDir(copyDir)
	s2.confirmDir(layer, int64(len(b)))
	if _, err := s2.Descriptor(ctx, missing); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Descriptor(missing) in the confirmed copy = %v, want ErrNotFound", err)
	}
	if err := os.RemoveAll(filepath.Join(copyDir, "blobs")); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Descriptor(ctx, missing); errors.Is(err, ErrNotFound) {
		t.Error("a vanished content folder still answers misses")
	}
	// an unreadable new folder drops the old one and its confirmation
	if err := os.MkdirAll(filepath.Join(copyDir, "blobs", "sha256"), 0o755); err != nil {
		t.Fatal(err)
	}
	s2.useContentDir(filepath.Join(copyDir, "not-there"))
	if s2.ContentDir() != "" {
		t.Errorf("after an unreadable folder, ContentDir() = %q, want none", s2.ContentDir())
	}
	if _, err := s2.Descriptor(ctx, missing); errors.Is(err, ErrNotFound) {
		t.Error("after an unreadable folder, the old confirmed one still answers misses")
	}
}
