package contentstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/peermirror/peermirror/internal/testenv"
)

// storeFixture is one containerd holding pulled test images and blobs that
// no image names.
type storeFixture struct {
	*env
	oci    testenv.Image // OCI manifest, 2 layers
	docker testenv.Image // Docker schema 2 manifest, 2 layers
	index  testenv.Image // OCI index: local platform and one other
	gone   testenv.Image // pulled, then its root manifest deleted
	cri    testenv.Image // pulled through CRI (crictl), which adds a sha256:<id> record

	// blobs no image names
	bareManifest digest.Digest // OCI manifest JSON without mediaType
	bareIndex    digest.Digest // OCI index JSON without mediaType
	emptyJSON    digest.Digest // {}
}

func newStoreFixture(t *testing.T) *storeFixture {
	t.Helper()
	f := &storeFixture{env: newEnv(t)}
	f.oci = f.reg.PushRandomImage(t, "team/app", "v1", 2, 512<<10)
	f.docker = f.reg.PushDockerImage(t, "team/docker", "v1", 2, 64<<10)
	f.index = f.reg.PushIndex(t, "team/multi", "v1", []string{testenv.LocalPlatform(), otherPlatform()}, 2, 32<<10)
	f.gone = f.reg.PushRandomImage(t, "team/gone", "v1", 1, 8<<10)
	f.cri = f.reg.PushRandomImage(t, "team/cri", "v1", 1, 8<<10)
	for _, img := range []testenv.Image{f.oci, f.docker, f.index, f.gone} {
		f.ctrd.PullFromRegistry(t, f.reg, testRegistry, img)
	}
	if out, err := f.ctrd.Crictl(t, "pull", f.cri.Ref(testRegistry)); err != nil {
		t.Fatalf("crictl pull: %v\n%s", err, out)
	}
	if err := f.client.ContentStore().Delete(f.ctx, f.gone.Digest); err != nil {
		t.Fatalf("deleting the root of %s: %v", f.gone.Ref(testRegistry), err)
	}

	cfg := digest.FromString("not stored config")
	f.bareManifest = f.writeBlob(t, []byte(fmt.Sprintf(
		`{"schemaVersion":2,"config":{"mediaType":%q,"digest":%q,"size":2},"layers":[]}`,
		ocispec.MediaTypeImageConfig, cfg)))
	f.bareIndex = f.writeBlob(t, []byte(fmt.Sprintf(
		`{"schemaVersion":2,"manifests":[{"mediaType":%q,"digest":%q,"size":%d}]}`,
		ocispec.MediaTypeImageManifest, f.oci.Digest, f.oci.Sizes[f.oci.Digest])))
	f.emptyJSON = f.writeBlob(t, []byte("{}"))
	return f
}

// TestStore runs the read-only questions against one containerd.
func TestStore(t *testing.T) {
	f := newStoreFixture(t)
	s, _ := f.startStore(t, Config{})

	t.Run("Images", func(t *testing.T) { f.testImages(t, s) })
	t.Run("Resolve", func(t *testing.T) { f.testResolve(t, s) })
	t.Run("Descriptor", func(t *testing.T) { f.testDescriptor(t, s) })
	t.Run("DescriptorRacingWalk", func(t *testing.T) { f.testDescriptorRacingWalk(t, s) })
	t.Run("Digests", func(t *testing.T) { f.testDigests(t, s) })
	t.Run("ReadBlob", func(t *testing.T) { f.testReadBlob(t, s) })
	t.Run("Open", func(t *testing.T) { f.testOpen(t, s) })
}

func (f *storeFixture) testImages(t *testing.T, s *Store) {
	ctx := context.Background()

	// containerd itself holds CRI's sha256:<id> record, which must be
	// left out
	raw, err := f.client.ImageService().List(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	var idRecords []string
	for _, img := range raw {
		if strings.HasPrefix(img.Name, "sha256:") {
			idRecords = append(idRecords, img.Name)
		}
	}
	if len(idRecords) == 0 {
		t.Fatalf("CRI left no sha256:<id> record, so the test proves nothing; containerd holds %v", names(raw))
	}

	got, err := s.Images(ctx)
	if err != nil {
		t.Fatalf("Images: %v", err)
	}
	byName := map[string]Image{}
	for _, img := range got {
		if _, dup := byName[img.Name]; dup {
			t.Errorf("Images lists %s twice", img.Name)
		}
		byName[img.Name] = img
		if img.Ref == nil || img.Ref.String() != img.Name {
			t.Errorf("Images: %s has Ref %v", img.Name, img.Ref)
		}
	}
	criDigestRef := f.cri.DigestRef(testRegistry)
	want := []string{
		f.oci.Ref(testRegistry), f.docker.Ref(testRegistry), f.index.Ref(testRegistry),
		f.gone.Ref(testRegistry), f.cri.Ref(testRegistry), criDigestRef,
	}
	gotNames := make([]string, 0, len(got))
	for _, img := range got {
		gotNames = append(gotNames, img.Name)
	}
	slices.Sort(want)
	slices.Sort(gotNames)
	if !slices.Equal(gotNames, want) {
		t.Errorf("Images names:\n got %v\nwant %v\n(containerd holds %v)", gotNames, want, names(raw))
	}

	for _, img := range []testenv.Image{f.oci, f.docker, f.index, f.gone, f.cri} {
		refs := []string{img.Ref(testRegistry)}
		if img.Repo == f.cri.Repo {
			refs = append(refs, criDigestRef)
		}
		for _, ref := range refs {
			g, ok := byName[ref]
			if !ok {
				continue // reported above
			}
			want := ocispec.Descriptor{MediaType: img.MediaType, Digest: img.Digest, Size: img.Sizes[img.Digest]}
			if g.Target.Digest != want.Digest || g.Target.MediaType != want.MediaType || g.Target.Size != want.Size {
				t.Errorf("Images: %s targets %s %s (%d bytes), want %s %s (%d bytes)", ref,
					g.Target.MediaType, g.Target.Digest, g.Target.Size, want.MediaType, want.Digest, want.Size)
			}
		}
	}
}

func names(imgs []images.Image) []string {
	var out []string
	for _, img := range imgs {
		out = append(out, img.Name)
	}
	return out
}

func (f *storeFixture) testResolve(t *testing.T, s *Store) {
	ctx := context.Background()
	for _, tc := range []struct {
		ref string
		img testenv.Image
	}{
		{"registry.test/team/app:v1", f.oci},
		{f.docker.Ref(testRegistry), f.docker},
		{f.index.Ref(testRegistry), f.index},
		{f.cri.DigestRef(testRegistry), f.cri},
	} {
		desc, err := s.Resolve(ctx, tc.ref)
		if err != nil {
			t.Errorf("Resolve(%s): %v", tc.ref, err)
			continue
		}
		if desc.Digest != tc.img.Digest || desc.Size != tc.img.Sizes[tc.img.Digest] || desc.MediaType != tc.img.MediaType {
			t.Errorf("Resolve(%s) = %s %s (%d bytes), want %s %s (%d bytes)", tc.ref,
				desc.MediaType, desc.Digest, desc.Size, tc.img.MediaType, tc.img.Digest, tc.img.Sizes[tc.img.Digest])
		}
	}

	for _, ref := range []string{
		"registry.test/team/app:v2",         // unknown tag
		"registry.test/team/nothere:v1",     // unknown repository
		f.gone.Ref(testRegistry),            // record without its root content
		"sha256:" + strings.Repeat("0", 64), // not a name containerd holds
	} {
		if desc, err := s.Resolve(ctx, ref); !errors.Is(err, ErrNotFound) {
			t.Errorf("Resolve(%s) = %v, %v; want ErrNotFound", ref, desc.Digest, err)
		}
	}
}

func (f *storeFixture) testDescriptor(t *testing.T, s *Store) {
	ctx := context.Background()
	check := func(what string, dgst digest.Digest, wantType string, wantSize int64) {
		t.Helper()
		desc, err := s.Descriptor(ctx, dgst)
		if err != nil {
			t.Errorf("Descriptor(%s %s): %v", what, dgst, err)
			return
		}
		if desc.Digest != dgst || desc.MediaType != wantType || desc.Size != wantSize {
			t.Errorf("Descriptor(%s) = %s %s (%d bytes), want %s %s (%d bytes)",
				what, desc.MediaType, desc.Digest, desc.Size, wantType, dgst, wantSize)
		}
	}

	// every part of the pulled images, typed exactly as the registry got
	// them, Docker types included
	present := map[string][]digest.Digest{
		"oci":    f.oci.All(),
		"docker": f.docker.All(),
		"index":  append(append(slices.Clone(f.index.Manifests), f.index.Configs...), f.index.LayersFor[testenv.LocalPlatform()]...),
	}
	imgs := map[string]testenv.Image{"oci": f.oci, "docker": f.docker, "index": f.index}
	for name, digests := range present {
		img := imgs[name]
		for _, d := range digests {
			check(name, d, img.MediaTypes[d], img.Sizes[d])
		}
	}
	// the Docker types really are Docker's, so the check above means
	// something
	if got := f.docker.MediaTypes[f.docker.Configs[0]]; got != images.MediaTypeDockerSchema2Config {
		t.Fatalf("test image's config type is %s, want Docker's", got)
	}

	// content no image names: typed from its bytes
	check("bare manifest", f.bareManifest, ocispec.MediaTypeImageManifest, sizeOf(t, f, f.bareManifest))
	check("bare index", f.bareIndex, ocispec.MediaTypeImageIndex, sizeOf(t, f, f.bareIndex))
	check("{}", f.emptyJSON, MediaTypeOctetStream, 2)

	// never fetched, deleted, unknown
	var notFound []digest.Digest
	notFound = append(notFound, f.index.LayersFor[otherPlatform()]...)
	notFound = append(notFound, f.gone.Digest, digest.FromString("never stored"))
	for _, d := range notFound {
		if desc, err := s.Descriptor(ctx, d); !errors.Is(err, ErrNotFound) {
			t.Errorf("Descriptor(%s) = %+v, %v; want ErrNotFound", d, desc, err)
		}
	}

	for _, d := range []digest.Digest{"", "sha256:xyz", "sha256:" + digest.Digest(strings.Repeat("A", 64)), "md5:abc", "../../etc/passwd"} {
		desc, err := s.Descriptor(ctx, d)
		if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnavailable) {
			t.Errorf("Descriptor(%q) = %+v, %v; want an invalid digest error", d, desc, err)
		}
	}
}

func sizeOf(t *testing.T, f *storeFixture, d digest.Digest) int64 {
	t.Helper()
	info, err := f.client.ContentStore().Info(f.ctx, d)
	if err != nil {
		t.Fatalf("Info(%s): %v", d, err)
	}
	return info.Size
}

// testDescriptorRacingWalk asks for a config's descriptor while a walk of
// its image learns the config's type, as happens when a request comes in
// while a newly pulled image is being learnt: the type named by the
// manifest must win over the one detected from the config's bytes, however
// the two interleave.
func (f *storeFixture) testDescriptorRacingWalk(t *testing.T, s *Store) {
	ctx := context.Background()
	cfg := f.oci.Configs[0]
	want := f.oci.MediaTypes[cfg]
	root := ocispec.Descriptor{MediaType: f.oci.MediaType, Digest: f.oci.Digest, Size: f.oci.Sizes[f.oci.Digest]}
	for i := 0; i < 100; i++ {
		s.forget(cfg) // as before the image was learnt
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			if _, err := s.Digests(ctx, root); err != nil {
				t.Errorf("Digests: %v", err)
			}
		}()
		go func() {
			defer wg.Done()
			if _, err := s.Descriptor(ctx, cfg); err != nil {
				t.Errorf("Descriptor: %v", err)
			}
		}()
		wg.Wait()
		desc, err := s.Descriptor(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if desc.MediaType != want {
			t.Fatalf("round %d: after the walk, config %s has type %s, want %s", i, cfg, desc.MediaType, want)
		}
	}
}

func (f *storeFixture) testDigests(t *testing.T, s *Store) {
	ctx := context.Background()
	local, other := testenv.LocalPlatform(), otherPlatform()
	tests := []struct {
		name   string
		img    testenv.Image
		want   []digest.Digest
		absent []digest.Digest
	}{
		{
			name: "index",
			img:  f.index,
			// ctr fetched every platform's manifest and config, and the
			// local platform's layers only
			want:   append(append(slices.Clone(f.index.Manifests), f.index.Configs...), f.index.LayersFor[local]...),
			absent: f.index.LayersFor[other],
		},
		{name: "oci", img: f.oci, want: f.oci.All()},
		{name: "docker", img: f.docker, want: f.docker.All()},
		{name: "gone root", img: f.gone, absent: f.gone.All()},
	}
	for _, tc := range tests {
		root := ocispec.Descriptor{MediaType: tc.img.MediaType, Digest: tc.img.Digest, Size: tc.img.Sizes[tc.img.Digest]}
		got, err := s.Digests(ctx, root)
		if err != nil {
			t.Errorf("%s: Digests: %v", tc.name, err)
			continue
		}
		var gotDigests []digest.Digest
		for _, d := range got {
			gotDigests = append(gotDigests, d.Digest)
			if d.MediaType != tc.img.MediaTypes[d.Digest] || d.Size != tc.img.Sizes[d.Digest] {
				t.Errorf("%s: Digests gives %s as %s (%d bytes), want %s (%d bytes)", tc.name,
					d.Digest, d.MediaType, d.Size, tc.img.MediaTypes[d.Digest], tc.img.Sizes[d.Digest])
			}
		}
		if len(gotDigests) > 0 && gotDigests[0] != tc.img.Digest {
			t.Errorf("%s: Digests starts with %s, want the root %s", tc.name, gotDigests[0], tc.img.Digest)
		}
		want := slices.Clone(tc.want)
		slices.Sort(want)
		slices.Sort(gotDigests)
		if !slices.Equal(gotDigests, want) {
			t.Errorf("%s: Digests:\n got %v\nwant %v", tc.name, gotDigests, want)
		}
		for _, d := range tc.absent {
			if slices.Contains(gotDigests, d) {
				t.Errorf("%s: Digests lists %s, which containerd does not hold", tc.name, d)
			}
		}
	}
	if len(f.index.LayersFor[other]) == 0 {
		t.Fatal("index has no layers for the other platform; the test proves nothing")
	}
}

func (f *storeFixture) testReadBlob(t *testing.T, s *Store) {
	ctx := context.Background()
	desc := ocispec.Descriptor{MediaType: f.oci.MediaType, Digest: f.oci.Digest, Size: f.oci.Sizes[f.oci.Digest]}
	b, err := s.ReadBlob(ctx, desc, 4<<20)
	if err != nil {
		t.Fatalf("ReadBlob: %v", err)
	}
	if digest.FromBytes(b) != desc.Digest {
		t.Errorf("ReadBlob returned %d bytes with digest %s, want %s", len(b), digest.FromBytes(b), desc.Digest)
	}
	if _, err := s.ReadBlob(ctx, desc, desc.Size-1); err == nil {
		t.Errorf("ReadBlob with a limit under the size succeeded")
	}
	missing := ocispec.Descriptor{Digest: digest.FromString("never stored"), Size: 12}
	if _, err := s.ReadBlob(ctx, missing, 4<<20); !errors.Is(err, ErrNotFound) {
		t.Errorf("ReadBlob(missing) = %v, want ErrNotFound", err)
	}
}

func (f *storeFixture) testOpen(t *testing.T, discovered *Store) {
	if got := discovered.ContentDir(); got != f.ctrd.ContentDir {
		t.Errorf("ContentDir() = %q, want the discovered %q", got, f.ctrd.ContentDir)
	}
	configured, _ := f.startStore(t, Config{ContentDir: f.ctrd.ContentDir})
	if got := configured.ContentDir(); got != f.ctrd.ContentDir {
		t.Errorf("configured store: ContentDir() = %q, want %q", got, f.ctrd.ContentDir)
	}
	grpc, _ := f.startStore(t, Config{ContentDir: "/nonexistent/peermirror/content"})
	if got := grpc.ContentDir(); got != "" {
		t.Errorf("store with an unreadable content dir: ContentDir() = %q, want \"\"", got)
	}

	stores := []struct {
		name     string
		store    *Store
		wantFile bool
	}{
		{"discovered", discovered, true},
		{"configured", configured, true},
		{"grpc", grpc, false},
	}
	blobs := map[string]digest.Digest{
		"big layer": f.oci.Layers[0],
		"config":    f.oci.Configs[0],
		"manifest":  f.oci.Digest,
		"index":     f.index.Digest,
		"{}":        f.emptyJSON,
	}
	for what, dgst := range blobs {
		var ref []byte // the first store's bytes
		for _, st := range stores {
			c, err := st.store.Open(context.Background(), dgst)
			if err != nil {
				t.Errorf("%s: Open(%s %s): %v", st.name, what, dgst, err)
				continue
			}
			if (c.File() != nil) != st.wantFile {
				t.Errorf("%s: Open(%s): File() = %v, want a file: %v", st.name, what, c.File(), st.wantFile)
			}
			if c.Descriptor.Digest != dgst || c.Size() != sizeOf(t, f, dgst) {
				t.Errorf("%s: Open(%s): descriptor %+v", st.name, what, c.Descriptor)
			}
			full, err := io.ReadAll(c.Section(0, c.Size()))
			if err != nil {
				t.Errorf("%s: reading %s: %v", st.name, what, err)
			}
			if digest.FromBytes(full) != dgst {
				t.Errorf("%s: %s: read %d bytes with digest %s", st.name, what, len(full), digest.FromBytes(full))
			}
			if ref == nil {
				ref = full
			} else if !bytes.Equal(full, ref) {
				t.Errorf("%s: %s: bytes differ from %s's", st.name, what, stores[0].name)
			}
			if f := c.File(); f != nil {
				// the file itself, as sendfile would read it
				b, err := io.ReadAll(io.NewSectionReader(f, 0, c.Size()))
				if err != nil || !bytes.Equal(b, full) {
					t.Errorf("%s: %s: File() holds other bytes (%v)", st.name, what, err)
				}
			}
			checkReadAt(t, st.name+": "+what, c, full)
			if err := c.Close(); err != nil {
				t.Errorf("%s: closing %s: %v", st.name, what, err)
			}
		}
	}

	for _, st := range stores {
		missing := f.index.LayersFor[otherPlatform()][0]
		if c, err := st.store.Open(context.Background(), missing); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Open(never fetched layer) = %v, %v; want ErrNotFound", st.name, c, err)
		}
		if c, err := st.store.Open(context.Background(), "sha256:../../../etc/passwd"); err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Open(invalid digest) = %v, %v; want an invalid digest error", st.name, c, err)
		}
	}
}

// checkReadAt reads c at offsets across and past its end and compares the
// results with full, the blob's bytes: both readers must behave as an
// os.File does.
func checkReadAt(t *testing.T, what string, c *Content, full []byte) {
	t.Helper()
	size := int64(len(full))
	for _, off := range []int64{0, 1, size / 3, size / 2, size - 1, size, size + 10} {
		for _, n := range []int64{1, 7, 4096, 100 << 10, size + 1} {
			if off < 0 || n <= 0 {
				continue
			}
			p := make([]byte, n)
			got, err := c.ReadAt(p, off)
			wantN := min(n, max(size-off, 0))
			if int64(got) != wantN {
				t.Errorf("%s: ReadAt(%d bytes at %d) read %d bytes, want %d (err %v)", what, n, off, got, wantN, err)
				continue
			}
			if !bytes.Equal(p[:got], full[min(off, size):min(off, size)+wantN]) {
				t.Errorf("%s: ReadAt(%d bytes at %d): wrong bytes", what, n, off)
			}
			switch {
			case wantN == n && err != nil:
				t.Errorf("%s: ReadAt(%d bytes at %d): full read with error %v", what, n, off, err)
			case wantN < n && err != io.EOF:
				t.Errorf("%s: ReadAt(%d bytes at %d): short read (%d bytes) with error %v, want io.EOF", what, n, off, got, err)
			}
		}
	}
	if got, err := c.ReadAt(make([]byte, 8), -1); err == nil {
		t.Errorf("%s: ReadAt at offset -1 read %d bytes without error", what, got)
	}
}
