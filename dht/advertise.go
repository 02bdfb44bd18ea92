package dht

import (
	"context"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
)

const (
	// provideConcurrency bounds the provide operations in flight: each is a
	// DHT lookup plus one message to each of the closest peers.
	provideConcurrency = 8
	// provideTimeout bounds one provide operation.
	provideTimeout = time.Minute
	// provideRetryMin and provideRetryMax bound the wait before keys whose
	// provide failed are tried again.
	provideRetryMin = 500 * time.Millisecond
	provideRetryMax = 30 * time.Second
	// noPeerPoll is how often the provide loop checks for a first peer
	// while it has keys waiting.
	noPeerPoll = 200 * time.Millisecond
)

// advertiser holds the advertised keys and the queue of keys to provide.
type advertiser struct {
	mu      sync.Mutex
	keys    map[string]struct{} // advertised
	fresh   []string            // newly advertised, provided before the queue
	queue   []string            // to provide, in order; may hold keys no longer advertised
	queued  map[string]struct{}
	retry   map[string]struct{} // failed, waiting for the retry timer
	wake    chan struct{}       // signaled when the queue grows
	retryIn time.Duration       // current retry backoff
}

func newAdvertiser() *advertiser {
	return &advertiser{
		keys:    make(map[string]struct{}),
		queued:  make(map[string]struct{}),
		retry:   make(map[string]struct{}),
		wake:    make(chan struct{}, 1),
		retryIn: provideRetryMin,
	}
}

// enqueueLocked queues key for providing unless it is queued already. A
// fresh key goes ahead of a reprovide round, so content pulled a moment
// ago is findable at once even while thousands of keys are reprovided.
func (a *advertiser) enqueueLocked(key string, fresh bool) bool {
	if _, ok := a.queued[key]; ok {
		return false
	}
	a.queued[key] = struct{}{}
	if fresh {
		a.fresh = append(a.fresh, key)
	} else {
		a.queue = append(a.queue, key)
	}
	return true
}

func (a *advertiser) signal() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

// pop returns the next queued key that is still advertised.
func (a *advertiser) pop() (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, q := range []*[]string{&a.fresh, &a.queue} {
		for len(*q) > 0 {
			key := (*q)[0]
			(*q)[0] = ""
			*q = (*q)[1:]
			delete(a.queued, key)
			if _, ok := a.keys[key]; ok {
				return key, true
			}
		}
		*q = nil // let the backing array go
	}
	return "", false
}

func (a *advertiser) pending() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.fresh) + len(a.queue)
}

// Advertise adds keys to the advertised set and queues them to be provided
// soon; they are then provided again every ReprovideInterval until
// withdrawn. Providing happens in the background, a few keys at a time, and
// waits until the routing table has a peer. Keys already advertised are
// only queued again if they are not waiting already. Advertise may be
// called before Start.
func (r *Router) Advertise(keys ...string) {
	a := r.adv
	a.mu.Lock()
	added := 0
	for _, key := range keys {
		if _, ok := a.keys[key]; ok {
			continue
		}
		a.keys[key] = struct{}{}
		a.enqueueLocked(key, true)
		added++
	}
	a.mu.Unlock()
	if added > 0 {
		a.signal()
		r.logger.Debug("advertising keys", zap.Int("added", added), zap.Int("requested", len(keys)))
	}
}

// Withdraw removes keys from the advertised set. They are no longer
// provided, so peers stop finding this node for them once the records
// already stored expire (RecordTTL after the last provide; a provide in
// flight when Withdraw is called still completes).
func (r *Router) Withdraw(keys ...string) {
	a := r.adv
	a.mu.Lock()
	removed := 0
	for _, key := range keys {
		if _, ok := a.keys[key]; ok {
			delete(a.keys, key)
			delete(a.retry, key)
			removed++
		}
	}
	a.mu.Unlock()
	if removed > 0 {
		r.logger.Debug("withdrawing keys", zap.Int("removed", removed))
	}
}

// Advertised returns the advertised keys, sorted.
func (r *Router) Advertised() []string {
	a := r.adv
	a.mu.Lock()
	out := make([]string, 0, len(a.keys))
	for key := range a.keys {
		out = append(out, key)
	}
	a.mu.Unlock()
	slices.Sort(out)
	return out
}

// requeueAll queues every advertised key: a reprovide round.
func (r *Router) requeueAll() int {
	a := r.adv
	a.mu.Lock()
	n := 0
	for key := range a.keys {
		if a.enqueueLocked(key, false) {
			n++
		}
	}
	a.mu.Unlock()
	if n > 0 {
		a.signal()
	}
	return n
}

// provideLoop provides queued keys, at most provideConcurrency at a time,
// once the routing table has a peer; it queues all advertised keys every
// ReprovideInterval and retries failed keys with backoff.
//
// TODO: every key costs its own lookup. With many thousand keys per node
// a sweep that groups keys by keyspace region (as kad-dht's provider
// package does) would send far fewer messages.
func (r *Router) provideLoop(ctx context.Context) {
	a := r.adv
	interval := r.conf().ReprovideInterval
	reprovide := time.NewTicker(interval)
	defer reprovide.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	retryArmed := false
	failed := make(chan struct{}, 1)
	sem := make(chan struct{}, provideConcurrency)
	var inflight sync.WaitGroup
	defer inflight.Wait()

	for {
		// wait until there is a key and a peer to give it to
		key, ok := "", false
		if r.kad.RoutingTable().Size() > 0 {
			key, ok = a.pop()
		}
		if !ok {
			var poll <-chan time.Time
			if r.kad.RoutingTable().Size() == 0 && a.pending() > 0 {
				poll = time.After(noPeerPoll)
			}
			select {
			case <-ctx.Done():
				return
			case <-a.wake:
			case <-poll:
			case <-reprovide.C:
				if n := r.requeueAll(); n > 0 {
					r.logger.Debug("reproviding", zap.Int("keys", n))
				}
				// Reconfigure may have changed the interval
				if now := r.conf().ReprovideInterval; now != interval {
					interval = now
					reprovide.Reset(interval)
				}
			case <-failed:
				if !retryArmed {
					retryArmed = true
					a.mu.Lock()
					retry.Reset(a.retryIn)
					a.retryIn = min(2*a.retryIn, provideRetryMax)
					a.mu.Unlock()
				}
			case <-retry.C:
				retryArmed = false
				a.mu.Lock()
				for key := range a.retry {
					a.enqueueLocked(key, false)
				}
				clear(a.retry)
				a.mu.Unlock()
			}
			continue
		}

		// provide it, bounded
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer func() { <-sem }()
			ok := r.provide(ctx, key)

			a.mu.Lock()
			if ok {
				a.retryIn = provideRetryMin
				a.mu.Unlock()
				return
			}
			if _, advertised := a.keys[key]; advertised {
				a.retry[key] = struct{}{}
			}
			a.mu.Unlock()
			select {
			case failed <- struct{}{}:
			default:
			}
		}()
	}
}

// provide announces this node as a provider of key to the closest peers.
func (r *Router) provide(ctx context.Context, key string) bool {
	ctx, cancel := context.WithTimeout(ctx, provideTimeout)
	defer cancel()
	start := time.Now()
	err := r.kad.Provide(ctx, KeyCID(key), true)
	if err != nil {
		if ctx.Err() == nil || time.Since(start) >= provideTimeout {
			r.logger.Debug("providing key failed", zap.String("key", key), zap.Error(err))
		}
		return false
	}
	if ce := r.logger.Check(zap.DebugLevel, "provided key"); ce != nil {
		ce.Write(zap.String("key", key), zap.Duration("took", time.Since(start)))
	}
	return true
}
