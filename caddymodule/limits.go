package caddymodule

import (
	"net/http"

	"golang.org/x/time/rate"
)

// uploadLimits caps what this node serves to other nodes: how many
// requests at once, and how many bytes a second in all.
type uploadLimits struct {
	slots   chan struct{} // nil: no cap on concurrent uploads
	limiter *rate.Limiter // nil: no cap on bandwidth
}

func newUploadLimits(maxUploads int, bytesPerSecond int64) *uploadLimits {
	l := &uploadLimits{}
	if maxUploads > 0 {
		l.slots = make(chan struct{}, maxUploads)
	}
	if bytesPerSecond > 0 {
		l.limiter = rate.NewLimiter(rate.Limit(bytesPerSecond), int(min(bytesPerSecond, maxRateBurst)))
	}
	return l
}

// maxRateBurst bounds the bytes sent at once under a bandwidth cap.
const maxRateBurst = 256 << 10

// acquire takes an upload slot without waiting: a node at its cap says so
// at once, so the asking node tries another peer instead of queueing.
func (l *uploadLimits) acquire() bool {
	if l == nil || l.slots == nil {
		return true
	}
	select {
	case l.slots <- struct{}{}:
		return true
	default:
		return false
	}
}

func (l *uploadLimits) release() {
	if l != nil && l.slots != nil {
		<-l.slots
	}
}

// writer wraps w so that what it sends stays under the bandwidth cap.
// Capped uploads are copied through user space, not with sendfile.
func (l *uploadLimits) writer(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if l == nil || l.limiter == nil {
		return w
	}
	return &rateWriter{ResponseWriter: w, lim: l.limiter, r: r}
}

// rateWriter waits on a shared limiter before each piece it writes.
type rateWriter struct {
	http.ResponseWriter
	lim *rate.Limiter
	r   *http.Request
}

func (rw *rateWriter) Write(p []byte) (int, error) {
	done := 0
	for done < len(p) {
		n := min(len(p)-done, rw.lim.Burst())
		if err := rw.lim.WaitN(rw.r.Context(), n); err != nil {
			return done, err
		}
		k, err := rw.ResponseWriter.Write(p[done : done+n])
		done += k
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (rw *rateWriter) Unwrap() http.ResponseWriter { return rw.ResponseWriter }
