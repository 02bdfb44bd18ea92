package contentstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/go-digest"
	"go.uber.org/zap"
)

// EventKind says what changed in containerd.
type EventKind int

// The changes a Store reports.
const (
	// ImageCreated: an image record was created (Event.Image names it).
	ImageCreated EventKind = iota + 1
	// ImageUpdated: an image record now points at other content.
	ImageUpdated
	// ImageDeleted: an image record was deleted.
	ImageDeleted
	// ContentCreated: a blob was committed (Event.Digest names it).
	ContentCreated
	// ContentDeleted: a blob was deleted explicitly. Garbage collection
	// deletes content without an event, so a subscriber that must not
	// advertise collected content re-lists now and then.
	ContentDeleted
	// Resync: the subscriber may have missed changes (containerd came back
	// after an outage, or the subscriber fell behind) and should list
	// everything again.
	Resync
)

// String names the kind for logs.
func (k EventKind) String() string {
	switch k {
	case ImageCreated:
		return "image_created"
	case ImageUpdated:
		return "image_updated"
	case ImageDeleted:
		return "image_deleted"
	case ContentCreated:
		return "content_created"
	case ContentDeleted:
		return "content_deleted"
	case Resync:
		return "resync"
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event is one change in containerd's namespace.
type Event struct {
	Kind   EventKind
	Image  string        // for image events
	Digest digest.Digest // for content events
}

// maxQueued bounds the events queued for one subscriber; past it the queue
// collapses into a single Resync, so a slow subscriber costs a re-list,
// never unbounded memory.
const maxQueued = 4096

// Subscription delivers a Store's events in order. Every subscription
// starts with a Resync, so the subscriber lists once before following.
type Subscription struct {
	store  *Store
	mu     sync.Mutex
	queue  []Event
	notify chan struct{}
	done   chan struct{}
	closed bool
}

// Subscribe returns a subscription to the store's events. Close it when
// done.
func (s *Store) Subscribe() *Subscription {
	sub := &Subscription{
		store:  s,
		queue:  []Event{{Kind: Resync}},
		notify: make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	sub.notify <- struct{}{}
	s.mu.Lock()
	s.subs[sub] = struct{}{}
	s.mu.Unlock()
	return sub
}

// Next waits for the next event. It returns an error once ctx ends or the
// subscription or the store is closed.
func (sub *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		sub.mu.Lock()
		if len(sub.queue) > 0 {
			ev := sub.queue[0]
			sub.queue = sub.queue[1:]
			sub.mu.Unlock()
			return ev, nil
		}
		closed := sub.closed
		sub.mu.Unlock()
		if closed {
			return Event{}, errors.New("subscription closed")
		}
		select {
		case <-ctx.Done():
			return Event{}, ctx.Err()
		case <-sub.notify:
		case <-sub.done:
		}
	}
}

// Close ends the subscription.
func (sub *Subscription) Close() {
	sub.store.mu.Lock()
	delete(sub.store.subs, sub)
	sub.store.mu.Unlock()
	sub.close()
}

func (sub *Subscription) close() {
	sub.mu.Lock()
	defer sub.mu.Unlock()
	if !sub.closed {
		sub.closed = true
		close(sub.done)
	}
}

func (sub *Subscription) push(ev Event) {
	sub.mu.Lock()
	if len(sub.queue) >= maxQueued {
		sub.queue = append(sub.queue[:0], Event{Kind: Resync})
	} else {
		sub.queue = append(sub.queue, ev)
	}
	sub.mu.Unlock()
	select {
	case sub.notify <- struct{}{}:
	default:
	}
}

func (s *Store) publish(ev Event) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for sub := range s.subs {
		sub.push(ev)
	}
}

// Backoff bounds for reconnecting to containerd.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// follow keeps the store in step with containerd until ctx ends: it waits
// for containerd, learns the content directory, subscribes to events,
// re-lists, and starts over with backoff whenever the event stream breaks.
func (s *Store) follow(ctx context.Context) {
	defer close(s.done)
	backoff := minBackoff
	wasConnected := false
	for ctx.Err() == nil {
		err := s.session(ctx, func() {
			backoff = minBackoff
			wasConnected = true
		})
		if ctx.Err() != nil {
			return
		}
		s.connected.Store(false)
		if wasConnected {
			s.logger.Warn("lost containerd; serving misses until it is back",
				zap.String("address", s.cfg.Address), zap.Error(err))
			wasConnected = false
		} else {
			s.logger.Debug("containerd not reachable yet",
				zap.String("address", s.cfg.Address), zap.Error(err), zap.Duration("retry_in", backoff))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

// session is one connected stretch: it returns when the event stream ends.
func (s *Store) session(ctx context.Context, onConnect func()) error {
	c := s.client.Load()
	if c == nil {
		return ErrUnavailable
	}
	vctx, cancel := context.WithTimeout(ctx, s.cfg.CallTimeout)
	v, err := c.Version(vctx)
	cancel()
	if err != nil {
		return fmt.Errorf("asking containerd's version: %w", err)
	}

	// subscribe before listing, so nothing between the two is missed
	sctx, cancelSub := context.WithCancel(ctx)
	defer cancelSub()
	filters := []string{
		fmt.Sprintf(`namespace==%q,topic~="^/images/"`, s.cfg.Namespace),
		fmt.Sprintf(`namespace==%q,topic~="^/content/"`, s.cfg.Namespace),
	}
	envelopes, errs := c.Subscribe(sctx, filters...)

	if s.cfg.ContentDir == "" {
		s.discoverContentDir(ctx)
	}
	s.connected.Store(true)
	onConnect()
	s.logger.Info("connected to containerd",
		zap.String("address", s.cfg.Address),
		zap.String("namespace", s.cfg.Namespace),
		zap.String("version", v.Version),
		zap.String("content_dir", s.ContentDir()))
	s.learnAll(ctx)
	s.publish(Event{Kind: Resync})

	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return fmt.Errorf("following containerd events: %w", err)
		case env, ok := <-envelopes:
			if !ok {
				return errors.New("event stream closed")
			}
			if env.Event == nil {
				continue
			}
			ev, err := typeurl.UnmarshalAny(env.Event)
			if err != nil {
				s.logger.Debug("undecodable containerd event", zap.String("topic", env.Topic), zap.Error(err))
				continue
			}
			s.handle(ctx, ev)
		}
	}
}

// handle turns one containerd event into a store event. Image events for
// records that Images leaves out (CRI's sha256:<id> records, names that are
// not valid references) are dropped, so a subscriber that lists on Resync
// and follows events sees one set of names.
func (s *Store) handle(ctx context.Context, ev any) {
	var out Event
	switch e := ev.(type) {
	case *eventstypes.ImageCreate:
		if !isImageName(e.Name) {
			return
		}
		out = Event{Kind: ImageCreated, Image: e.Name}
		s.learnImage(ctx, e.Name, false)
	case *eventstypes.ImageUpdate:
		if !isImageName(e.Name) {
			return
		}
		out = Event{Kind: ImageUpdated, Image: e.Name}
		s.learnImage(ctx, e.Name, true)
	case *eventstypes.ImageDelete:
		if !isImageName(e.Name) {
			return
		}
		out = Event{Kind: ImageDeleted, Image: e.Name}
	case *eventstypes.ContentCreate:
		out = Event{Kind: ContentCreated, Digest: digest.Digest(e.Digest)}
	case *eventstypes.ContentDelete:
		out = Event{Kind: ContentDeleted, Digest: digest.Digest(e.Digest)}
		s.forget(out.Digest)
	default:
		return
	}
	if ce := s.logger.Check(zap.DebugLevel, "containerd event"); ce != nil {
		ce.Write(zap.Stringer("kind", out.Kind), zap.String("image", out.Image),
			zap.String("digest", out.Digest.String()))
	}
	s.publish(out)
}

// learnAll walks every image tree once, so media types are known before
// the first request asks.
func (s *Store) learnAll(ctx context.Context) {
	imgs, err := s.Images(ctx)
	if err != nil {
		s.logger.Warn("listing containerd images", zap.Error(err))
		return
	}
	for _, img := range imgs {
		if _, err := s.Digests(ctx, img.Target); err != nil {
			s.logger.Debug("walking image", zap.String("image", img.Name), zap.Error(err))
		}
	}
}

// learnImage walks a new or updated image's tree to learn its media types.
// A new name for a root already walked (another tag, CRI's ID record)
// skips the walk, unless always is set.
func (s *Store) learnImage(ctx context.Context, name string, always bool) {
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return
	}
	defer cancel()
	img, err := c.ImageService().Get(cctx, name)
	if err != nil {
		return
	}
	s.mu.RLock()
	known := s.mediaTypes[img.Target.Digest] == img.Target.MediaType
	s.mu.RUnlock()
	if known && !always {
		return
	}
	if _, err := s.Digests(ctx, img.Target); err != nil {
		s.logger.Debug("walking image", zap.String("image", name), zap.Error(err))
	}
}

// discoverContentDir asks containerd's introspection API where its content
// plugin keeps blobs.
func (s *Store) discoverContentDir(ctx context.Context) {
	c, cctx, cancel, err := s.call(ctx)
	if err != nil {
		return
	}
	defer cancel()
	resp, err := c.IntrospectionService().Plugins(cctx, `type=="io.containerd.content.v1"`)
	if err != nil {
		s.logger.Warn("asking containerd for its content directory; serving blobs over gRPC", zap.Error(err))
		return
	}
	for _, p := range resp.Plugins {
		if root := p.Exports["root"]; p.ID == "content" && root != "" {
			s.useContentDir(root)
			return
		}
	}
	s.logger.Warn("containerd did not name its content directory; serving blobs over gRPC")
}
