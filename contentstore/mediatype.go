package contentstore

import (
	"encoding/json"
	"mime"
	"strings"

	"github.com/containerd/containerd/v2/core/images"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// MediaTypeOctetStream is the media type given to a blob whose type cannot
// be worked out: registries serve such blobs the same way.
const MediaTypeOctetStream = "application/octet-stream"

// maxSniffSize bounds the blobs that are read to detect their media type.
// Manifests and indexes are far smaller; registries refuse manifests over
// 4 MiB.
const maxSniffSize = 4 << 20

// IsManifest reports whether mediaType names an image manifest or an index,
// OCI or Docker: the content that the OCI API serves under /manifests/.
func IsManifest(mediaType string) bool {
	switch mediaType {
	case ocispec.MediaTypeImageManifest,
		ocispec.MediaTypeImageIndex,
		images.MediaTypeDockerSchema2Manifest,
		images.MediaTypeDockerSchema2ManifestList,
		images.MediaTypeDockerSchema1Manifest,
		"application/vnd.docker.distribution.manifest.v1+json":
		return true
	}
	return false
}

// IsIndex reports whether mediaType names an OCI index or a Docker manifest
// list.
func IsIndex(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageIndex ||
		mediaType == images.MediaTypeDockerSchema2ManifestList
}

// sniffed is the subset of manifest and index fields that tells them apart.
type sniffed struct {
	SchemaVersion int             `json:"schemaVersion"`
	MediaType     string          `json:"mediaType"`
	Manifests     json.RawMessage `json:"manifests"`
	Config        json.RawMessage `json:"config"`
	Layers        json.RawMessage `json:"layers"`
	FSLayers      json.RawMessage `json:"fsLayers"`
}

// DetectMediaType works out the media type of a blob from its bytes, for
// content whose type no image record or parent names. A JSON document's own
// mediaType field wins; otherwise a "manifests" array means an OCI index and
// "config" with "layers" means an OCI manifest, and schema 1 "fsLayers"
// means a Docker schema 1 manifest. Anything else, the empty JSON object
// included, is a plain blob.
func DetectMediaType(b []byte) string {
	if len(b) == 0 || (b[0] != '{' && !isJSONSpace(b[0])) {
		return MediaTypeOctetStream
	}
	var s sniffed
	if err := json.Unmarshal(b, &s); err != nil {
		return MediaTypeOctetStream
	}
	switch {
	case s.MediaType != "" && IsManifest(s.MediaType):
		return s.MediaType
	case s.MediaType != "" && validMediaType(s.MediaType):
		// A config or artifact that names its own type.
		return s.MediaType
	case s.SchemaVersion == 2 && isArray(s.Manifests):
		return ocispec.MediaTypeImageIndex
	case s.SchemaVersion == 2 && isObject(s.Config) && isArray(s.Layers):
		return ocispec.MediaTypeImageManifest
	case s.SchemaVersion == 1 && isArray(s.FSLayers):
		return images.MediaTypeDockerSchema1Manifest
	}
	return MediaTypeOctetStream
}

// validMediaType keeps a media type read from untrusted JSON out of a
// response header unless it is a short, well-formed type/subtype.
func validMediaType(mt string) bool {
	if len(mt) > 255 {
		return false
	}
	parsed, _, err := mime.ParseMediaType(mt)
	return err == nil && parsed == mt && strings.Contains(mt, "/")
}

func isJSONSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r'
}

func isArray(raw json.RawMessage) bool {
	return len(raw) > 0 && raw[0] == '['
}

func isObject(raw json.RawMessage) bool {
	return len(raw) > 0 && raw[0] == '{'
}
