package contentstore

import (
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestDetectMediaType(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want string
	}{
		{"oci manifest with type", `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`, ocispec.MediaTypeImageManifest},
		{"oci manifest without type", `{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}`, ocispec.MediaTypeImageManifest},
		{"oci index without type", `{"schemaVersion":2,"manifests":[]}`, ocispec.MediaTypeImageIndex},
		{"docker manifest", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{},"layers":[]}`, images.MediaTypeDockerSchema2Manifest},
		{"docker list", `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}`, images.MediaTypeDockerSchema2ManifestList},
		{"schema 1", `{"schemaVersion":1,"name":"x","fsLayers":[]}`, images.MediaTypeDockerSchema1Manifest},
		{"leading space", " \n{\"schemaVersion\":2,\"manifests\":[]}", ocispec.MediaTypeImageIndex},
		{"empty object", `{}`, MediaTypeOctetStream},
		{"config", `{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`, MediaTypeOctetStream},
		{"self-typed artifact", `{"mediaType":"application/vnd.in-toto+json"}`, "application/vnd.in-toto+json"},
		{"header injection", `{"mediaType":"text/plain\r\nX-Evil: 1"}`, MediaTypeOctetStream},
		{"layers but config is not an object", `{"schemaVersion":2,"config":"x","layers":[]}`, MediaTypeOctetStream},
		{"gzip", "\x1f\x8b\x08\x00", MediaTypeOctetStream},
		{"broken json", `{"schemaVersion":2,"manifests":[`, MediaTypeOctetStream},
		{"empty", ``, MediaTypeOctetStream},
	}
	for _, tt := range tests {
		if got := DetectMediaType([]byte(tt.in)); got != tt.want {
			t.Errorf("%s: DetectMediaType = %q, want %q", tt.name, got, tt.want)
		}
	}
}
