package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	crand "crypto/rand"
	"fmt"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// Image describes a test image pushed to a [Registry]: its root (manifest or
// index) and every object in its tree.
type Image struct {
	// Repo is the repository, e.g. "team/app".
	Repo string
	// Tag is the tag the root was pushed under.
	Tag string
	// Digest is the digest of the root: the manifest, or the index.
	Digest digest.Digest
	// MediaType is the media type of the root.
	MediaType string
	// Manifests holds every manifest and index digest in the tree, root
	// first, then the platform manifests in index order.
	Manifests []digest.Digest
	// Configs holds every config digest, in manifest order.
	Configs []digest.Digest
	// Layers holds every layer digest, in manifest order (platform by
	// platform for an index).
	Layers []digest.Digest
	// MediaTypes maps every digest in the tree to its media type.
	MediaTypes map[digest.Digest]string
	// Sizes maps every digest in the tree to its size in bytes.
	Sizes map[digest.Digest]int64
	// Platforms lists, for an index, the platform of each manifest as
	// "os/arch[/variant]", in index order. Empty for a single manifest.
	Platforms []string
	// ManifestFor maps, for an index, each platform to its manifest digest.
	ManifestFor map[string]digest.Digest
	// ConfigFor maps the platform of each manifest (also of a single
	// manifest) to its config digest.
	ConfigFor map[string]digest.Digest
	// LayersFor maps the platform of each manifest (also of a single
	// manifest) to its layer digests, in order.
	LayersFor map[string][]digest.Digest
}

// Ref returns the reference "<registryHost>/<Repo>:<Tag>".
func (img Image) Ref(registryHost string) string {
	return registryHost + "/" + img.Repo + ":" + img.Tag
}

// DigestRef returns the reference "<registryHost>/<Repo>@<Digest>".
func (img Image) DigestRef(registryHost string) string {
	return registryHost + "/" + img.Repo + "@" + img.Digest.String()
}

// IsIndex reports whether the root is an index (OCI image index or Docker
// manifest list).
func (img Image) IsIndex() bool {
	return img.MediaType == string(types.OCIImageIndex) || img.MediaType == string(types.DockerManifestList)
}

// All returns every digest in the tree: manifests, configs, then layers.
func (img Image) All() []digest.Digest {
	all := append([]digest.Digest{}, img.Manifests...)
	all = append(all, img.Configs...)
	return append(all, img.Layers...)
}

// PlatformDigests returns what a pull for platform needs: the root, and for
// an index the platform's manifest, then the config and layers. For a single
// manifest it returns all digests whatever the platform. It returns nil if
// an index has no such platform.
func (img Image) PlatformDigests(platform string) []digest.Digest {
	if !img.IsIndex() {
		return img.All()
	}
	m, ok := img.ManifestFor[platform]
	if !ok {
		return nil
	}
	out := []digest.Digest{img.Digest, m, img.ConfigFor[platform]}
	return append(out, img.LayersFor[platform]...)
}

// PushRandomImage pushes an image with OCI media types (OCI manifest, OCI
// config, gzip'd OCI layers) of the given number of random layers, each a
// tar holding one file of layerSize random bytes, for the local platform.
func (r *Registry) PushRandomImage(t T, repo, tag string, layers int, layerSize int64) Image {
	t.Helper()
	img, err := randomImage(LocalPlatform(), layers, layerSize, false)
	if err != nil {
		t.Fatalf("testenv: building OCI image: %v", err)
	}
	return r.pushImage(t, repo, tag, img)
}

// PushDockerImage pushes an image with Docker schema 2 media types (manifest,
// container config, gzip'd layers) of random layers, for the local platform.
func (r *Registry) PushDockerImage(t T, repo, tag string, layers int, layerSize int64) Image {
	t.Helper()
	img, err := randomImage(LocalPlatform(), layers, layerSize, true)
	if err != nil {
		t.Fatalf("testenv: building Docker image: %v", err)
	}
	return r.pushImage(t, repo, tag, img)
}

// PushIndex pushes an OCI image index with one random OCI image per platform
// ("linux/amd64", "linux/arm64/v8", ...), the platform set both in the index
// descriptors and in each image config.
func (r *Registry) PushIndex(t T, repo, tag string, platforms []string, layers int, layerSize int64) Image {
	t.Helper()
	if len(platforms) == 0 {
		t.Fatalf("testenv: PushIndex: no platforms")
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	var adds []mutate.IndexAddendum
	for _, p := range platforms {
		plat, err := parsePlatform(p)
		if err != nil {
			t.Fatalf("testenv: PushIndex: %v", err)
		}
		img, err := randomImage(p, layers, layerSize, false)
		if err != nil {
			t.Fatalf("testenv: building image for %s: %v", p, err)
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: plat}})
	}
	idx = mutate.AppendManifests(idx, adds...)

	ref := r.ref(t, repo, tag)
	if err := remote.WriteIndex(ref, idx, r.remoteOptions(t)...); err != nil {
		t.Fatalf("testenv: pushing index %s: %v", ref, err)
	}
	out, err := describeIndex(repo, tag, idx)
	if err != nil {
		t.Fatalf("testenv: describing index %s: %v", ref, err)
	}
	t.Logf("testenv: pushed index %s@%s (%s)", ref, out.Digest, strings.Join(platforms, ", "))
	return out
}

// randomImage builds an image for platform from random layers, with OCI or
// Docker media types.
func randomImage(platform string, layers int, layerSize int64, docker bool) (v1.Image, error) {
	plat, err := parsePlatform(platform)
	if err != nil {
		return nil, err
	}
	manifestType, configType, layerType := types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer
	if docker {
		manifestType, configType, layerType = types.DockerManifestSchema2, types.DockerConfigJSON, types.DockerLayer
	}
	base := mutate.MediaType(empty.Image, manifestType)
	base = mutate.ConfigMediaType(base, configType)
	cf, err := base.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading empty config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = plat.OS, plat.Architecture, plat.Variant
	cf.Config.Cmd = []string{"/bin/true"}
	base, err = mutate.ConfigFile(base, cf)
	if err != nil {
		return nil, fmt.Errorf("setting config: %w", err)
	}
	adds := make([]mutate.Addendum, 0, layers)
	for i := 0; i < layers; i++ {
		l, err := random.Layer(layerSize, layerType)
		if err != nil {
			return nil, fmt.Errorf("making random layer: %w", err)
		}
		adds = append(adds, mutate.Addendum{
			Layer:   l,
			History: v1.History{CreatedBy: fmt.Sprintf("peermirror testenv layer %d of %d", i+1, layers)},
		})
	}
	img, err := mutate.Append(base, adds...)
	if err != nil {
		return nil, fmt.Errorf("appending layers: %w", err)
	}
	return img, nil
}

// parsePlatform parses "os/arch[/variant]".
func parsePlatform(s string) (*v1.Platform, error) {
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return nil, fmt.Errorf("bad platform %q: want os/arch[/variant]", s)
	}
	p := &v1.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

func (r *Registry) ref(t T, repo, tag string) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(r.Addr+"/"+repo+":"+tag, name.Insecure, name.StrictValidation)
	if err != nil {
		t.Fatalf("testenv: bad reference for repo %q tag %q: %v", repo, tag, err)
	}
	return ref
}

func (r *Registry) remoteOptions(t T) []remote.Option {
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	t.Cleanup(cancel)
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithTransport(loopbackTransport()),
		remote.WithUserAgent("peermirror-testenv"),
	}
}

func (r *Registry) pushImage(t T, repo, tag string, img v1.Image) Image {
	t.Helper()
	ref := r.ref(t, repo, tag)
	if err := remote.Write(ref, img, r.remoteOptions(t)...); err != nil {
		t.Fatalf("testenv: pushing image %s: %v", ref, err)
	}
	out := Image{
		Repo:        repo,
		Tag:         tag,
		MediaTypes:  map[digest.Digest]string{},
		Sizes:       map[digest.Digest]int64{},
		ManifestFor: map[string]digest.Digest{},
		ConfigFor:   map[string]digest.Digest{},
		LayersFor:   map[string][]digest.Digest{},
	}
	d, mt, err := out.addImage(img)
	if err != nil {
		t.Fatalf("testenv: describing image %s: %v", ref, err)
	}
	out.Digest, out.MediaType = d, mt
	t.Logf("testenv: pushed image %s@%s (%s)", ref, out.Digest, out.MediaType)
	return out
}

// describeIndex fills an Image from an index of images.
func describeIndex(repo, tag string, idx v1.ImageIndex) (Image, error) {
	out := Image{
		Repo:        repo,
		Tag:         tag,
		MediaTypes:  map[digest.Digest]string{},
		Sizes:       map[digest.Digest]int64{},
		ManifestFor: map[string]digest.Digest{},
		ConfigFor:   map[string]digest.Digest{},
		LayersFor:   map[string][]digest.Digest{},
	}
	h, err := idx.Digest()
	if err != nil {
		return out, err
	}
	mt, err := idx.MediaType()
	if err != nil {
		return out, err
	}
	size, err := idx.Size()
	if err != nil {
		return out, err
	}
	out.Digest, out.MediaType = digest.Digest(h.String()), string(mt)
	out.Manifests = append(out.Manifests, out.Digest)
	out.MediaTypes[out.Digest] = string(mt)
	out.Sizes[out.Digest] = size
	im, err := idx.IndexManifest()
	if err != nil {
		return out, err
	}
	for _, desc := range im.Manifests {
		if desc.Platform == nil {
			return out, fmt.Errorf("manifest %s has no platform", desc.Digest)
		}
		p := desc.Platform.OS + "/" + desc.Platform.Architecture
		if desc.Platform.Variant != "" {
			p += "/" + desc.Platform.Variant
		}
		img, err := idx.Image(desc.Digest)
		if err != nil {
			return out, err
		}
		d, _, err := out.addImage(img)
		if err != nil {
			return out, err
		}
		out.Platforms = append(out.Platforms, p)
		out.ManifestFor[p] = d
	}
	return out, nil
}

// addImage records the manifest, config and layers of img and returns the
// manifest digest and media type.
func (out *Image) addImage(img v1.Image) (digest.Digest, string, error) {
	h, err := img.Digest()
	if err != nil {
		return "", "", err
	}
	mt, err := img.MediaType()
	if err != nil {
		return "", "", err
	}
	size, err := img.Size()
	if err != nil {
		return "", "", err
	}
	m, err := img.Manifest()
	if err != nil {
		return "", "", err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return "", "", err
	}
	p := cf.OS + "/" + cf.Architecture
	if cf.Variant != "" {
		p += "/" + cf.Variant
	}
	md := digest.Digest(h.String())
	out.Manifests = append(out.Manifests, md)
	out.MediaTypes[md] = string(mt)
	out.Sizes[md] = size

	cd := digest.Digest(m.Config.Digest.String())
	out.Configs = append(out.Configs, cd)
	out.MediaTypes[cd] = string(m.Config.MediaType)
	out.Sizes[cd] = m.Config.Size
	out.ConfigFor[p] = cd

	for _, l := range m.Layers {
		ld := digest.Digest(l.Digest.String())
		out.Layers = append(out.Layers, ld)
		out.MediaTypes[ld] = string(l.MediaType)
		out.Sizes[ld] = l.Size
		out.LayersFor[p] = append(out.LayersFor[p], ld)
	}
	return md, string(mt), nil
}

// PushUncompressedImage pushes an OCI image of the local platform whose
// layers are uncompressed tars (application/vnd.oci.image.layer.v1.tar),
// each holding one file of layerSize random bytes: its blobs are as large
// as asked, and large ones are made in a moment even under the race
// detector, which slows the gzip and math/rand of [Registry.PushRandomImage]
// many times over.
func (r *Registry) PushUncompressedImage(t T, repo, tag string, layers int, layerSize int64) Image {
	t.Helper()
	img, err := randomImage(LocalPlatform(), 0, 0, false)
	if err != nil {
		t.Fatalf("testenv: building OCI image: %v", err)
	}
	for i := 0; i < layers; i++ {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		data := make([]byte, layerSize)
		if _, err := crand.Read(data); err != nil {
			t.Fatalf("testenv: %v", err)
		}
		err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("random-%d", i), Size: layerSize, Typeflag: tar.TypeReg, Mode: 0o644})
		if err == nil {
			_, err = tw.Write(data)
		}
		if err == nil {
			err = tw.Close()
		}
		if err != nil {
			t.Fatalf("testenv: writing layer tar: %v", err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer:   static.NewLayer(buf.Bytes(), types.OCIUncompressedLayer),
			History: v1.History{CreatedBy: fmt.Sprintf("peermirror testenv uncompressed layer %d of %d", i+1, layers)},
		})
		if err != nil {
			t.Fatalf("testenv: appending layer: %v", err)
		}
	}
	return r.pushImage(t, repo, tag, img)
}
