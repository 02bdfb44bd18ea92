package caddymodule

import (
	"errors"
	"math"
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
// spaces. A number past int64 stands as math.MaxInt64: no blob is that
// large, so as a first byte it is past the end, and as a last byte or a
// suffix it means the rest of the blob, as RFC 9110 reads them.
func parseOffset(s string) (int64, bool) {
	if s == "" {
		return 0, false
	}
	var n int64
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
		d := int64(s[i] - '0')
		if n > (math.MaxInt64-d)/10 {
			n = math.MaxInt64
			continue
		}
		n = n*10 + d
	}
	return n, true
}
