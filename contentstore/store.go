// Package contentstore reads a node's containerd: the images it holds, the
// content behind them, and the changes to both. It knows containerd and the
// OCI image formats and nothing of HTTP or of peers.
package contentstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
)

// Defaults for a node of a Kubernetes cluster.
const (
	DefaultAddress   = "/run/containerd/containerd.sock"
	DefaultNamespace = "k8s.io"
)

// ErrNotFound is returned for an image or digest that this node's
// containerd does not hold.
var ErrNotFound = errors.New("not found in containerd")

// ErrUnavailable is returned while containerd cannot be reached.
var ErrUnavailable = errors.New("containerd unavailable")

// Config says which containerd to read.
type Config struct {
	// Address is containerd's gRPC socket. Default: DefaultAddress.
	Address string
	// Namespace is the containerd namespace whose images are served.
	// Default: DefaultNamespace.
	Namespace string
	// ContentDir is containerd's content directory (the one holding
	// blobs/sha256). Empty means: ask containerd once connected. Blobs are
	// read from this directory when it is readable, and over gRPC otherwise.
	ContentDir string
	// CallTimeout bounds each metadata call to containerd, so a stuck
	// containerd turns into a quick miss. Default: 5s.
	CallTimeout time.Duration
}

// WithDefaults returns c with its empty fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.Address == "" {
		c.Address = DefaultAddress
	}
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = 5 * time.Second
	}
	return c
}

// Image is an image record that containerd holds under a fully qualified
// name.
type Image struct {
	// Name is the record's name, for example docker.io/library/nginx:1.27.
	Name string
	// Ref is Name parsed; it carries a tag, a digest or both.
	Ref reference.Named
	// Target is the descriptor of the manifest or index the name points at.
	Target ocispec.Descriptor
	// UpdatedAt is when the record last changed (a pull that moved the tag
	// updates it).
	UpdatedAt time.Time
}

// Store answers questions about one containerd namespace. Create it with
// New; nothing is dialled until Start.
type Store struct {
	cfg    Config
	logger *zap.Logger

	client     atomic.Pointer[client.Client]
	contentDir atomic.Pointer[contentDir] // path "" while unknown or unreadable
	connected  atomic.Bool

	mu sync.RWMutex
	// TODO: garbage collection deletes content without an event, so entries
	// for collected digests stay until a restart; prune them on re-list.
	mediaTypes map[digest.Digest]string // learnt from image records and parents
	subs       map[*Subscription]struct{}

	cancel context.CancelFunc
	done   chan struct{}
}

// contentDir is containerd's content folder as this store knows it.
type contentDir struct {
	path string
	// confirmed is set once a blob that containerd reported was found as
	// a file of its size under path: the folder is containerd's, so a
	// missing file is a missing blob (see Descriptor). It belongs to this
	// path only: a new folder starts unconfirmed.
	confirmed atomic.Bool
}

// New returns a Store for cfg. It does not contact containerd.
func New(cfg Config, logger *zap.Logger) *Store {
	cfg = cfg.WithDefaults()
	if logger == nil {
		logger = zap.NewNop()
	}
	s := &Store{
		cfg:        cfg,
		logger:     logger,
		mediaTypes: make(map[digest.Digest]string),
		subs:       make(map[*Subscription]struct{}),
	}
	s.contentDir.Store(&contentDir{})
	return s
}

// Config returns the store's configuration with defaults filled in.
func (s *Store) Config() Config { return s.cfg }

// Start creates the containerd client and starts following containerd:
// connecting (with backoff while it is away), learning the content
// directory, listing images and watching events. It returns without waiting
// for containerd, so a node whose containerd is down still answers (with
// misses) until it comes back.
func (s *Store) Start() error {
	c, err := client.New(s.cfg.Address,
		client.WithDefaultNamespace(s.cfg.Namespace),
		client.WithTimeout(2*time.Second))
	if err != nil {
		return fmt.Errorf("creating containerd client for %s: %w", s.cfg.Address, err)
	}
	s.client.Store(c)
	if s.cfg.ContentDir != "" {
		s.useContentDir(s.cfg.ContentDir)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	s.done = make(chan struct{})
	go s.follow(ctx)
	return nil
}

// Close stops following containerd and closes the client. It is safe on a
// Store that was never started.
func (s *Store) Close() error {
	if s.cancel != nil {
		s.cancel()
		<-s.done
	}
	s.mu.Lock()
	for sub := range s.subs {
		sub.close()
	}
	s.subs = map[*Subscription]struct{}{}
	s.mu.Unlock()
	s.connected.Store(false)
	if c := s.client.Swap(nil); c != nil {
		return c.Close()
	}
	return nil
}

// Connected reports whether containerd answered the last time it was asked.
func (s *Store) Connected() bool { return s.connected.Load() }

// ContentDir returns the content directory blobs are read from, or "" when
// they are read over gRPC.
func (s *Store) ContentDir() string { return s.contentDir.Load().path }

// call returns the client and a context for one call to containerd.
func (s *Store) call(ctx context.Context) (*client.Client, context.Context, context.CancelFunc, error) {
	c := s.client.Load()
	if c == nil {
		return nil, nil, nil, ErrUnavailable
	}
	ctx = namespaces.WithNamespace(ctx, s.cfg.Namespace)
	ctx, cancel := context.WithTimeout(ctx, s.cfg.CallTimeout)
	return c, ctx, cancel, nil
}

// wrap turns a containerd error into ErrNotFound or ErrUnavailable where it
// is one of those, keeping the original for the message. It also keeps
// Connected true to its word: an answer (a result, or not found) marks the
// store connected again after a call that timed out while the event stream
// stayed up.
func (s *Store) wrap(what string, err error) error {
	switch {
	case err == nil:
		s.connected.Store(true)
		return nil
	case errdefs.IsNotFound(err):
		s.connected.Store(true)
		return fmt.Errorf("%s: %w", what, ErrNotFound)
	case errdefs.IsUnavailable(err), errors.Is(err, context.DeadlineExceeded):
		s.connected.Store(false)
		return fmt.Errorf("%s: %w: %v", what, ErrUnavailable, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Images lists the image records held under fully qualified names (such as
// docker.io/library/nginx:1.27). Records named only by an image ID, and
// names that are not valid references, are left out.
func (s *Store) Images(ctx context.Context) ([]Image, error) {
	c, ctx, cancel, err := s.call(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	list, err := c.ImageService().List(ctx)
	if err := s.wrap("listing images", err); err != nil {
		return nil, err
	}
	out := make([]Image, 0, len(list))
	for _, img := range list {
		ref, err := reference.ParseNamed(img.Name)
		if err != nil {
			continue
		}
		out = append(out, Image{Name: img.Name, Ref: ref, Target: img.Target})
	}
	return out, nil
}

// isImageName reports whether name is one that Images lists: a fully
// qualified reference, not an image ID such as CRI's sha256:<id> records.
func isImageName(name string) bool {
	_, err := reference.ParseNamed(name)
	return err == nil
}

// Resolve returns the descriptor that the image record ref (for example
// docker.io/library/nginx:1.27) points at, provided its content is here.
func (s *Store) Resolve(ctx context.Context, ref string) (ocispec.Descriptor, error) {
	img, err := s.ResolveImage(ctx, ref)
	return img.Target, err
}

// ResolveImage is Resolve returning the whole image record.
func (s *Store) ResolveImage(ctx context.Context, ref string) (Image, error) {
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return Image{}, err
	}
	defer cancel()
	img, err := c.ImageService().Get(cctx, ref)
	if err := s.wrap("resolving "+ref, err); err != nil {
		return Image{}, err
	}
	info, err := c.ContentStore().Info(cctx, img.Target.Digest)
	if err != nil {
		return Image{}, s.wrap("resolving "+ref+" to "+img.Target.Digest.String(), err)
	}
	s.learn(img.Target.Digest, img.Target.MediaType)
	out := Image{Name: img.Name, Target: img.Target, UpdatedAt: img.UpdatedAt}
	out.Target.Size = info.Size
	out.Ref, _ = reference.ParseNamed(img.Name)
	return out, nil
}

// Descriptor returns the size and media type of dgst. The media type comes
// from an image record or a parent that names the digest, or else from the
// content itself (see DetectMediaType).
func (s *Store) Descriptor(ctx context.Context, dgst digest.Digest) (ocispec.Descriptor, error) {
	if err := dgst.Validate(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("invalid digest %q: %w", dgst, err)
	}
	// no blob file, no blob, in any namespace: a miss is answered without
	// a round trip to containerd once the folder proved to be its own
	if cd := s.contentDir.Load(); cd.confirmed.Load() {
		path := cd.blobPath(dgst)
		if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
			// and the folder is still there (an unmounted one is not)
			if _, err := os.Stat(filepath.Dir(path)); err == nil {
				return ocispec.Descriptor{}, fmt.Errorf("looking up %s: %w", dgst, ErrNotFound)
			}
		}
	}
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer cancel()
	info, err := c.ContentStore().Info(cctx, dgst)
	if err := s.wrap("looking up "+dgst.String(), err); err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{Digest: dgst, Size: info.Size}
	s.mu.RLock()
	desc.MediaType = s.mediaTypes[dgst]
	s.mu.RUnlock()
	if desc.MediaType != "" {
		return desc, nil
	}

	// nothing names it: read small content and look
	desc.MediaType = MediaTypeOctetStream
	if info.Size <= maxSniffSize {
		b, err := content.ReadBlob(cctx, c.ContentStore(), desc)
		if err != nil {
			return ocispec.Descriptor{}, s.wrap("reading "+dgst.String(), err)
		}
		desc.MediaType = DetectMediaType(b)
	}
	desc.MediaType = s.learnDetected(dgst, desc.MediaType)
	return desc, nil
}

// ReadBlob returns the whole of a small blob, such as a manifest. It
// refuses content over limit bytes.
func (s *Store) ReadBlob(ctx context.Context, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	if desc.Size > limit {
		return nil, fmt.Errorf("reading %s: %d bytes is over the limit of %d", desc.Digest, desc.Size, limit)
	}
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	b, err := content.ReadBlob(cctx, c.ContentStore(), desc)
	if err := s.wrap("reading "+desc.Digest.String(), err); err != nil {
		return nil, err
	}
	if digest.FromBytes(b) != desc.Digest {
		return nil, fmt.Errorf("reading %s: content does not match its digest", desc.Digest)
	}
	return b, nil
}

// Open returns the content of dgst for reading at any offset. It reads the
// blob file from the content directory when that is readable (so it can be
// sent with sendfile) and over containerd's gRPC API otherwise. The content
// must exist in the store's namespace either way.
func (s *Store) Open(ctx context.Context, dgst digest.Digest) (*Content, error) {
	desc, err := s.Descriptor(ctx, dgst)
	if err != nil {
		return nil, err
	}
	return s.OpenDescriptor(ctx, desc)
}

// OpenDescriptor is Open for a descriptor that Descriptor returned, which
// saves asking containerd about the digest a second time.
func (s *Store) OpenDescriptor(ctx context.Context, desc ocispec.Descriptor) (*Content, error) {
	dgst := desc.Digest
	if err := dgst.Validate(); err != nil {
		return nil, fmt.Errorf("invalid digest %q: %w", dgst, err)
	}

	// fast path: the blob file itself; dgst was validated, so the path
	// holds nothing but the algorithm and hex
	if cd := s.contentDir.Load(); cd.path != "" {
		f, err := os.Open(cd.blobPath(dgst))
		if err == nil {
			st, err := f.Stat()
			if err == nil && st.Mode().IsRegular() && st.Size() == desc.Size {
				cd.confirmed.Store(true)
				return &Content{Descriptor: desc, file: f}, nil
			}
			f.Close()
		}
		s.logger.Debug("blob file not usable, reading over gRPC",
			zap.String("digest", dgst.String()), zap.Error(err))
	}

	c := s.client.Load()
	if c == nil {
		return nil, ErrUnavailable
	}
	ra, err := c.ContentStore().ReaderAt(namespaces.WithNamespace(ctx, s.cfg.Namespace), desc)
	if err != nil {
		return nil, s.wrap("opening "+dgst.String(), err)
	}
	return &Content{Descriptor: desc, ra: ra}, nil
}

// blobPath is where dgst's file is under the folder, or "" while the
// folder is unknown. dgst must be valid: the path holds nothing but its
// algorithm and hex.
func (cd *contentDir) blobPath(dgst digest.Digest) string {
	if cd.path == "" {
		return ""
	}
	return filepath.Join(cd.path, "blobs", dgst.Algorithm().String(), dgst.Encoded())
}

// confirmDir checks the content folder against a blob that containerd
// reported with size bytes (see contentDir.confirmed).
func (s *Store) confirmDir(dgst digest.Digest, size int64) {
	cd := s.contentDir.Load()
	if cd.path == "" || cd.confirmed.Load() {
		return
	}
	if st, err := os.Stat(cd.blobPath(dgst)); err == nil && st.Mode().IsRegular() && st.Size() == size {
		cd.confirmed.Store(true)
	}
}

// Digests walks the image tree under root and returns the descriptors of
// every part of it that is present: indexes, manifests, configs and layers.
// Children that containerd never fetched (other platforms, layers of an
// image that was never unpacked here) are left out, not errors. It also
// records the media type of every descriptor it sees.
func (s *Store) Digests(ctx context.Context, root ocispec.Descriptor) ([]ocispec.Descriptor, error) {
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	cs := c.ContentStore()

	var out []ocispec.Descriptor
	seen := map[digest.Digest]bool{}
	queue := []ocispec.Descriptor{root}
	for len(queue) > 0 {
		desc := queue[0]
		queue = queue[1:]
		if seen[desc.Digest] {
			continue
		}
		seen[desc.Digest] = true
		info, err := cs.Info(cctx, desc.Digest)
		if errdefs.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, s.wrap("walking "+root.Digest.String(), err)
		}
		desc.Size = info.Size
		if desc.MediaType == "" {
			desc.MediaType = MediaTypeOctetStream
		}
		s.confirmDir(desc.Digest, info.Size)
		s.learn(desc.Digest, desc.MediaType)
		out = append(out, desc)
		if !IsManifest(desc.MediaType) {
			continue
		}
		children, err := images.Children(cctx, cs, desc)
		if errdefs.IsNotFound(err) {
			continue
		}
		if err != nil {
			// an unreadable or foreign manifest still serves as itself
			s.logger.Debug("reading children", zap.String("digest", desc.Digest.String()), zap.Error(err))
			continue
		}
		queue = append(queue, children...)
	}
	return out, nil
}

// learn records mediaType for dgst; types named by image records and
// parents replace ones detected from content.
func (s *Store) learn(dgst digest.Digest, mediaType string) {
	if mediaType == "" {
		return
	}
	s.mu.RLock()
	known := s.mediaTypes[dgst]
	s.mu.RUnlock()
	if known == mediaType {
		return
	}
	s.mu.Lock()
	s.mediaTypes[dgst] = mediaType
	s.mu.Unlock()
}

// learnDetected records mediaType, detected from the content of dgst,
// unless an image record or a parent named a type for dgst meanwhile (a walk
// running alongside); it returns the type that stands.
func (s *Store) learnDetected(dgst digest.Digest, mediaType string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if known := s.mediaTypes[dgst]; known != "" {
		return known
	}
	s.mediaTypes[dgst] = mediaType
	return mediaType
}

// forget drops what is known of a digest that containerd deleted.
func (s *Store) forget(dgst digest.Digest) {
	s.mu.Lock()
	delete(s.mediaTypes, dgst)
	s.mu.Unlock()
}

// useContentDir switches blob reads to files under dir if dir is readable.
// The folder itself is enough: a containerd that has stored nothing yet
// has no blobs folder in it, and Open reads a blob whose file it cannot
// use over gRPC anyway.
func (s *Store) useContentDir(dir string) {
	fi, err := os.Stat(dir)
	if err == nil && !fi.IsDir() {
		err = errors.New("not a directory")
	}
	if err != nil {
		s.logger.Warn("containerd content directory not readable; serving blobs over gRPC, which is slower",
			zap.String("content_dir", dir), zap.Error(err))
		s.contentDir.Store(&contentDir{})
		return
	}
	if s.ContentDir() != dir {
		s.logger.Info("reading blobs from containerd's content directory", zap.String("content_dir", dir))
		s.contentDir.Store(&contentDir{path: dir})
	}
}
