package caddymodule

import (
	"net/http"
	"strings"
	"sync"
	"time"
)

// recentRequests keeps the last OCI requests this process answered, for
// the debug page. It is one per process, like Caddy's metrics, so a
// config reload does not empty it.
var recentRequests = newRequestLog(100)

// requestRecord is one answered OCI request.
type requestRecord struct {
	At        time.Time     `json:"at"`
	Method    string        `json:"method"`
	Kind      string        `json:"kind"`
	Registry  string        `json:"registry,omitempty"`
	Name      string        `json:"name,omitempty"`
	Reference string        `json:"reference,omitempty"`
	Source    string        `json:"source"`         // local, peer, miss, invalid, error
	Peer      string        `json:"peer,omitempty"` // the peer that served it
	Forwarded bool          `json:"forwarded"`      // asked by another node
	Status    int           `json:"status"`
	Bytes     int64         `json:"bytes"`
	Took      time.Duration `json:"took_ns"`
}

// requestLog is a ring of the latest requests and a count of all of them
// by source.
type requestLog struct {
	mu       sync.Mutex
	ring     []requestRecord
	next     int
	full     bool
	bySource map[string]int64
}

func newRequestLog(n int) *requestLog {
	return &requestLog{ring: make([]requestRecord, n), bySource: map[string]int64{}}
}

// add records one answered request.
func (l *requestLog) add(r *http.Request, req ociRequest, source string, cw *countingWriter,
	start time.Time, took time.Duration) {
	rec := requestRecord{At: start, Method: r.Method, Kind: req.kind.String(), Registry: req.registry,
		Name: req.name, Reference: req.reference(), Source: source,
		Forwarded: r.Header.Get(headerForwarded) != "", Status: cw.status, Bytes: cw.n, Took: took}
	if p, ok := strings.CutPrefix(cw.Header().Get(headerSource), "peer "); ok {
		rec.Peer = p
	}
	if rec.Kind == "" || source == "invalid" {
		rec.Kind, rec.Name, rec.Reference = "", "", ""
	}
	l.mu.Lock()
	l.ring[l.next] = rec
	l.next = (l.next + 1) % len(l.ring)
	l.full = l.full || l.next == 0
	l.bySource[source]++
	l.mu.Unlock()
}

// snapshot returns the recorded requests, newest first, and the counts by
// source since the process started.
func (l *requestLog) snapshot() ([]requestRecord, map[string]int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.next
	if l.full {
		n = len(l.ring)
	}
	out := make([]requestRecord, 0, n)
	for i := 1; i <= n; i++ {
		out = append(out, l.ring[(l.next-i+len(l.ring))%len(l.ring)])
	}
	counts := make(map[string]int64, len(l.bySource))
	for k, v := range l.bySource {
		counts[k] = v
	}
	return out, counts
}
