package caddymodule

import (
	"errors"
	"strconv"
	"strings"
)

// byteRange is one satisfiable range of a blob: length bytes from start.
type byteRange struct {
	start, length int64
}

// errRangeUnsatisfiable is a Range that cannot be served: malformed, or
// starting past the end of the blob. It is answered with 416 and
// Content-Range: bytes */<size>.
var errRangeUnsatisfiable = errors.New("range not satisfiable")

// parseRange reads a Range header for a blob of size bytes, after RFC 9110
// section 14. It returns ok=false when the whole blob is to be sent: no
// header, a unit other than bytes, or several ranges (served whole, which
// the RFC allows; containerd never asks for more than one). A single range
// that is malformed or starts past the end is errRangeUnsatisfiable.
func parseRange(header string, size int64) (r byteRange, ok bool, err error) {
	if header == "" {
		return byteRange{}, false, nil
	}
	spec, isBytes := strings.CutPrefix(header, "bytes=")
	if !isBytes {
		return byteRange{}, false, nil
	}
	if strings.Contains(spec, ",") {
		return byteRange{}, false, nil
	}
	spec = strings.TrimSpace(spec)
	first, last, found := strings.Cut(spec, "-")
	if !found {
		return byteRange{}, false, errRangeUnsatisfiable
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)

	// suffix range: the final n bytes
	if first == "" {
		n, ok := parseOffset(last)
		if !ok || n == 0 || size == 0 {
			return byteRange{}, false, errRangeUnsatisfiable
		}
		n = min(n, size)
		return byteRange{start: size - n, length: n}, true, nil
	}

	start, okStart := parseOffset(first)
	if !okStart || start >= size {
		return byteRange{}, false, errRangeUnsatisfiable
	}
	end := size - 1
	if last != "" {
		e, okEnd := parseOffset(last)
		if !okEnd || e < start {
			return byteRange{}, false, errRangeUnsatisfiable
		}
		end = min(e, size-1)
	}
	return byteRange{start: start, length: end - start + 1}, true, nil
}

// parseOffset reads a non-negative decimal with digits only: no sign, no
// spaces, no overflow.
func parseOffset(s string) (int64, bool) {
	if s == "" || len(s) > 19 {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}
