package caddymodule

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The collectors are created once per process and registered on every
// config's registry (Caddy gives each config its own), so their values
// carry across reloads instead of vanishing or freezing.
var metrics = struct {
	requests       *prometheus.CounterVec
	bytes          *prometheus.CounterVec
	lookup         *prometheus.HistogramVec
	peerFetch      *prometheus.HistogramVec
	peerThroughput prometheus.Histogram
	advertised     *prometheus.GaugeVec
	peers          prometheus.GaugeFunc
	containerd     prometheus.GaugeFunc
	cold           *prometheus.CounterVec
}{
	requests: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "peermirror",
		Name:      "requests_total",
		Help: "OCI requests answered, by registry (ns; none without it), kind (base, manifest, blob), " +
			"source (local, peer, miss, invalid, error, busy) and method.",
	}, []string{"registry", "kind", "source", "method"}),
	bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "peermirror",
		Name:      "response_bytes_total",
		Help:      "Content bytes sent to clients, by source (local, peer).",
	}, []string{"source"}),
	lookup: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "peermirror",
		Name:      "lookup_duration_seconds",
		Help:      "Time from a local miss to the first peer found in the DHT, or to giving up, by result (found, none).",
		Buckets:   []float64{.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1},
	}, []string{"result"}),
	peerFetch: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "peermirror",
		Name:      "peer_fetch_duration_seconds",
		Help:      "Time to serve a request from peers, from the local miss to the last byte, by kind.",
		Buckets:   prometheus.ExponentialBuckets(.002, 2, 14),
	}, []string{"kind"}),
	peerThroughput: prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "peermirror",
		Name:      "peer_fetch_throughput_bytes_per_second",
		Help:      "Throughput of blobs of 1 MiB or more served from peers.",
		Buckets:   prometheus.ExponentialBuckets(1<<20, 2, 14),
	}),
	advertised: prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "peermirror",
		Name:      "advertised_keys",
		Help:      "Keys this node advertises in the DHT, by kind (tag, digest).",
	}, []string{"kind"}),
	peers: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "peermirror",
		Name:      "peers",
		Help:      "Peers this node is connected to with a known mirror address.",
	}, func() float64 {
		if a := running.Load(); a != nil {
			if r := a.router.Load(); r != nil {
				return float64(len(r.Peers()))
			}
		}
		return 0
	}),
	cold: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "peermirror",
		Name:      "cold_pulls_total",
		Help: "Blobs no node held, by how this node took part: fetcher (went upstream for the cluster), " +
			"follower (streamed another node's download), streamed (served its own download to a follower), " +
			"uncoordinated (no coordinator answered).",
	}, []string{"role"}),
	containerd: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "peermirror",
		Name:      "containerd_connected",
		Help:      "1 while containerd answers, 0 otherwise.",
	}, func() float64 {
		if a := running.Load(); a != nil {
			if s := a.Store(); s != nil && s.Connected() {
				return 1
			}
		}
		return 0
	}),
}

// running is the app of the config started last: the one the gauges
// describe.
var running atomic.Pointer[App]

// registerMetrics registers the collectors on a config's registry; a
// collector already there is fine.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{metrics.requests, metrics.bytes, metrics.lookup,
		metrics.peerFetch, metrics.peerThroughput, metrics.advertised, metrics.peers, metrics.containerd, metrics.cold} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// maxRegistryLabels bounds the distinct registry label values: ns comes
// from clients, and an unbounded label would let them grow the metrics
// without end.
const maxRegistryLabels = 64

var registryLabels = struct {
	sync.RWMutex
	seen map[string]bool
}{seen: map[string]bool{}}

// registryLabel returns ns as a label value, or "other" once the set of
// distinct values is full; "" becomes "none".
func registryLabel(ns string) string {
	if ns == "" {
		return "none"
	}
	registryLabels.RLock()
	ok := registryLabels.seen[ns]
	n := len(registryLabels.seen)
	registryLabels.RUnlock()
	if ok {
		return ns
	}
	if n >= maxRegistryLabels {
		return "other"
	}
	registryLabels.Lock()
	defer registryLabels.Unlock()
	if len(registryLabels.seen) >= maxRegistryLabels {
		return "other"
	}
	registryLabels.seen[ns] = true
	return ns
}

// countingWriter counts the body bytes written through it. It keeps the
// wrapped writer's ReadFrom, so a blob file handed to io.Copy still goes
// out with sendfile.
type countingWriter struct {
	http.ResponseWriter
	n      int64
	status int // the status sent, 0 until then
}

func (cw *countingWriter) WriteHeader(status int) {
	if cw.status == 0 {
		cw.status = status
	}
	cw.ResponseWriter.WriteHeader(status)
}

func (cw *countingWriter) Write(p []byte) (int, error) {
	if cw.status == 0 {
		cw.status = http.StatusOK
	}
	n, err := cw.ResponseWriter.Write(p)
	cw.n += int64(n)
	return n, err
}

// ReadFrom passes r, unwrapped, to the underlying writer.
func (cw *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	if cw.status == 0 {
		cw.status = http.StatusOK
	}
	n, err := io.Copy(cw.ResponseWriter, r)
	cw.n += n
	return n, err
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (cw *countingWriter) Unwrap() http.ResponseWriter { return cw.ResponseWriter }

// observeRequest records one answered OCI request.
func observeRequest(r *http.Request, req ociRequest, source string, cw *countingWriter, took time.Duration) {
	kind := req.kind.String()
	metrics.requests.WithLabelValues(registryLabel(req.registry), kind, source, r.Method).Inc()
	if (source != "local" && source != "peer") || req.kind == kindBase {
		return
	}
	metrics.bytes.WithLabelValues(source).Add(float64(cw.n))
	if source == "peer" {
		metrics.peerFetch.WithLabelValues(kind).Observe(took.Seconds())
		if cw.n >= 1<<20 && took > 0 {
			metrics.peerThroughput.Observe(float64(cw.n) / took.Seconds())
		}
	}
}

// observeLookup records how long a DHT lookup took to name its first peer,
// or to end without one.
func observeLookup(took time.Duration, found bool) {
	result := "none"
	if found {
		result = "found"
	}
	metrics.lookup.WithLabelValues(result).Observe(took.Seconds())
}
