package caddymodule

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Error codes of the OCI distribution specification, and TAG_INVALID as
// the distribution registry sends it.
const (
	codeBlobUnknown     = "BLOB_UNKNOWN"
	codeManifestUnknown = "MANIFEST_UNKNOWN"
	codeNameInvalid     = "NAME_INVALID"
	codeNameUnknown     = "NAME_UNKNOWN"
	codeDigestInvalid   = "DIGEST_INVALID"
	codeTagInvalid      = "TAG_INVALID"
	codeUnsupported     = "UNSUPPORTED"
	codeRangeInvalid    = "RANGE_INVALID"
	codeInternal        = "INTERNAL_ERROR"
	codeTooMany         = "TOOMANYREQUESTS"
)

// ociErrors is the body of an OCI error response.
type ociErrors struct {
	Errors []ociError `json:"errors"`
}

type ociError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// writeError sends an OCI JSON error. Caddy sends an error returned from a
// handler with an empty body, so the handler writes its errors itself.
func writeError(w http.ResponseWriter, r *http.Request, status int, code, message string) {
	body, _ := json.Marshal(ociErrors{Errors: []ociError{{Code: code, Message: message}}})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Docker-Distribution-API-Version", "registry/2.0")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(body)
	}
}
