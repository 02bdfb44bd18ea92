package caddymodule

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"go.uber.org/zap"

	"github.com/peermirror/peermirror/contentstore"
)

// advertiseTarget is where the keys a node can serve are announced: the
// DHT router.
type advertiseTarget interface {
	Advertise(keys ...string)
	Withdraw(keys ...string)
}

// advertiser keeps what the DHT advertises in step with what containerd
// holds: every present digest of every image tree, and every image
// reference whose root digest is servable here.
type advertiser struct {
	store  *contentstore.Store
	target advertiseTarget
	logger *zap.Logger
	// keep reports whether an image's keys may be advertised (registry and
	// reference filters).
	keep func(img contentstore.Image) bool
	// relist is how often everything is listed again: garbage collection
	// deletes content without an event.
	relist time.Duration

	// walks caches the present digests under each root digest walked,
	// so many names for one image (a tag storm, CRI's extra records) cost
	// one walk; any content event or full re-list empties it
	walks  map[digest.Digest][]string
	images map[string][]string // image name -> its keys
	// refs is written by the advertiser's goroutine only, under mu, and
	// read by has from request goroutines
	mu   sync.RWMutex
	refs map[string]int // key -> number of images that hold it
	// advertised is len(refs), readable from other goroutines
	advertised atomic.Int64
	tags       int // keys in refs that are image references
}

func newAdvertiser(store *contentstore.Store, target advertiseTarget, keep func(contentstore.Image) bool,
	relist time.Duration, logger *zap.Logger) *advertiser {
	return &advertiser{store: store, target: target, keep: keep, relist: relist, logger: logger,
		images: map[string][]string{}, refs: map[string]int{}, walks: map[digest.Digest][]string{}}
}

// run follows the store's events until ctx ends.
func (a *advertiser) run(ctx context.Context) {
	sub := a.store.Subscribe()
	defer sub.Close()
	events := make(chan contentstore.Event)
	go func() {
		defer close(events)
		for {
			ev, err := sub.Next(ctx)
			if err != nil {
				return
			}
			select {
			case events <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	tick := time.NewTicker(a.relist)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			a.full(ctx)
		case ev, ok := <-events:
			if !ok {
				return
			}
			a.handle(ctx, ev)
		}
	}
}

func (a *advertiser) handle(ctx context.Context, ev contentstore.Event) {
	if ev.Kind == contentstore.ContentCreated || ev.Kind == contentstore.ContentDeleted {
		clear(a.walks)
	}
	switch ev.Kind {
	case contentstore.Resync:
		a.full(ctx)
	case contentstore.ImageCreated, contentstore.ImageUpdated:
		img, err := a.store.ResolveImage(ctx, ev.Image)
		if err != nil {
			a.set(ev.Image, nil)
			return
		}
		a.set(ev.Image, a.keysOf(ctx, img))
	case contentstore.ImageDeleted:
		a.set(ev.Image, nil)
	case contentstore.ContentDeleted:
		key := ev.Digest.String()
		if a.refs[key] == 0 {
			return
		}
		for name, keys := range a.images {
			for _, k := range keys {
				if k == key {
					a.refreshImage(ctx, name)
					break
				}
			}
		}
	}
}

// refreshImage recomputes one image's keys.
func (a *advertiser) refreshImage(ctx context.Context, name string) {
	img, err := a.store.ResolveImage(ctx, name)
	if err != nil {
		a.set(name, nil)
		return
	}
	a.set(name, a.keysOf(ctx, img))
}

// keysOf returns what img lets this node serve: its present digests, and
// its reference when the root is among them.
func (a *advertiser) keysOf(ctx context.Context, img contentstore.Image) []string {
	if !a.keep(img) {
		return nil
	}
	present, ok := a.walks[img.Target.Digest]
	if !ok {
		descs, err := a.store.Digests(ctx, img.Target)
		if err != nil {
			a.logger.Debug("walking image", zap.String("image", img.Name), zap.Error(err))
			return nil
		}
		present = make([]string, 0, len(descs))
		for _, d := range descs {
			present = append(present, d.Digest.String())
		}
		a.walks[img.Target.Digest] = present
	}
	keys := make([]string, 0, len(present)+1)
	keys = append(keys, present...)
	rootHere := len(present) > 0 && present[0] == img.Target.Digest.String()
	if _, tagged := img.Ref.(reference.Tagged); tagged && rootHere {
		keys = append(keys, img.Name)
	}
	return keys
}

// full lists every image again and replaces what is advertised.
func (a *advertiser) full(ctx context.Context) {
	clear(a.walks)
	imgs, err := a.store.Images(ctx)
	if err != nil {
		a.logger.Debug("listing images to advertise", zap.Error(err))
		return
	}
	seen := make(map[string]bool, len(imgs))
	for _, img := range imgs {
		seen[img.Name] = true
		a.set(img.Name, a.keysOf(ctx, img))
	}
	for name := range a.images {
		if !seen[name] {
			a.set(name, nil)
		}
	}
	// the router may hold keys from an advertiser of an earlier config
	if l, ok := a.target.(interface{ Advertised() []string }); ok {
		var stale []string
		for _, k := range l.Advertised() {
			if a.refs[k] == 0 {
				stale = append(stale, k)
			}
		}
		if len(stale) > 0 {
			a.target.Withdraw(stale...)
		}
	}
	a.logger.Debug("advertised state refreshed", zap.Int("images", len(a.images)), zap.Int("keys", len(a.refs)))
}

// set makes keys the image's keys, advertising those that are new to the
// node and withdrawing those no image holds any more.
func (a *advertiser) set(name string, keys []string) {
	old := a.images[name]
	var add, drop []string
	a.mu.Lock()
	for _, k := range keys {
		if a.refs[k] == 0 {
			add = append(add, k)
			a.tags += isTagKey(k)
		}
		a.refs[k]++
	}
	for _, k := range old {
		a.refs[k]--
		if a.refs[k] == 0 {
			delete(a.refs, k)
			drop = append(drop, k)
			a.tags -= isTagKey(k)
		}
	}
	a.mu.Unlock()
	a.advertised.Store(int64(len(a.refs)))
	metrics.advertised.WithLabelValues("tag").Set(float64(a.tags))
	metrics.advertised.WithLabelValues("digest").Set(float64(len(a.refs) - a.tags))
	if len(keys) == 0 {
		delete(a.images, name)
	} else {
		a.images[name] = keys
	}
	if len(add) > 0 {
		a.target.Advertise(add...)
	}
	if len(drop) > 0 {
		a.target.Withdraw(drop...)
	}
}

// isTagKey is 1 for an image reference key and 0 for a digest.
func isTagKey(k string) int {
	if _, err := digest.Parse(k); err == nil {
		return 0
	}
	return 1
}

// has reports whether key is advertised.
func (a *advertiser) has(key string) bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.refs[key] > 0
}

// count returns how many keys are advertised.
func (a *advertiser) count() int { return int(a.advertised.Load()) }
