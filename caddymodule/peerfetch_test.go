package caddymodule

import (
	"context"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// slowResolver answers the first lookup after a short delay and never
// answers the ones after it, like a DHT too busy to reply within the
// resolve timeout.
type slowResolver struct {
	mu    sync.Mutex
	calls int
	peer  peerCandidate
}

func (r *slowResolver) resolve(ctx context.Context, key string, max int) <-chan peerCandidate {
	r.mu.Lock()
	r.calls++
	first := r.calls == 1
	r.mu.Unlock()
	ch := make(chan peerCandidate)
	go func() {
		defer close(ch)
		if first {
			select {
			case <-time.After(100 * time.Millisecond):
			case <-ctx.Done():
				return
			}
			select {
			case ch <- r.peer:
			case <-ctx.Done():
				return
			}
		}
		<-ctx.Done()
	}()
	return ch
}

// TestPeerLookupShared checks that requests for one key share what a
// lookup finds: requests made while it runs, and requests made soon after,
// are served although their own lookups never answer.
func TestPeerLookupShared(t *testing.T) {
	blob := randomBytes(64 << 10)
	d := digest.FromBytes(blob)
	p := startPeer(t, "holder", good, blob, "application/octet-stream")
	res := &slowResolver{peer: p.candidate()}
	srv, _ := peerOnlyServer(t, res)
	url := srv.URL + "/v2/team/app/blobs/" + d.String() + "?ns=registry.test"
	get := func() (int, error) {
		resp, err := http.Get(url)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode == http.StatusOK && digest.FromBytes(body) != d {
			t.Errorf("got %d bytes not matching the digest", len(body))
		}
		return resp.StatusCode, err
	}

	// a burst: one lookup answers, the others never do
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if status, err := get(); err != nil || status != http.StatusOK {
				t.Errorf("request in the burst: %d, %v", status, err)
			}
		}()
		if i == 0 {
			time.Sleep(20 * time.Millisecond) // the first lookup starts first
		}
	}
	wg.Wait()
	// later, its lookup never answering either
	if status, err := get(); err != nil || status != http.StatusOK {
		t.Errorf("request after the burst: %d, %v", status, err)
	}
}

// TestPeerSlowReaderNoResume checks that a client that pauses longer than
// the peer timeout does not make the peer look stalled: the transfer goes
// on from the same stream, without resumes.
func TestPeerSlowReaderNoResume(t *testing.T) {
	blob := randomBytes(32 << 20) // more than the socket buffers hold
	d := digest.FromBytes(blob)
	p := startPeer(t, "holder", good, blob, "application/octet-stream")
	res := &fakeResolver{peers: map[string][]peerCandidate{d.String(): {p.candidate()}}}
	srv, _ := peerOnlyServer(t, res)

	client := &http.Client{Timeout: 30 * time.Second} // hang detector
	resp, err := client.Get(srv.URL + "/v2/team/app/blobs/" + d.String() + "?ns=registry.test")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got []byte
	buf := make([]byte, 4<<20)
	for pauses := 0; ; pauses++ {
		n, err := io.ReadFull(resp.Body, buf)
		got = append(got, buf[:n]...)
		if err != nil {
			break
		}
		if pauses < 2 {
			time.Sleep(700 * time.Millisecond) // over twice the peer timeout
		}
	}
	if digest.FromBytes(got) != d {
		t.Fatalf("got %d bytes not matching the digest", len(got))
	}
	if n := p.count(); n != 1 {
		t.Fatalf("the peer was asked %d times, want once: the pauses caused resumes", n)
	}
}
