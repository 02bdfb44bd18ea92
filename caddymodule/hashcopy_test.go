package caddymodule

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"testing"
	"testing/iotest"
	"time"
)

func TestHashedCopy(t *testing.T) {
	for _, size := range []int{0, 1, hashChunk - 1, hashChunk, hashChunk + 1, hashDepth*hashChunk + 12345, 3 << 20} {
		data := randomBytes(size + 100) // more than is asked for: the copy stops at n
		for name, src := range map[string]io.Reader{
			"whole":    bytes.NewReader(data),
			"half":     iotest.HalfReader(bytes.NewReader(data)),
			"data+EOF": iotest.DataErrReader(bytes.NewReader(data)),
		} {
			var out bytes.Buffer
			h := sha256.New()
			n, err := hashedCopy(&out, src, int64(size), h)
			if err != nil || n != int64(size) {
				t.Fatalf("size %d, %s: copied %d, %v", size, name, n, err)
			}
			if !bytes.Equal(out.Bytes(), data[:size]) {
				t.Fatalf("size %d, %s: wrong bytes written", size, name)
			}
			if want := sha256.Sum256(data[:size]); !bytes.Equal(h.Sum(nil), want[:]) {
				t.Fatalf("size %d, %s: wrong hash", size, name)
			}
		}
	}
}

func TestHashedCopyShortSource(t *testing.T) {
	data := randomBytes(5*hashChunk + 7)
	h := sha256.New()
	var out bytes.Buffer
	n, err := hashedCopy(&out, bytes.NewReader(data), int64(len(data))+1, h)
	if !errors.Is(err, io.ErrUnexpectedEOF) || n != int64(len(data)) {
		t.Fatalf("copy from a short source = %d, %v; want %d, unexpected EOF", n, err, len(data))
	}
	// every byte read is hashed, also on error
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Error("hash does not cover the bytes read")
	}
	readErr := errors.New("peer went away")
	failing := io.MultiReader(bytes.NewReader(data[:1000]), iotest.ErrReader(readErr))
	_, err = hashedCopy(io.Discard, failing, 1<<20, sha256.New())
	if !errors.Is(err, readErr) {
		t.Errorf("copy from a failing source = %v, want its error", err)
	}
}

type failWriter struct{ after int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, errors.New("client went away")
	}
	f.after -= len(p)
	return len(p), nil
}

type panicWriter struct{}

func (panicWriter) Write([]byte) (int, error) { panic("aborted response") }

func TestHashedCopyWriterFails(t *testing.T) {
	data := randomBytes(2 << 20)
	n, err := hashedCopy(&failWriter{after: 3 * hashChunk}, bytes.NewReader(data), int64(len(data)), sha256.New())
	if err == nil || n != 3*hashChunk {
		t.Errorf("copy to a failing writer = %d, %v; want %d and its error", n, err, 3*hashChunk)
	}
	// a panicking writer leaves no hasher behind (goleak checks at the end)
	func() {
		defer func() {
			if recover() == nil {
				t.Error("the writer's panic was swallowed")
			}
		}()
		_, _ = hashedCopy(panicWriter{}, bytes.NewReader(data), int64(len(data)), sha256.New())
	}()
}

func BenchmarkHashedCopy(b *testing.B) {
	data := randomBytes(64 << 20)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := hashedCopy(io.Discard, bytes.NewReader(data), int64(len(data)), sha256.New()); err != nil {
			b.Fatal(err)
		}
	}
}

// trickle gives 1 KiB every 2ms.
type trickle struct{ left int }

func (r *trickle) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	time.Sleep(2 * time.Millisecond)
	n := min(len(p), 1024, r.left)
	r.left -= n
	return n, nil
}

// firstWrite records when the first bytes arrived.
type firstWrite struct {
	start, at time.Time
	n         int
}

func (w *firstWrite) Write(p []byte) (int, error) {
	if w.at.IsZero() {
		w.at = time.Now()
	}
	w.n += len(p)
	return len(p), nil
}

// A slow stream keeps flowing to the client: bytes are not held back until
// a whole buffer is full (which would take about a second here).
func TestHashedCopySlowSource(t *testing.T) {
	const size = 600 << 10
	w := &firstWrite{start: time.Now()}
	if _, err := hashedCopy(w, &trickle{left: size}, size, sha256.New()); err != nil || w.n != size {
		t.Fatalf("copied %d of %d: %v", w.n, size, err)
	}
	if wait := w.at.Sub(w.start); wait > 500*time.Millisecond { // generous: the bound is chunkWait
		t.Errorf("first bytes reached the client after %v", wait)
	}
}
