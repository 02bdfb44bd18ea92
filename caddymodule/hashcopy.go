package caddymodule

import (
	"hash"
	"io"
	"sync"
	"time"
)

// hashDepth buffers of hashChunk bytes each let a transfer read and send
// up to that far ahead of its hashing.
const (
	hashDepth = 3
	hashChunk = 512 << 10
)

// hashBufs holds the buffer sets of hashedCopy.
var hashBufs = sync.Pool{New: func() any {
	var set [hashDepth][]byte
	for i := range set {
		set[i] = make([]byte, hashChunk)
	}
	return &set
}}

// hashedCopy copies n bytes from src to w and hashes them into h. The
// hashing runs on a second goroutine, alongside the reads and writes, so a
// verified relay is not held to what one core can read, hash and write in
// turn: on a peer transfer SHA-256 costs about as much CPU as all the
// network calls together. It returns the bytes written; h holds every byte
// read when it returns, and src gave less than n only with an error
// (io.ErrUnexpectedEOF for an early end).
func hashedCopy(w io.Writer, src io.Reader, n int64, h hash.Hash) (int64, error) {
	set := hashBufs.Get().(*[hashDepth][]byte)
	free := make(chan []byte, hashDepth)
	for _, b := range set {
		free <- b
	}
	work := make(chan []byte, hashDepth)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for b := range work {
			h.Write(b)
			free <- b[:cap(b)]
		}
	}()
	// the hasher is waited for even if w panics (an aborted response), so
	// it never outlives the copy and the buffers go back to the pool only
	// once it let go of them
	defer func() {
		close(work)
		<-done
		hashBufs.Put(set)
	}()

	var written int64
	for written < n {
		buf := <-free
		if rem := n - written; int64(len(buf)) > rem {
			buf = buf[:rem]
		}
		nr, rerr := readChunk(src, buf)
		if nr > 0 {
			nw, werr := w.Write(buf[:nr])
			written += int64(nw)
			work <- buf[:nr]
			if werr != nil {
				return written, werr
			}
			if nw != nr {
				return written, io.ErrShortWrite
			}
		} else {
			free <- buf
		}
		if rerr != nil && written < n {
			if rerr == io.EOF {
				rerr = io.ErrUnexpectedEOF
			}
			return written, rerr
		}
	}
	return written, nil
}

// chunkWait bounds how long readChunk holds bytes back from the client.
const chunkWait = 20 * time.Millisecond

// readChunk reads into buf until it is full, src fails, or chunkWait has
// passed since it started: full buffers keep the hand-overs to the hasher,
// each a wake-up that costs CPU, few on a fast stream, and the time bound
// keeps a slow one flowing to the client.
func readChunk(src io.Reader, buf []byte) (int, error) {
	start := time.Now()
	n := 0
	for n < len(buf) {
		nr, err := src.Read(buf[n:])
		n += nr
		if err != nil {
			return n, err
		}
		if time.Since(start) >= chunkWait {
			break
		}
	}
	return n, nil
}
