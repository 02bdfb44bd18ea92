package contentstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Ingest is a download containerd has in progress: a blob being written
// under the content directory's ingest folder before it is committed.
type Ingest struct {
	Digest digest.Digest
	Ref    string // containerd's ref, such as layer-sha256:<hex>
	Offset int64  // bytes written so far
	Total  int64  // the blob's size
}

// FindIngest returns containerd's download in progress of dgst, or an
// error wrapping ErrNotFound when there is none. Only downloads whose total
// size is known count: a reader must know where the blob ends.
func (s *Store) FindIngest(ctx context.Context, dgst digest.Digest) (Ingest, error) {
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return Ingest{}, err
	}
	defer cancel()
	statuses, err := c.ContentStore().ListStatuses(cctx)
	if err != nil {
		return Ingest{}, s.wrap("listing downloads in progress", err)
	}
	for _, st := range statuses {
		if (st.Expected == dgst || strings.HasSuffix(st.Ref, dgst.String())) && st.Total > 0 {
			return Ingest{Digest: dgst, Ref: st.Ref, Offset: st.Offset, Total: st.Total}, nil
		}
	}
	return Ingest{}, fmt.Errorf("no download of %s in progress: %w", dgst, ErrNotFound)
}

// ErrIngestStalled ends an ingest reader whose download stopped growing.
var ErrIngestStalled = errors.New("the download in progress stopped")

// OpenIngest opens the file containerd writes the download in, for a
// reader that follows it as it grows (see IngestReader). It needs the
// content directory: containerd's API reads committed content only.
func (s *Store) OpenIngest(in Ingest) (*os.File, error) {
	dir := s.ContentDir()
	if dir == "" {
		return nil, fmt.Errorf("downloads in progress are read from the content directory, which is not readable here: %w",
			ErrUnavailable)
	}
	// each ingest folder holds a file naming its ref as
	// <namespace>/<sequence>/<ref>
	root := filepath.Join(dir, "ingest")
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", root, ErrNotFound)
	}
	prefix, suffix := s.cfg.Namespace+"/", "/"+in.Ref
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(root, e.Name(), "ref"))
		if err != nil {
			continue
		}
		ref := string(b)
		if !strings.HasPrefix(ref, prefix) || !strings.HasSuffix(ref, suffix) {
			continue
		}
		f, err := os.Open(filepath.Join(root, e.Name(), "data"))
		if err != nil {
			return nil, fmt.Errorf("opening the download of %s: %w", in.Digest, ErrNotFound)
		}
		return f, nil
	}
	return nil, fmt.Errorf("no ingest folder for %s: %w", in.Ref, ErrNotFound)
}

// IngestReader reads a download in progress from its start to its total
// size, waiting for containerd to write more. The file stays readable once
// containerd commits it (a rename) or removes it; a download that does not
// grow for stall ends the reader with ErrIngestStalled, and one that
// shrinks (containerd started it over) with an error.
type IngestReader struct {
	f     *os.File
	total int64
	off   int64
	stall time.Duration
	ctx   context.Context
}

// NewIngestReader reads f, the data of a download of total bytes.
func NewIngestReader(ctx context.Context, f *os.File, total int64, stall time.Duration) *IngestReader {
	return &IngestReader{f: f, total: total, stall: stall, ctx: ctx}
}

// ingestPoll is how often a reader that caught up looks for more.
const ingestPoll = 5 * time.Millisecond

// Read reads what containerd has written, waiting for more when it has
// read all of it.
func (r *IngestReader) Read(p []byte) (int, error) {
	if r.off >= r.total {
		return 0, io.EOF
	}
	if int64(len(p)) > r.total-r.off {
		p = p[:r.total-r.off]
	}
	waited := time.Duration(0)
	for {
		n, err := r.f.ReadAt(p, r.off)
		if n > 0 {
			r.off += int64(n)
			return n, nil
		}
		if err != nil && err != io.EOF {
			return 0, err
		}
		if st, err := r.f.Stat(); err == nil && st.Size() < r.off {
			return 0, fmt.Errorf("the download in progress started over at %d bytes", st.Size())
		}
		if waited >= r.stall {
			return 0, ErrIngestStalled
		}
		select {
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		case <-time.After(ingestPoll):
			waited += ingestPoll
		}
	}
}

// Close closes the file.
func (r *IngestReader) Close() error { return r.f.Close() }
