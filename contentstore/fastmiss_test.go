package contentstore

import (
	"context"
	"errors"
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
	s.dirConfirmed.Store(false)
	if d, err := s.Descriptor(ctx, img.Layers[0]); err != nil || d.Size != img.Sizes[img.Layers[0]] {
		t.Fatalf("with a wrong content folder, Descriptor(layer) = %+v, %v; want it found through containerd", d, err)
	}
	s.confirmDir(img.Layers[0], img.Sizes[img.Layers[0]])
	if s.dirConfirmed.Load() {
		t.Fatal("a folder without the blob was confirmed")
	}

	// containerd's own folder, confirmed by the walk of the pulled image
	s2, _ := e.startStore(t, Config{})
	deadline := time.Now().Add(30 * time.Second) // hang detector
	for !s2.dirConfirmed.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !s2.dirConfirmed.Load() {
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
}
