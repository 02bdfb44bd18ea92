package caddymodule

import (
	"context"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/distribution/reference"
	"go.uber.org/zap"
)

const fuzzHex = "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"

// The grammars of the OCI distribution specification, written out here
// rather than taken from the code under test: a repository name is a
// path of lowercase components, never a registry host.
var (
	ociName = regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$`)
	ociTag  = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	// a registry host, with an optional port; the grammar is the
	// reference library's, anchored
	ociDomain = regexp.MustCompile(`^(?:` + reference.DomainRegexp.String() + `)$`)
)

// FuzzParseRequest feeds parseRequest URLs made of a fuzzed path and
// query. Whatever it accepts must be something the content store may be
// asked about; whatever it refuses must be a 4xx OCI error.
func FuzzParseRequest(f *testing.F) {
	d := "sha256:" + fuzzHex
	for _, seed := range [][2]string{
		{"/v2/", ""},
		{"/v2", ""},
		{"/v2/library/nginx/manifests/1.27", "ns=docker.io"},
		{"/v2/team/app/manifests/" + d, ""},
		{"/v2/a/b/c/blobs/" + d, "ns=registry.test:5000"},
		{"/v2/a/blobs/" + d, "ns=%5B%3A%3A1%5D%3A5000"},
		{"/v2/manifests/blobs/" + d, ""},
		{"/v2/a/blobs/sha512:" + fuzzHex + fuzzHex, ""},
		{"/v2/../../etc/passwd/blobs/" + d, ""},
		{"/v2/a%2Fb/blobs/" + d, ""},
		{"/v2/a%2e%2e/blobs/" + d, ""},
		{"/v2/a/blobs/sha256%3A" + fuzzHex, ""},
		{"/v2/a%00b/blobs/" + d, ""},
		{`/v2/a\b/blobs/` + d, ""},
		{"/v2//blobs/" + d, ""},
		{"/v2/Team/app/blobs/" + d, ""},
		{"/v2/localhost:5000/app/blobs/" + d, ""},
		{"/v2/" + strings.Repeat("a", 256) + "/blobs/" + d, ""},
		{"/v2/a/blobs/" + d, "ns=docker.io&ns=ghcr.io"},
		{"/v2/a/blobs/" + d, "ns=docker.io/evil"},
		{"/v2/a/blobs/" + d, "ns=" + strings.Repeat("%FF", 300)},
		{"/v2/a/blobs/" + d, "ns=%zz"},
		{"/v2/a/blobs/sha256:" + strings.ToUpper(fuzzHex), ""},
		{"/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", ""},
		{"/v2/a/blobs/latest", ""},
		{"/v2/a/manifests/" + strings.Repeat("t", 129), "ns=docker.io"},
		{"/v2/a/manifests/.hidden", "ns=docker.io"},
		{"/v2/a/tags/list", ""},
		{"/v2/_catalog", ""},
		{"/v2/a/blobs/uploads/", ""},
		{"/v3/a/blobs/" + d, ""},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, path, query string) {
		u, err := url.Parse("http://x" + path + "?" + query)
		if err != nil {
			t.Skip()
		}
		req, rerr := parseRequest(u)
		if rerr != nil {
			checkRequestError(t, u, req, rerr)
			return
		}
		checkAccepted(t, u, req)

		// the request, written out again, is read back the same
		again, err := url.ParseRequestURI(formatRequest(req))
		if err != nil {
			t.Fatalf("%q accepted as %+v, but its own path %q does not parse: %v", u, req, formatRequest(req), err)
		}
		if back, rerr := parseRequest(again); rerr != nil || back != req {
			t.Fatalf("%q accepted as %+v, but %q reads back as %+v, %v", u, req, again, back, rerr)
		}
	})
}

// checkRequestError checks a refusal: a 4xx OCI error with a short,
// readable message, and nothing else.
func checkRequestError(t *testing.T, u *url.URL, req ociRequest, rerr *requestError) {
	t.Helper()
	if req != (ociRequest{}) {
		t.Errorf("%q refused but also parsed as %+v", u, req)
	}
	switch {
	case rerr.status == http.StatusBadRequest &&
		(rerr.code == codeNameInvalid || rerr.code == codeTagInvalid || rerr.code == codeDigestInvalid):
	case rerr.status == http.StatusNotFound && (rerr.code == codeUnsupported || rerr.code == codeNameUnknown):
	default:
		t.Fatalf("%q refused with %d %s (%s): not a client error with its OCI code", u, rerr.status, rerr.code, rerr.message)
	}
	// the message goes into the JSON body and the debug log
	if rerr.message == "" || len(rerr.message) > 256 || !utf8.ValidString(rerr.message) {
		t.Fatalf("%q refused with a message of %d bytes (valid UTF-8: %v): %.300q", u, len(rerr.message),
			utf8.ValidString(rerr.message), rerr.message)
	}
}

// checkAccepted checks that an accepted request is one the store may be
// asked about: grammatical, with no encoded or path-like parts.
func checkAccepted(t *testing.T, u *url.URL, req ociRequest) {
	t.Helper()
	if strings.Contains(u.EscapedPath(), "%") {
		t.Fatalf("%q accepted with percent-encoding in the path", u)
	}
	switch req.kind {
	case kindBase:
		if u.Path != "/v2" && u.Path != "/v2/" || req != (ociRequest{kind: kindBase}) {
			t.Fatalf("%q read as the base request %+v", u, req)
		}
		return
	case kindManifest, kindBlob:
	default:
		t.Fatalf("%q accepted with kind %d", u, req.kind)
	}
	if len(req.name) > 255 || !ociName.MatchString(req.name) {
		t.Fatalf("%q accepted with name %q, which is no repository path", u, req.name)
	}
	if req.registry != "" && !ociDomain.MatchString(req.registry) {
		t.Fatalf("%q accepted with registry %q, which is no registry host", u, req.registry)
	}
	if req.tag != "" && req.digest != "" {
		t.Fatalf("%q accepted with both a tag and a digest: %+v", u, req)
	}
	if req.tag != "" {
		if req.kind != kindManifest || !ociTag.MatchString(req.tag) {
			t.Fatalf("%q accepted with tag %q for kind %s", u, req.tag, req.kind)
		}
		// the image record name the store and peers are asked about
		if req.registry != "" {
			ref, err := reference.Parse(req.ref())
			tagged, ok := ref.(reference.NamedTagged)
			if err != nil || !ok || reference.Domain(tagged) != req.registry || reference.Path(tagged) != req.name ||
				tagged.Tag() != req.tag {
				t.Fatalf("%q: ref() = %q does not read back as registry, name and tag: %v", u, req.ref(), err)
			}
		}
		return
	}
	if err := req.digest.Validate(); err != nil {
		t.Fatalf("%q accepted with digest %q: %v", u, req.digest, err)
	}
	// the blob file the store would open stays inside the content folder
	alg, enc := req.digest.Algorithm().String(), req.digest.Encoded()
	if file := filepath.Join("/content", "blobs", alg, enc); file != "/content/blobs/"+alg+"/"+enc {
		t.Fatalf("%q: digest %q names the file %q", u, req.digest, file)
	}
	for _, part := range []string{alg, enc} {
		if part == "" || part == "." || part == ".." || strings.ContainsAny(part, "/\\\x00") {
			t.Fatalf("%q: digest %q has a path-like part %q", u, req.digest, part)
		}
	}
}

// formatRequest writes req as a client would send it.
func formatRequest(req ociRequest) string {
	if req.kind == kindBase {
		return "/v2/"
	}
	kind := "blobs"
	if req.kind == kindManifest {
		kind = "manifests"
	}
	s := "/v2/" + req.name + "/" + kind + "/" + req.reference()
	if req.registry != "" {
		s += "?ns=" + url.QueryEscape(req.registry)
	}
	return s
}

// FuzzParseRange checks parseRange against a plain reading of RFC 9110
// section 14 for one range, with numbers of any size, and the leniencies
// the mirror documents: spaces around the numbers, several ranges or
// another unit answered whole.
func FuzzParseRange(f *testing.F) {
	for _, seed := range []struct {
		header string
		size   int64
	}{
		{"", 1000},
		{"bytes=0-99", 1000},
		{"bytes=100-", 1000},
		{"bytes=999-", 1000},
		{"bytes=0-5000", 1000},
		{"bytes=-100", 1000},
		{"bytes=-5000", 1000},
		{"bytes= 10 - 19 ", 1000},
		{"bytes=1000-", 1000},
		{"bytes=-0", 1000},
		{"bytes=20-10", 1000},
		{"bytes=+1-2", 1000},
		{"bytes=1--2", 1000},
		{"bytes=99999999999999999999-", 1000},
		{"bytes=0-99999999999999999999", 1000},
		{"bytes=-99999999999999999999", 1000},
		{"bytes=000000000000000000000000001-2", 1000},
		{"bytes=0-9223372036854775807", 9223372036854775807},
		{"bytes=0-0", 0},
		{"bytes=-1", 0},
		{"items=0-1", 1000},
		{"bytes=0-1,5-6", 1000},
		{"Bytes=0-1", 1000},
	} {
		f.Add(seed.header, seed.size)
	}
	f.Fuzz(func(t *testing.T, header string, size int64) {
		if size < 0 {
			t.Skip() // a blob has a size
		}
		got, ok, err := parseRange(header, size)
		if ok && err != nil {
			t.Fatalf("parseRange(%q, %d) is both a range and an error", header, size)
		}
		if ok {
			end := got.start + got.length - 1
			if got.start < 0 || got.length <= 0 || got.start > end || end >= size {
				t.Fatalf("parseRange(%q, %d) = %+v: not within the blob", header, size, got)
			}
		}
		want, wantOK, wantErr := referenceRange(header, size)
		if ok != wantOK || (err != nil) != wantErr || (ok && got != want) {
			t.Fatalf("parseRange(%q, %d) = %+v, %v, %v; RFC 9110 reads it as %+v, %v, error %v",
				header, size, got, ok, err, want, wantOK, wantErr)
		}
	})
}

// referenceRange reads one byte range with big integers, so that no
// number is too long to mean what the RFC says it means.
func referenceRange(header string, size int64) (r byteRange, ok, unsatisfiable bool) {
	spec, isBytes := strings.CutPrefix(header, "bytes=")
	if header == "" || !isBytes || strings.Contains(spec, ",") {
		return byteRange{}, false, false
	}
	first, last, found := strings.Cut(strings.TrimFunc(spec, unicode.IsSpace), "-")
	if !found {
		return byteRange{}, false, true
	}
	first, last = strings.TrimFunc(first, unicode.IsSpace), strings.TrimFunc(last, unicode.IsSpace)
	number := func(s string) (*big.Int, bool) {
		if s == "" || strings.Trim(s, "0123456789") != "" {
			return nil, false
		}
		n, ok := new(big.Int).SetString(s, 10)
		return n, ok
	}
	bigSize := big.NewInt(size)
	if first == "" {
		// the final n bytes, all of them when n is more than there is
		n, ok := number(last)
		if !ok || n.Sign() == 0 || size == 0 {
			return byteRange{}, false, true
		}
		if n.Cmp(bigSize) > 0 {
			n = bigSize
		}
		return byteRange{start: size - n.Int64(), length: n.Int64()}, true, false
	}
	start, ok := number(first)
	if !ok || start.Cmp(bigSize) >= 0 {
		return byteRange{}, false, true
	}
	end := size - 1
	if last != "" {
		e, ok := number(last)
		if !ok || e.Cmp(start) < 0 {
			return byteRange{}, false, true
		}
		if e.Cmp(big.NewInt(end)) < 0 {
			end = e.Int64()
		}
	}
	return byteRange{start: start.Int64(), length: end - start.Int64() + 1}, true, false
}

// FuzzMeasureReference runs the debug page's measure on fuzzed image
// references against a recording mirror: every reference the measure
// accepts must turn into a request the handler accepts, for the same
// registry, name and reference, with the tag key the store and peers use.
func FuzzMeasureReference(f *testing.F) {
	for _, seed := range []string{
		"nginx",
		"nginx:1.27",
		"docker.io/library/nginx:1.27",
		"registry.test:5000/team/app:v1",
		"localhost/app",
		"[::1]:5000/app:v1",
		"Foo.com/bar:1",
		"ghcr.io/a/b/c@sha256:" + fuzzHex,
		"app:v1@sha256:" + fuzzHex,
		"app@sha512:" + fuzzHex + fuzzHex,
		"app@sha256:" + strings.ToUpper(fuzzHex),
		"UPPER/app",
		"a/" + strings.Repeat("b", 250),
		"",
		"app:" + strings.Repeat("t", 129),
	} {
		f.Add(seed)
	}
	rec := &recordingMirror{}
	h := &DebugHandler{
		Mirror: "http://mirror.test", // never dialled: the transport answers
		app:    &App{},
		client: &http.Client{Transport: rec},
		logger: zap.NewNop(),
	}
	f.Fuzz(func(t *testing.T, ref string) {
		rec.take()
		res := h.measure(context.Background(), ref)
		sent := rec.take()
		named, err := reference.ParseNormalizedNamed(ref)
		if err != nil {
			if res.Error == "" || len(sent) != 0 {
				t.Fatalf("measure(%q) of a reference that does not parse: error %q, %d requests", ref, res.Error, len(sent))
			}
			return
		}
		if len(sent) != 1 {
			t.Fatalf("measure(%q) sent %d requests, want 1 (error %q)", ref, len(sent), res.Error)
		}
		u, err := url.ParseRequestURI(sent[0])
		if err != nil {
			t.Fatalf("measure(%q) sent %q, which does not parse: %v", ref, sent[0], err)
		}
		req, rerr := parseRequest(u)
		if rerr != nil {
			t.Fatalf("measure(%q) sent %q, which the handler refuses: %d %s %s", ref, sent[0], rerr.status, rerr.code, rerr.message)
		}
		if req.kind != kindManifest || req.registry != res.Registry || req.name != res.Name || req.reference() != res.Reference {
			t.Fatalf("measure(%q) measured %s/%s %s, the handler reads %+v", ref, res.Registry, res.Name, res.Reference, req)
		}
		if c, ok := named.(reference.Canonical); ok {
			if req.digest != c.Digest() {
				t.Fatalf("measure(%q) asked for %q, want the digest %s", ref, req.reference(), c.Digest())
			}
			return
		}
		if want := reference.TagNameOnly(named).String(); req.ref() != want {
			t.Fatalf("measure(%q): the handler resolves %q, want %q", ref, req.ref(), want)
		}
	})
}

// recordingMirror is an http.RoundTripper that records request URIs and
// answers 404, as a mirror with nothing would.
type recordingMirror struct {
	mu   sync.Mutex
	uris []string
}

func (m *recordingMirror) RoundTrip(r *http.Request) (*http.Response, error) {
	m.mu.Lock()
	m.uris = append(m.uris, r.URL.RequestURI())
	m.mu.Unlock()
	return &http.Response{StatusCode: http.StatusNotFound, Status: "404 Not Found", Header: http.Header{},
		Body: io.NopCloser(strings.NewReader("")), Request: r}, nil
}

func (m *recordingMirror) take() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := m.uris
	m.uris = nil
	return out
}
