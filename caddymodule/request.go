package caddymodule

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// kind is what an OCI request asks for.
type kind int

const (
	kindBase     kind = iota + 1 // GET /v2/
	kindManifest                 // /v2/<name>/manifests/<tag|digest>
	kindBlob                     // /v2/<name>/blobs/<digest>
)

func (k kind) String() string {
	switch k {
	case kindBase:
		return "base"
	case kindManifest:
		return "manifest"
	case kindBlob:
		return "blob"
	}
	return "unknown"
}

// ociRequest is a parsed and validated OCI pull request.
type ociRequest struct {
	kind kind
	// registry is the `ns` query parameter: the registry the image comes
	// from, as containerd names it. Empty when not given.
	registry string
	// name is the repository path from the URL (library/nginx).
	name string
	// tag is set for a manifest asked for by tag.
	tag string
	// digest is set for a blob, or a manifest asked for by digest.
	digest digest.Digest
}

// ref returns the image record name that a tag request resolves to, such as
// docker.io/library/nginx:1.27.
func (r ociRequest) ref() string {
	return r.registry + "/" + r.name + ":" + r.tag
}

// reference returns the tag or digest asked for.
func (r ociRequest) reference() string {
	if r.tag != "" {
		return r.tag
	}
	return r.digest.String()
}

// requestError is a request the handler refuses, with the OCI error to send.
type requestError struct {
	status  int
	code    string
	message string
}

func (e *requestError) Error() string { return e.message }

func badRequest(code, message string) *requestError {
	return &requestError{status: http.StatusBadRequest, code: code, message: message}
}

// parseRequest turns the URL of a request under /v2 into an ociRequest.
// Nothing reaches the content store unless it passed the grammars of
// distribution names, tags and digests here.
func parseRequest(u *url.URL) (ociRequest, *requestError) {
	// a client never percent-encodes a name, a tag or a digest; an encoded
	// slash or dot is an attempt to smuggle a path past the checks below
	if u.RawPath != "" || strings.Contains(u.Path, "%") {
		return ociRequest{}, badRequest(codeNameInvalid, "percent-encoded characters are not allowed in the path")
	}
	path := u.Path
	if path == "/v2" || path == "/v2/" {
		return ociRequest{kind: kindBase}, nil
	}
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return ociRequest{}, &requestError{status: http.StatusNotFound, code: codeNameUnknown,
			message: "not an OCI distribution path"}
	}

	// split <name>/<kind>/<reference>; the name may hold slashes, the
	// other two may not
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		return ociRequest{}, unsupported()
	}
	refPart, head := rest[i+1:], rest[:i]
	j := strings.LastIndexByte(head, '/')
	if j < 0 {
		return ociRequest{}, unsupported()
	}
	kindPart, name := head[j+1:], head[:j]

	var req ociRequest
	switch kindPart {
	case "manifests":
		req.kind = kindManifest
	case "blobs":
		req.kind = kindBlob
	default:
		return ociRequest{}, unsupported()
	}

	// the registry, from ns; a request may name it once at most
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return ociRequest{}, badRequest(codeNameInvalid, "malformed query string")
	}
	switch ns := q["ns"]; len(ns) {
	case 0:
	case 1:
		req.registry = ns[0]
	default:
		return ociRequest{}, badRequest(codeNameInvalid, "the ns query parameter is given more than once")
	}

	// the repository name, alone and with its registry; alone, it is read
	// under a placeholder registry, or the grammar would take a first part
	// such as Team or host:5000 for a registry and let it through
	named, err := reference.WithName("registry.invalid/" + name)
	if err == nil && reference.Path(named) != name {
		err = reference.ErrReferenceInvalidFormat
	}
	if err != nil {
		return ociRequest{}, badRequest(codeNameInvalid, "invalid repository name: "+err.Error())
	}
	if req.registry != "" {
		full, err := reference.WithName(req.registry + "/" + name)
		if err != nil || reference.Domain(full) != req.registry {
			return ociRequest{}, badRequest(codeNameInvalid, "invalid registry in ns: "+quoteShort(req.registry))
		}
	}
	req.name = name

	// the reference: a digest, or for manifests a tag
	if req.kind == kindBlob || strings.ContainsRune(refPart, ':') {
		d, err := digest.Parse(refPart)
		if err != nil {
			return ociRequest{}, badRequest(codeDigestInvalid, "invalid digest "+quoteShort(refPart)+": "+err.Error())
		}
		req.digest = d
		return req, nil
	}
	if _, err := reference.WithTag(named, refPart); err != nil {
		return ociRequest{}, badRequest(codeTagInvalid, "invalid tag "+quoteShort(refPart))
	}
	req.tag = refPart
	return req, nil
}

func unsupported() *requestError {
	return &requestError{status: http.StatusNotFound, code: codeUnsupported,
		message: "this mirror serves only GET and HEAD of /v2/<name>/manifests/<reference> and /v2/<name>/blobs/<digest>"}
}

// quoteShort quotes s for an error message, cut to a readable length.
func quoteShort(s string) string {
	const max = 80
	if len(s) > max {
		s = s[:max] + "..."
	}
	return `"` + strings.ToValidUTF8(s, "?") + `"`
}
