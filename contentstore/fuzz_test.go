package contentstore

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// FuzzDetectMediaType feeds DetectMediaType any bytes. The type it returns
// goes into a Content-Type header, so it must be octet-stream or a short,
// well-formed type; and only a JSON object can be anything but a blob.
func FuzzDetectMediaType(f *testing.F) {
	for _, seed := range []string{
		`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`,
		`{"schemaVersion":2,"manifests":[]}`,
		`{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}`,
		`{"schemaVersion":1,"name":"x","fsLayers":[]}`,
		`{"mediaType":"application/vnd.in-toto+json"}`,
		`{"mediaType":"text/plain\r\nX-Evil: 1"}`,
		`{"mediaType":"Application/JSON"}`,
		`{"mediaType":"text/plain; charset=utf-8"}`,
		`{"mediaType":"a/b","mediaType":"c/d"}`,
		`{"MANIFESTS":[],"schemaVersion":2}`,
		`{"schemaVersion":"2","manifests":[]}`,
		" \n{\"schemaVersion\":2,\"manifests\":[]}",
		`{}`,
		`[]`,
		`{"schemaVersion":2,"manifests":[`,
		"\x1f\x8b\x08\x00",
		"",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		mt := DetectMediaType(b)
		if mt == MediaTypeOctetStream {
			return
		}
		if !wellFormedType(mt) {
			t.Fatalf("DetectMediaType(%q) = %q: not a type to put in a header", b, mt)
		}
		trimmed := bytes.TrimLeft(b, " \t\r\n")
		if !json.Valid(b) || len(trimmed) == 0 || trimmed[0] != '{' {
			t.Fatalf("DetectMediaType(%q) = %q for something that is not a JSON object", b, mt)
		}
	})
}

// wellFormedType is a media type safe to send as Content-Type: type/subtype
// of RFC 2045 tokens (printable ASCII but for spaces and the specials, so
// no parameters, lists or line breaks), in lower case as the mirror always
// sends them, short enough for a header.
func wellFormedType(mt string) bool {
	typ, sub, ok := strings.Cut(mt, "/")
	if !ok || len(mt) > 255 || !isToken(typ) || !isToken(sub) {
		return false
	}
	return strings.ToLower(mt) == mt
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`()<>@,;:\"/[]?=`, c) >= 0 {
			return false
		}
	}
	return true
}

// FuzzDetectMediaTypeRules builds JSON documents from fuzzed fields and
// checks the result against DetectMediaType's rules as documented: the
// document's own mediaType when well formed, else a manifests array means
// an index, config and layers a manifest, fsLayers schema 1.
func FuzzDetectMediaTypeRules(f *testing.F) {
	// shapes: 0 absent, 1 null, 2 array, 3 object, 4 string, 5 number
	f.Add("", int64(2), byte(2), byte(0), byte(0), byte(0), false)
	f.Add("", int64(2), byte(0), byte(3), byte(2), byte(0), false)
	f.Add("", int64(2), byte(0), byte(4), byte(2), byte(0), false)
	f.Add("", int64(1), byte(0), byte(0), byte(0), byte(2), false)
	f.Add("", int64(2), byte(0), byte(0), byte(0), byte(2), false)
	f.Add("", int64(3), byte(2), byte(3), byte(2), byte(0), false)
	f.Add("", int64(2), byte(2), byte(0), byte(0), byte(0), true)
	f.Add(ocispec.MediaTypeImageIndex, int64(2), byte(0), byte(3), byte(2), byte(0), false)
	f.Add(images.MediaTypeDockerSchema2Manifest, int64(2), byte(2), byte(3), byte(2), byte(0), false)
	f.Add(ocispec.MediaTypeImageConfig, int64(0), byte(0), byte(0), byte(0), byte(0), false)
	f.Add("text/plain; charset=utf-8", int64(2), byte(2), byte(0), byte(0), byte(0), false)
	f.Add("Text/Plain", int64(2), byte(0), byte(3), byte(2), byte(0), false)
	f.Add("text/plain\r\nX-Evil: 1", int64(2), byte(2), byte(0), byte(0), byte(0), false)
	f.Add(strings.Repeat("a", 200)+"/"+strings.Repeat("b", 60), int64(2), byte(2), byte(0), byte(0), byte(0), false)
	f.Fuzz(func(t *testing.T, mediaType string, schemaVersion int64, manifests, config, layers, fsLayers byte,
		versionAsString bool) {
		doc := map[string]any{}
		if mediaType != "" {
			doc["mediaType"] = mediaType
		}
		if schemaVersion != 0 {
			doc["schemaVersion"] = schemaVersion
		}
		if versionAsString {
			doc["schemaVersion"] = "2"
		}
		shaped := map[string]byte{"manifests": manifests, "config": config, "layers": layers, "fsLayers": fsLayers}
		for key, shape := range shaped {
			if v, ok := shapeValue(shape); ok {
				doc[key] = v
			}
		}
		b, err := json.Marshal(doc)
		if err != nil {
			t.Fatal(err)
		}
		// the document as decoded: invalid UTF-8 comes back changed
		var back struct {
			MediaType string `json:"mediaType"`
		}
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		mediaType = back.MediaType

		shape := func(key string) byte { return shaped[key] % 6 }
		want := MediaTypeOctetStream
		switch {
		case versionAsString:
			// a schemaVersion that is no number: the document is no manifest
		case mediaType != "" && wellFormedType(mediaType):
			want = mediaType
		case schemaVersion == 2 && shape("manifests") == 2:
			want = ocispec.MediaTypeImageIndex
		case schemaVersion == 2 && shape("config") == 3 && shape("layers") == 2:
			want = ocispec.MediaTypeImageManifest
		case schemaVersion == 1 && shape("fsLayers") == 2:
			want = images.MediaTypeDockerSchema1Manifest
		}
		if got := DetectMediaType(b); got != want {
			t.Fatalf("DetectMediaType(%s) = %q, want %q", b, got, want)
		}
	})
}

// shapeValue is a JSON value of the given shape, or false for absent.
func shapeValue(shape byte) (any, bool) {
	switch shape % 6 {
	case 1:
		return nil, true
	case 2:
		return []any{map[string]any{"digest": "sha256:00"}}, true
	case 3:
		return map[string]any{"digest": "sha256:00"}, true
	case 4:
		return "x", true
	case 5:
		return 7, true
	}
	return nil, false
}
