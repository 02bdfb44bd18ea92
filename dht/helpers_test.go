package dht

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/net/dns/dnsmessage"
)

// Every time bound in these tests is a hang detector, about ten times what
// the step takes on a loaded two-core machine, not a target.
const hangTimeout = 30 * time.Second

// leakOptions would list goroutines that outlive every router by design
// (process globals of libraries, matched by function name). With
// go-libp2p v0.50.0 and go-libp2p-kad-dht v0.42.2 there is none: a closed
// router, even one whose Start failed, leaves no goroutine behind.
var leakOptions []goleak.Option

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, leakOptions...)
}

var nextMirrorPort atomic.Int32

func init() { nextMirrorPort.Store(30100) }

// testConfig returns a config for a node on 127.0.0.1 with a mirror port of
// its own (nothing listens there: only the number travels).
func testConfig() Config {
	return Config{
		ListenAddrs:       []string{"/ip4/127.0.0.1/tcp/0"},
		MirrorPort:        int(nextMirrorPort.Add(1)),
		BootstrapInterval: time.Second,
	}
}

// testLogger collects a router's logs and prints them only if the test
// fails. Writing to a buffer rather than t.Log keeps a late log line of a
// libp2p callback from panicking after the test ended.
func testLogger(t *testing.T, name string) *zap.Logger {
	t.Helper()
	var mu sync.Mutex
	var buf bytes.Buffer
	ws := zapcore.AddSync(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}))
	enc := zap.NewDevelopmentEncoderConfig()
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), ws, zap.DebugLevel)
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("PEERMIRROR_TEST_LOGS") != "" {
			mu.Lock()
			t.Logf("logs of %s:\n%s", name, buf.String())
			mu.Unlock()
		}
	})
	return zap.New(core).Named(name)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// newRouter makes a router, closed when the test ends.
func newRouter(t *testing.T, name string, cfg Config) *Router {
	t.Helper()
	r, err := New(cfg, testLogger(t, name))
	if err != nil {
		t.Fatalf("New(%s): %v", name, err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("closing %s: %v", name, err)
		}
	})
	return r
}

// startRouter makes and starts a router, closed when the test ends.
func startRouter(t *testing.T, name string, cfg Config) *Router {
	t.Helper()
	r := newRouter(t, name, cfg)
	if err := r.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	return r
}

// p2pAddrs returns r's announced addresses with /p2p/<id>, as static
// bootstrap wants them.
func p2pAddrs(t *testing.T, r *Router) []string {
	t.Helper()
	var out []string
	for _, a := range r.Addrs() {
		out = append(out, a.String()+"/p2p/"+r.ID().String())
	}
	if len(out) == 0 {
		t.Fatalf("router %s announces no address", r.ID())
	}
	return out
}

// eventually polls cond until it holds, failing the test after hangTimeout.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// resolveAll runs one Resolve and collects what it yields.
func resolveAll(t *testing.T, r *Router, key string, max int) []Peer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangTimeout)
	defer cancel()
	var out []Peer
	for p := range r.Resolve(ctx, key, max) {
		out = append(out, p)
	}
	if ctx.Err() != nil {
		t.Fatalf("resolving %q did not end before the hang timeout", key)
	}
	return out
}

// waitResolves polls Resolve on r until it yields want (by ID), and
// returns the peers of that last answer.
func waitResolves(t *testing.T, r *Router, key string, want ...*Router) []Peer {
	t.Helper()
	var got []Peer
	eventually(t, "resolving "+key, func() bool {
		got = resolveAll(t, r, key, 0)
		ids := make(map[string]bool)
		for _, p := range got {
			ids[p.ID.String()] = true
		}
		for _, w := range want {
			if !ids[w.ID().String()] {
				return false
			}
		}
		return true
	})
	return got
}

// servePeerList serves r's peer list at PeerListPath on 127.0.0.1.
func servePeerList(t *testing.T, r *Router) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != PeerListPath {
			http.NotFound(w, req)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		if err := EncodePeerList(w, r.PeerList()); err != nil {
			t.Errorf("encoding peer list: %v", err)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// dnsServer answers A and AAAA queries for one name over UDP on
// 127.0.0.1, so DNS bootstrap is tested without any real resolver.
type dnsServer struct {
	conn    net.PacketConn
	name    string
	a, aaaa []net.IP
	queries atomic.Int32
	done    chan struct{}
}

func startDNSServer(t *testing.T, name string, a, aaaa []net.IP) *dnsServer {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dnsServer{conn: conn, name: strings.TrimSuffix(name, ".") + ".", a: a, aaaa: aaaa, done: make(chan struct{})}
	go s.serve()
	t.Cleanup(func() {
		conn.Close()
		<-s.done
	})
	return s
}

// resolver returns a resolver whose every query goes to s.
func (s *dnsServer) resolver() *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "udp", s.conn.LocalAddr().String())
		},
	}
}

func (s *dnsServer) serve() {
	defer close(s.done)
	buf := make([]byte, 1500)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		if resp, ok := s.answer(buf[:n]); ok {
			_, _ = s.conn.WriteTo(resp, from)
		}
	}
}

func (s *dnsServer) answer(query []byte) ([]byte, bool) {
	var p dnsmessage.Parser
	hdr, err := p.Start(query)
	if err != nil {
		return nil, false
	}
	q, err := p.Question()
	if err != nil {
		return nil, false
	}
	s.queries.Add(1)
	rcode := dnsmessage.RCodeSuccess
	if !strings.EqualFold(q.Name.String(), s.name) {
		rcode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{
		ID: hdr.ID, Response: true, Authoritative: true, RecursionDesired: hdr.RecursionDesired,
		RecursionAvailable: true, RCode: rcode,
	})
	b.EnableCompression()
	_ = b.StartQuestions()
	_ = b.Question(q)
	_ = b.StartAnswers()
	if rcode == dnsmessage.RCodeSuccess {
		rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 1}
		switch q.Type {
		case dnsmessage.TypeA:
			for _, ip := range s.a {
				var r dnsmessage.AResource
				copy(r.A[:], ip.To4())
				_ = b.AResource(rh, r)
			}
		case dnsmessage.TypeAAAA:
			for _, ip := range s.aaaa {
				var r dnsmessage.AAAAResource
				copy(r.AAAA[:], ip.To16())
				_ = b.AAAAResource(rh, r)
			}
		}
	}
	out, err := b.Finish()
	return out, err == nil
}
