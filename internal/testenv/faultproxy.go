package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// FaultMode is what a [FaultProxy] does with a request it matches.
type FaultMode int

const (
	// FaultPass forwards the request and relays the answer unchanged.
	FaultPass FaultMode = iota
	// FaultRefuse closes the proxy's listening socket: connections to its
	// port are refused until another mode is set.
	FaultRefuse
	// FaultSilent accepts the request and never answers it.
	FaultSilent
	// Fault500 answers 500 Internal Server Error without asking the target.
	Fault500
	// Fault404 answers 404 with an OCI BLOB_UNKNOWN error without asking
	// the target.
	Fault404
	// FaultTrickle relays the status and headers at once, then the body
	// TrickleBytes at a time, one piece every TrickleEvery.
	FaultTrickle
	// FaultCloseMidBody relays the status, the headers and the first
	// CutAfter bytes of the body (half of a body no longer than
	// 2*CutAfter), then closes the connection.
	FaultCloseMidBody
	// FaultFlipByte relays everything with one byte of the body inverted:
	// the byte at body offset FlipAt (the middle of a shorter body).
	FaultFlipByte
)

// String names the mode, for subtest names.
func (m FaultMode) String() string {
	names := []string{"pass", "refuse", "silent", "500", "404", "trickle", "close-mid-body", "flip-byte"}
	if int(m) < len(names) {
		return names[m]
	}
	return "mode-" + strconv.Itoa(int(m))
}

// Fault configures a [FaultProxy]. The zero value passes everything.
type Fault struct {
	// Mode applies to the requests that Match accepts; the others pass.
	Mode FaultMode
	// Match selects the requests the mode applies to; nil matches all.
	// FaultRefuse applies to every connection whatever Match says.
	Match func(*http.Request) bool
	// Delay holds back the answer to every request Match accepts, in any
	// mode: a slow but healthy node.
	Delay time.Duration
	// TrickleBytes and TrickleEvery shape FaultTrickle. Defaults: 1 KiB
	// every 100 ms.
	TrickleBytes int
	TrickleEvery time.Duration
	// CutAfter shapes FaultCloseMidBody. Default: 1 MiB.
	CutAfter int64
	// FlipAt shapes FaultFlipByte. Default: 1 MiB.
	FlipAt int64
}

// ProxiedRequest is one request a [FaultProxy] received.
type ProxiedRequest struct {
	Method string
	URI    string // path and query
	Range  string // the Range header, or ""
	Header http.Header
	Mode   FaultMode
	Status int // status sent, 0 when none was
}

// FaultProxy is an HTTP proxy on loopback that sits in front of one
// server (a node's Caddy) and can break the answers on purpose: refuse
// connections, never answer, answer with an error, trickle a body, cut it
// or flip a byte in it. A node started with its mirror_port set to the
// proxy's port is reached by its peers only through the proxy.
// Keep-alives are off, so a new mode applies to every later request.
type FaultProxy struct {
	// Port is the proxy's port on 127.0.0.1; it stays the same across a
	// FaultRefuse.
	Port int
	// URL is http://127.0.0.1:<Port>.
	URL string

	client *http.Client
	srv    *http.Server
	closed chan struct{} // closed by Close: releases silent requests

	mu       sync.Mutex
	target   string
	fault    Fault
	listener net.Listener // nil while refusing
	served   chan struct{}
	log      []ProxiedRequest
	isClosed bool
}

// StartFaultProxy starts a fault proxy in passing mode on a free loopback
// port. It answers 502 until SetTarget names the server behind it.
// t.Cleanup stops it.
func StartFaultProxy(t T) *FaultProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: starting fault proxy: %v", err)
	}
	p := &FaultProxy{
		Port:   l.Addr().(*net.TCPAddr).Port,
		closed: make(chan struct{}),
		client: &http.Client{Transport: loopbackTransport()},
	}
	p.client.Transport.(*http.Transport).DisableCompression = true
	p.URL = "http://127.0.0.1:" + strconv.Itoa(p.Port)
	p.srv = &http.Server{Handler: http.HandlerFunc(p.serve), ReadHeaderTimeout: hangTimeout}
	p.srv.SetKeepAlivesEnabled(false)
	p.serveOn(l)
	t.Cleanup(p.Close)
	return p
}

// serveOn serves on l until it is closed.
func (p *FaultProxy) serveOn(l net.Listener) {
	done := make(chan struct{})
	p.mu.Lock()
	p.listener, p.served = l, done
	p.mu.Unlock()
	go func() {
		defer close(done)
		_ = p.srv.Serve(l)
	}()
}

// SetTarget sets the base URL (a loopback http URL) of the server behind
// the proxy.
func (p *FaultProxy) SetTarget(t T, target string) {
	t.Helper()
	if err := checkLoopbackURL(target); err != nil {
		t.Fatalf("testenv: fault proxy target: %v", err)
	}
	p.mu.Lock()
	p.target = strings.TrimRight(target, "/")
	p.mu.Unlock()
}

// SetFault changes what the proxy does from the next connection on.
// Switching to or from FaultRefuse closes or reopens the listening socket
// on the same port.
func (p *FaultProxy) SetFault(t T, f Fault) {
	t.Helper()
	p.mu.Lock()
	p.fault = f
	l, done := p.listener, p.served
	p.mu.Unlock()
	switch {
	case f.Mode == FaultRefuse && l != nil:
		_ = l.Close()
		<-done
		p.mu.Lock()
		p.listener = nil
		p.mu.Unlock()
	case f.Mode != FaultRefuse && l == nil:
		// the port was ours a moment ago; another process may take it in
		// between, which is reported rather than worked around
		var err error
		for i := 0; i < 20; i++ {
			if l, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p.Port)); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("testenv: fault proxy: listening on port %d again: %v", p.Port, err)
		}
		p.serveOn(l)
	}
}

// Requests returns the requests received so far, in order of arrival.
func (p *FaultProxy) Requests() []ProxiedRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]ProxiedRequest(nil), p.log...)
}

// Close stops the proxy and ends requests kept waiting.
func (p *FaultProxy) Close() {
	p.mu.Lock()
	if p.isClosed {
		p.mu.Unlock()
		return
	}
	p.isClosed = true
	close(p.closed)
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.srv.Shutdown(ctx); err != nil {
		_ = p.srv.Close()
	}
}

// record logs a request and returns its index in the log.
func (p *FaultProxy) record(r *http.Request, mode FaultMode) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.log = append(p.log, ProxiedRequest{Method: r.Method, URI: r.URL.RequestURI(), Range: r.Header.Get("Range"),
		Header: r.Header.Clone(), Mode: mode})
	return len(p.log) - 1
}

func (p *FaultProxy) setStatus(i, status int) {
	p.mu.Lock()
	p.log[i].Status = status
	p.mu.Unlock()
}

// serve handles one request according to the fault set.
func (p *FaultProxy) serve(w http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	f, target := p.fault, p.target
	p.mu.Unlock()
	mode := FaultPass
	if f.Match == nil || f.Match(r) {
		mode = f.Mode
		if f.Delay > 0 {
			select {
			case <-time.After(f.Delay):
			case <-r.Context().Done():
				return
			case <-p.closed:
				return
			}
		}
	}
	i := p.record(r, mode)

	switch mode {
	case FaultSilent, FaultRefuse: // a connection accepted just before the refusal is kept silent
		select {
		case <-r.Context().Done():
		case <-p.closed:
		}
		return
	case Fault500:
		p.setStatus(i, http.StatusInternalServerError)
		http.Error(w, "fault proxy: 500 on purpose", http.StatusInternalServerError)
		return
	case Fault404:
		p.setStatus(i, http.StatusNotFound)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = io.WriteString(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"fault proxy: 404 on purpose"}]}`)
		return
	}
	if target == "" {
		p.setStatus(i, http.StatusBadGateway)
		http.Error(w, "fault proxy: no target", http.StatusBadGateway)
		return
	}

	// ask the target
	req, err := http.NewRequestWithContext(r.Context(), r.Method, target+r.URL.RequestURI(), nil)
	if err != nil {
		p.setStatus(i, http.StatusBadGateway)
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	for k, vs := range r.Header {
		if !hopByHop(k) {
			req.Header[k] = vs
		}
	}
	resp, err := p.client.Do(req)
	if err != nil {
		p.setStatus(i, http.StatusBadGateway)
		http.Error(w, "fault proxy: "+err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, vs := range resp.Header {
		if !hopByHop(k) {
			w.Header()[k] = vs
		}
	}
	if resp.ContentLength >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	}
	p.setStatus(i, resp.StatusCode)
	w.WriteHeader(resp.StatusCode)
	if r.Method == http.MethodHead {
		return
	}

	// relay the body, broken as asked
	var body io.Reader = resp.Body
	switch mode {
	case FaultCloseMidBody:
		cut := f.CutAfter
		if cut <= 0 {
			cut = 1 << 20
		}
		if resp.ContentLength >= 0 && resp.ContentLength <= 2*cut {
			cut = resp.ContentLength / 2
		}
		_, _ = io.Copy(w, io.LimitReader(resp.Body, cut))
		flush(w)
		panic(http.ErrAbortHandler) // the server drops the connection
	case FaultTrickle:
		p.trickle(w, r, resp.Body, f)
		return
	case FaultFlipByte:
		at := f.FlipAt
		if at <= 0 {
			at = 1 << 20
		}
		if resp.ContentLength >= 0 && at >= resp.ContentLength {
			at = resp.ContentLength / 2
		}
		body = &flipReader{r: resp.Body, at: at}
	}
	_, _ = io.Copy(w, body)
}

// trickle sends body slowly until it ends or the client leaves.
func (p *FaultProxy) trickle(w http.ResponseWriter, r *http.Request, body io.Reader, f Fault) {
	size, every := f.TrickleBytes, f.TrickleEvery
	if size <= 0 {
		size = 1 << 10
	}
	if every <= 0 {
		every = 100 * time.Millisecond
	}
	buf := make([]byte, size)
	for {
		n, err := io.ReadFull(body, buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			flush(w)
		}
		if err != nil {
			return
		}
		select {
		case <-time.After(every):
		case <-r.Context().Done():
			return
		case <-p.closed:
			return
		}
	}
}

func flush(w http.ResponseWriter) {
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
}

// hopByHop reports whether a header belongs to one connection only.
func hopByHop(k string) bool {
	switch http.CanonicalHeaderKey(k) {
	case "Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return false
}

// flipReader inverts the byte at offset at of the stream it reads.
type flipReader struct {
	r   io.Reader
	at  int64
	off int64
}

func (f *flipReader) Read(b []byte) (int, error) {
	n, err := f.r.Read(b)
	if f.at >= f.off && f.at < f.off+int64(n) {
		b[f.at-f.off] ^= 0xff
	}
	f.off += int64(n)
	return n, err
}

// String describes a request for failure messages.
func (r ProxiedRequest) String() string {
	s := fmt.Sprintf("%s %s [%s] -> %d", r.Method, r.URI, r.Mode, r.Status)
	if r.Range != "" {
		s += " Range: " + r.Range
	}
	return s
}
