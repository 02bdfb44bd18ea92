package contentstore

import (
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/v2/core/content"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Content is one blob opened for reading. Close it when done.
type Content struct {
	// Descriptor holds the blob's digest, size and media type.
	Descriptor ocispec.Descriptor

	file *os.File         // the blob file, on the fast path
	ra   content.ReaderAt // containerd's gRPC reader otherwise
}

// File returns the open blob file when the content is read from disk, and
// nil when it is read over gRPC. A caller that copies from the file itself
// (not wrapped) lets the HTTP server use sendfile.
func (c *Content) File() *os.File { return c.file }

// ReadAt reads len(p) bytes at off. It behaves as an os.File's ReadAt on
// both paths: a read that reaches the end returns io.EOF with the bytes it
// got, and a negative offset is an error.
func (c *Content) ReadAt(p []byte, off int64) (int, error) {
	if c.file != nil {
		return c.file.ReadAt(p, off)
	}
	// containerd reads a negative offset as 0, and fails a read that starts
	// past the end with an error that is not io.EOF
	switch {
	case off < 0:
		return 0, fmt.Errorf("reading %s at %d: negative offset", c.Descriptor.Digest, off)
	case len(p) == 0:
		return 0, nil
	case off >= c.Descriptor.Size:
		return 0, io.EOF
	}
	return c.ra.ReadAt(p, off)
}

// Section returns a reader of n bytes starting at off.
func (c *Content) Section(off, n int64) io.Reader {
	return io.NewSectionReader(c, off, n)
}

// Size returns the blob's size in bytes.
func (c *Content) Size() int64 { return c.Descriptor.Size }

// Close releases the file or the gRPC reader.
func (c *Content) Close() error {
	if c.file != nil {
		return c.file.Close()
	}
	if c.ra != nil {
		return c.ra.Close()
	}
	return nil
}
