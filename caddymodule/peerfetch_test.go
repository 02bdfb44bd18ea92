package caddymodule

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
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

// startStorePeer serves the given contents by digest, as a peer mirror
// holding them would, and 404 for anything else.
func startStorePeer(t *testing.T, id string, contents map[digest.Digest]ocispec.Descriptor,
	data map[digest.Digest][]byte) *fakePeer {
	t.Helper()
	p := &fakePeer{id: id}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.hits++
		p.mu.Unlock()
		d := digest.Digest(path.Base(r.URL.Path))
		desc, ok := contents[d]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", desc.MediaType)
		w.Header().Set("Docker-Content-Digest", d.String())
		w.Header().Set("Content-Length", strconv.Itoa(len(data[d])))
		_, _ = w.Write(data[d])
	}))
	t.Cleanup(p.srv.Close)
	return p
}

// TestPeerManifestHints checks that the peer that served an image
// manifest is asked for its config and layers without waiting on their
// DHT lookups, and that a layer it lacks is still found through the DHT.
func TestPeerManifestHints(t *testing.T) {
	config, layer, other := randomBytes(100), randomBytes(2<<20), randomBytes(3000)
	desc := func(mt string, b []byte) ocispec.Descriptor {
		return ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
	}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
		Config: desc(ocispec.MediaTypeImageConfig, config),
		Layers: []ocispec.Descriptor{desc(ocispec.MediaTypeImageLayerGzip, layer), desc(ocispec.MediaTypeImageLayerGzip, other)}}
	m.SchemaVersion = 2
	manifest, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	md := desc(ocispec.MediaTypeImageManifest, manifest)
	data := map[digest.Digest][]byte{md.Digest: manifest, m.Config.Digest: config,
		m.Layers[0].Digest: layer, m.Layers[1].Digest: other}
	holder := startStorePeer(t, "holder", map[digest.Digest]ocispec.Descriptor{
		md.Digest: md, m.Config.Digest: m.Config, m.Layers[0].Digest: m.Layers[0]}, data)
	second := startStorePeer(t, "second", map[digest.Digest]ocispec.Descriptor{m.Layers[1].Digest: m.Layers[1]}, data)
	// the DHT knows the holder for the manifest only, and the second
	// peer for the layer the holder lacks
	res := &fakeResolver{peers: map[string][]peerCandidate{
		md.Digest.String():          {holder.candidate()},
		m.Layers[1].Digest.String(): {second.candidate()},
	}}
	srv, _ := peerOnlyServer(t, res)
	get := func(kind string, d digest.Digest) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + "/v2/team/app/" + kind + "/" + d.String() + "?ns=registry.test")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode == http.StatusOK && digest.FromBytes(body) != d {
			t.Errorf("%s: bytes do not match", d)
		}
		return resp.StatusCode, resp.Header.Get(headerSource)
	}

	// before the manifest, nothing points at the holder for the layer
	if status, _ := get("blobs", m.Layers[0].Digest); status != http.StatusNotFound {
		t.Fatalf("layer before its manifest: %d, want 404", status)
	}
	if status, src := get("manifests", md.Digest); status != http.StatusOK || src != "peer holder" {
		t.Fatalf("manifest: %d from %q", status, src)
	}
	for _, d := range []digest.Digest{m.Config.Digest, m.Layers[0].Digest} {
		if status, src := get("blobs", d); status != http.StatusOK || src != "peer holder" {
			t.Errorf("blob %s after its manifest: %d from %q, want 200 from the holder", d, status, src)
		}
	}
	if status, src := get("blobs", m.Layers[1].Digest); status != http.StatusOK || src != "peer second" {
		t.Errorf("layer the holder lacks: %d from %q, want 200 from the second peer", status, src)
	}
}
