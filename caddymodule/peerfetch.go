package caddymodule

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Headers between nodes. The forwarded marker carries the peer protocol
// version; a node serves a marked request from its own store only and never
// forwards it again, so requests cannot loop or fan out.
const (
	headerForwarded = "X-Peermirror-Forwarded"
	headerSource    = "X-Peermirror-Source"
)

// peerProtocolVersion versions what one node asks of another over HTTP.
// A receiving node treats any value as forwarded. It is a variable only so
// that tests can build a node speaking a newer version, with
// -ldflags "-X github.com/peermirror/peermirror/caddymodule.peerProtocolVersion=2";
// nothing changes it at run time.
var peerProtocolVersion = "1"

// errNoPeer means no peer offered the content in time: a miss.
var errNoPeer = errors.New("no peer has it")

// peerCandidate is a peer that advertised a key, with its mirror address.
type peerCandidate struct {
	id  string
	url string // base URL of its mirror, such as http://10.0.0.3:30020
}

// peerResolver finds the peers that advertise a key; the DHT router
// implements it. The channel yields peers as they are found and closes when
// the lookup ends or ctx does.
type peerResolver interface {
	resolve(ctx context.Context, key string, max int) <-chan peerCandidate
}

// peerFetcher gets content from other nodes' mirrors.
type peerFetcher struct {
	resolver peerResolver
	client   *http.Client
	logger   *zap.Logger

	resolveTimeout time.Duration // until the first peer is found
	hedgeDelay     time.Duration // until another peer is asked as well
	stallTimeout   time.Duration // a body that sends nothing this long is resumed elsewhere
	maxPeers       int           // peers tried for one request
	maxResumes     int           // resumes of one body

	bad    *peerSet     // peers that sent bytes not matching the digest
	recent *recentPeers // peers lookups found lately, by key

	// auth is the Authorization header sent to other nodes, or ""
	auth string

	// coldClient asks a node for its download in progress: it waits
	// longer for the answer, while that node's containerd starts it
	coldClient *http.Client
}

// peerSet is a set of peer IDs, safe for concurrent use.
type peerSet struct {
	mu  sync.RWMutex
	ids map[string]time.Time // when each was found out
	// TODO: an excluded peer stays excluded until a reload; a peer that
	// lied once because of a disk fault and was repaired is lost to this node.
}

func newPeerSet() *peerSet { return &peerSet{ids: map[string]time.Time{}} }

func (s *peerSet) add(id string) {
	s.mu.Lock()
	s.ids[id] = time.Now()
	s.mu.Unlock()
}

func (s *peerSet) has(id string) bool {
	s.mu.RLock()
	_, ok := s.ids[id]
	s.mu.RUnlock()
	return ok
}

// recentPeersTTL is how long the peers found for a key are offered to
// later requests for it without waiting on the DHT.
const recentPeersTTL = 10 * time.Second

// hintTTL is how long a manifest fetched from a peer points at that peer
// for the manifest's config and layers: long enough for containerd to get
// to the last layer of a large image.
const hintTTL = 2 * time.Minute

// maxRecentKeys bounds the keys whose peers are remembered.
const maxRecentKeys = 4096

// recentPeers remembers the peers that lookups found for each key for a
// short while, and runs one DHT lookup per key for all the requests that
// want it at once. A burst of requests for one digest (parallel ranges of
// a layer, many clients at once) would otherwise start one lookup each,
// and under load a lookup can take longer than the resolve timeout, which
// turns a hit into a miss. It also holds hints: the peer that served a
// manifest most likely holds its config and layers, so it is offered for
// them at once while their own lookups run.
type recentPeers struct {
	mu   sync.Mutex
	keys map[string]*recentEntry
}

type recentEntry struct {
	peers   []peerCandidate
	until   time.Time     // when the entry expires
	changed chan struct{} // closed when a peer is found
	lookup  *sharedLookup // the lookup running for the key, or nil
}

// sharedLookup is one DHT lookup for a key, shared by the requests that
// joined it. It runs until it ends by itself, the last of them leaves, or
// sharedLookupTimeout.
type sharedLookup struct {
	done   chan struct{} // closed when it ended, after its last peer
	cancel context.CancelFunc
	// guarded by recentPeers.mu
	refs    int             // requests that joined and did not leave
	peers   []peerCandidate // found so far
	changed chan struct{}   // closed when a peer is found
}

// sharedLookupTimeout bounds a shared lookup that requests keep joining.
const sharedLookupTimeout = 30 * time.Second

func newRecentPeers() *recentPeers { return &recentPeers{keys: map[string]*recentEntry{}} }

// entryLocked returns key's entry, made afresh if it is missing or
// expired, or nil when the map is full of live entries.
func (r *recentPeers) entryLocked(key string, now time.Time) *recentEntry {
	e, ok := r.keys[key]
	if ok && now.Before(e.until) {
		return e
	}
	if !ok && len(r.keys) >= maxRecentKeys {
		for k, old := range r.keys {
			if !now.Before(old.until) {
				delete(r.keys, k)
			}
		}
		if len(r.keys) >= maxRecentKeys {
			return nil
		}
	}
	if ok {
		close(e.changed) // wake those watching the old entry
	}
	e = &recentEntry{until: now.Add(recentPeersTTL), changed: make(chan struct{})}
	r.keys[key] = e
	return e
}

// watch returns the peers found for key within recentPeersTTL and a
// channel that is closed when another is found.
func (r *recentPeers) watch(key string) ([]peerCandidate, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.entryLocked(key, time.Now())
	if e == nil {
		return nil, nil
	}
	return slices.Clone(e.peers), e.changed
}

// add records that a lookup found p for key.
func (r *recentPeers) add(key string, p peerCandidate) { r.offer(key, p, recentPeersTTL) }

// hint records that p most likely holds key, for hintTTL.
func (r *recentPeers) hint(key string, p peerCandidate) { r.offer(key, p, hintTTL) }

// offer records p for key for at least ttl.
func (r *recentPeers) offer(key string, p peerCandidate, ttl time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	e := r.entryLocked(key, now)
	if e == nil {
		return
	}
	if until := now.Add(ttl); until.After(e.until) {
		e.until = until
	}
	if i := slices.IndexFunc(e.peers, func(q peerCandidate) bool { return q.id == p.id }); i >= 0 {
		e.peers[i] = p
		return
	}
	e.peers = append(e.peers, p)
	close(e.changed)
	e.changed = make(chan struct{})
}

// join returns the lookup running for key, joined, or starts one with
// start and joins it. Each join must be followed by one leave.
func (r *recentPeers) join(key string, start func(context.Context) <-chan peerCandidate) *sharedLookup {
	r.mu.Lock()
	e := r.entryLocked(key, time.Now())
	if e != nil && e.lookup != nil && e.lookup.refs > 0 {
		e.lookup.refs++
		r.mu.Unlock()
		return e.lookup
	}
	ctx, cancel := context.WithTimeout(context.Background(), sharedLookupTimeout)
	l := &sharedLookup{done: make(chan struct{}), refs: 1, cancel: cancel, changed: make(chan struct{})}
	if e != nil {
		e.lookup = l
	}
	r.mu.Unlock()
	found := start(ctx)
	go func() {
		defer cancel()
		for p := range found {
			r.offer(key, p, recentPeersTTL)
			r.mu.Lock()
			l.peers = append(l.peers, p)
			close(l.changed)
			l.changed = make(chan struct{})
			r.mu.Unlock()
		}
		r.mu.Lock()
		if e != nil && e.lookup == l {
			e.lookup = nil
		}
		r.mu.Unlock()
		close(l.done)
	}()
	return l
}

// found returns the peers l found so far and a channel closed when it
// finds another.
func (r *recentPeers) found(l *sharedLookup) ([]peerCandidate, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(l.peers), l.changed
}

// leave ends a request's interest in l; the last to leave stops it.
func (r *recentPeers) leave(l *sharedLookup) {
	r.mu.Lock()
	l.refs--
	last := l.refs == 0
	r.mu.Unlock()
	if last {
		l.cancel()
	}
}

// knownFirstWait is how long the peers remembered for a key are given
// before the DHT is asked for more.
const knownFirstWait = 20 * time.Millisecond

// lookup yields up to max peers for key: first those found for it lately,
// at once, then the ones that the key's shared DHT lookup finds. The
// channel closes when that lookup ends or ctx does.
func (f *peerFetcher) lookup(ctx context.Context, key string, max int) <-chan peerCandidate {
	known, changed := f.recent.watch(key)
	out := make(chan peerCandidate)
	go func() {
		defer close(out)
		sent := map[string]bool{}
		emit := func(peers ...peerCandidate) {
			for _, p := range peers {
				if sent[p.id] || len(sent) >= max || ctx.Err() != nil {
					continue
				}
				sent[p.id] = true
				select {
				case out <- p:
				case <-ctx.Done():
				}
			}
		}
		emit(known...)

		// with peers known already, the DHT is asked only if the request
		// still runs knownFirstWait later: most are served by then
		var l *sharedLookup
		var ended, lchanged <-chan struct{}
		var lpeers []peerCandidate
		join := func() {
			l = f.recent.join(key, func(lctx context.Context) <-chan peerCandidate {
				return f.resolver.resolve(lctx, key, max)
			})
			ended = l.done
			lpeers, lchanged = f.recent.found(l)
			emit(lpeers...)
		}
		defer func() {
			if l != nil {
				f.recent.leave(l)
			}
		}()
		var wait <-chan time.Time
		if len(known) == 0 {
			join()
		} else {
			t := time.NewTimer(knownFirstWait)
			defer t.Stop()
			wait = t.C
		}
		for {
			select {
			case <-wait:
				wait = nil
				if len(sent) < max { // else nothing it finds could be used
					join()
				}
			case <-ctx.Done():
				return
			case <-changed:
				known, changed = f.recent.watch(key)
				emit(known...)
			case <-lchanged:
				lpeers, lchanged = f.recent.found(l)
				emit(lpeers...)
			case <-ended:
				lpeers, _ = f.recent.found(l)
				emit(lpeers...)
				return
			}
		}
	}()
	return out
}

// candidates hands out the peers a lookup finds, each once, skipping peers
// known to lie, and can hand out again the ones already tried for a resume.
type candidates struct {
	ch    <-chan peerCandidate
	bad   *peerSet
	tried []peerCandidate
	open  bool
}

func newCandidates(ch <-chan peerCandidate, bad *peerSet) *candidates {
	return &candidates{ch: ch, bad: bad, open: true}
}

// next returns a peer not handed out before, waiting until deadline for the
// lookup to find one; a zero deadline does not wait.
func (c *candidates) next(ctx context.Context, deadline time.Time) (peerCandidate, bool) {
	var timeout <-chan time.Time
	if !deadline.IsZero() {
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		timeout = t.C
	}
	for c.open {
		if deadline.IsZero() {
			select {
			case p, ok := <-c.ch:
				if !c.take(p, ok) {
					continue
				}
				return p, true
			default:
				return peerCandidate{}, false
			}
		}
		select {
		case p, ok := <-c.ch:
			if !c.take(p, ok) {
				continue
			}
			return p, true
		case <-timeout:
			return peerCandidate{}, false
		case <-ctx.Done():
			return peerCandidate{}, false
		}
	}
	return peerCandidate{}, false
}

// take records p; it reports false for a closed channel, a known liar or a
// peer seen already.
func (c *candidates) take(p peerCandidate, ok bool) bool {
	if !ok {
		c.open = false
		return false
	}
	if c.bad.has(p.id) {
		return false
	}
	for _, t := range c.tried {
		if t.id == p.id {
			return false
		}
	}
	c.tried = append(c.tried, p)
	return true
}

// peerRequest is one request to send to a peer.
type peerRequest struct {
	method  string
	path    string // path and query, as sent to the local mirror
	rng     string // Range header, or ""
	partial bool   // a 206 is expected
	// anyStatus, when set, lists the statuses accepted instead
	anyStatus []int
	// ingest asks for a download in progress too: the peer may wait for
	// its containerd to start it before it answers
	ingest bool
}

// attemptResult is the outcome of asking one peer.
type attemptResult struct {
	peer   peerCandidate
	resp   *http.Response
	cancel context.CancelFunc
	err    error
}

// open asks peers for req, hedging: the first peer found is asked at once;
// if it has not answered after hedgeDelay, or fails, the next is asked as
// well. The first good answer wins and the others are cancelled. firstWait
// bounds the wait for the first peer to be found.
func (f *peerFetcher) open(ctx context.Context, cands *candidates, req peerRequest, firstWait time.Duration,
	check func(*http.Response) error) (attemptResult, error) {
	results := make(chan attemptResult)
	inflight := 0
	asked := 0
	launch := func(p peerCandidate) {
		inflight++
		asked++
		actx, cancel := context.WithCancel(ctx)
		go func() {
			resp, err := f.send(actx, p, req, check)
			results <- attemptResult{peer: p, resp: resp, cancel: cancel, err: err}
		}()
	}
	// losers still running when a winner is found are drained here
	drain := func(n int) {
		go func() {
			for i := 0; i < n; i++ {
				r := <-results
				if r.resp != nil {
					r.resp.Body.Close()
				}
				r.cancel()
			}
		}()
	}

	p, ok := cands.next(ctx, time.Now().Add(firstWait))
	if !ok {
		return attemptResult{}, errNoPeer
	}
	launch(p)
	hedge := time.NewTicker(f.hedgeDelay)
	defer hedge.Stop()
	var lastErr error
	for inflight > 0 {
		select {
		case r := <-results:
			inflight--
			if r.err == nil {
				drain(inflight)
				return r, nil
			}
			r.cancel()
			lastErr = r.err
			f.logger.Debug("peer attempt failed", zap.String("peer", r.peer.id), zap.String("path", req.path), zap.Error(r.err))
			if asked < f.maxPeers {
				// a failure moves on at once; give the lookup a moment to
				// find another peer only when nothing else is running
				wait := time.Time{}
				if inflight == 0 {
					wait = time.Now().Add(f.resolveTimeout)
				}
				if p, ok := cands.next(ctx, wait); ok {
					launch(p)
				}
			}
		case <-hedge.C:
			if asked < f.maxPeers {
				if p, ok := cands.next(ctx, time.Time{}); ok {
					launch(p)
				}
			}
		}
	}
	if lastErr == nil {
		lastErr = errNoPeer
	}
	return attemptResult{}, fmt.Errorf("%w: %v", errNoPeer, lastErr)
}

// send asks one peer. The response must have the expected status and pass
// check; otherwise its body is closed and an error returned.
func (f *peerFetcher) send(ctx context.Context, p peerCandidate, req peerRequest,
	check func(*http.Response) error) (*http.Response, error) {
	hreq, err := http.NewRequestWithContext(ctx, req.method, p.url+req.path, nil)
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	hreq.Header.Set(headerForwarded, peerProtocolVersion)
	hreq.Header.Set("Accept", "*/*")
	if f.auth != "" {
		hreq.Header.Set("Authorization", f.auth)
	}
	if req.rng != "" {
		hreq.Header.Set("Range", req.rng)
	}
	client := f.client
	if req.ingest {
		hreq.Header.Set(headerIngest, "1")
		client = f.coldClient
	}
	resp, err := client.Do(hreq)
	if err != nil {
		return nil, err
	}
	want := []int{http.StatusOK}
	if req.partial {
		want = []int{http.StatusPartialContent}
	}
	if req.anyStatus != nil {
		want = req.anyStatus
	}
	if !slices.Contains(want, resp.StatusCode) {
		resp.Body.Close()
		return nil, fmt.Errorf("peer answered %s", resp.Status)
	}
	if check != nil {
		if err := check(resp); err != nil {
			resp.Body.Close()
			return nil, err
		}
	}
	return resp, nil
}

// minPeerRate is the slowest a peer may send, in bytes per second of
// waiting on it, measured over each peer timeout: a peer that trickles is
// as good as stalled, and the transfer resumes elsewhere.
const minPeerRate = 32 << 10

// maxResumeSkip is the most bytes skipped when a peer answers a resume
// with the whole content: enough for any manifest, and quick to skip
// within a peer timeout.
const maxResumeSkip = maxManifestSize

// errSlowPeer ends a stream from a peer slower than minPeerRate.
var errSlowPeer = errors.New("peer sends too slowly")

// peerBody reads a body from peers, resuming with a Range request on
// another peer (or the same one) when the stream breaks, stalls or
// trickles, so the reader sees one unbroken body.
type peerBody struct {
	f      *peerFetcher
	ctx    context.Context
	cands  *candidates
	req    peerRequest
	check  func(*http.Response) error
	cur    attemptResult
	timer  *time.Timer
	start  int64 // absolute offset of the first byte wanted
	length int64 // bytes wanted
	done   int64 // bytes delivered
	peers  map[string]bool
	tries  int
	// waited and got measure the current stream's rate: time spent
	// blocked reading it, and bytes it gave, since the last check
	waited time.Duration
	got    int64
	slow   bool // the current stream is to be replaced at the next Read
}

func newPeerBody(f *peerFetcher, ctx context.Context, cands *candidates, req peerRequest,
	check func(*http.Response) error, first attemptResult, start, length int64) *peerBody {
	b := &peerBody{f: f, ctx: ctx, cands: cands, req: req, check: check, cur: first,
		start: start, length: length, peers: map[string]bool{first.peer.id: true}}
	b.timer = time.AfterFunc(f.stallTimeout, first.cancel)
	return b
}

// Read reads from the current peer and resumes elsewhere on failure.
func (b *peerBody) Read(p []byte) (int, error) {
	if b.done >= b.length {
		return 0, io.EOF
	}
	if int64(len(p)) > b.length-b.done {
		p = p[:b.length-b.done]
	}
	for {
		if b.slow {
			b.slow = false
			if rerr := b.resume(errSlowPeer); rerr != nil {
				return 0, rerr
			}
		}
		// the stall timer runs only while waiting on the peer: a reader
		// that pauses (a slow client) does not make the peer look stalled
		began := time.Now()
		b.timer.Reset(b.f.stallTimeout)
		n, err := b.cur.resp.Body.Read(p)
		b.timer.Stop()
		if n > 0 {
			b.done += int64(n)
			b.measure(n, time.Since(began))
			return n, nil
		}
		if err == nil {
			continue
		}
		if b.ctx.Err() != nil {
			return 0, b.ctx.Err()
		}
		if rerr := b.resume(err); rerr != nil {
			return 0, rerr
		}
	}
}

// measure adds a read of n bytes that took d to the current stream's rate
// and, once a peer timeout's worth of waiting has passed, marks the stream
// slow if it sent less than minPeerRate allows. Only time spent waiting on
// the peer counts, so a reader that pauses does not make a peer look slow.
func (b *peerBody) measure(n int, d time.Duration) {
	b.waited += d
	b.got += int64(n)
	if b.waited < b.f.stallTimeout {
		return
	}
	if float64(b.got) < minPeerRate*b.waited.Seconds() && b.done < b.length {
		b.slow = true
	}
	b.waited, b.got = 0, 0
}

// resume replaces the current stream with a ranged one from the byte
// reached, trying other peers first and the same one last.
func (b *peerBody) resume(cause error) error {
	b.cur.resp.Body.Close()
	b.cur.cancel()
	if b.tries >= b.f.maxResumes {
		return fmt.Errorf("peer stream broke after %d bytes and %d resumes: %w", b.done, b.tries, cause)
	}
	b.tries++
	from := b.start + b.done
	to := b.start + b.length - 1
	b.f.logger.Debug("resuming peer stream", zap.String("peer", b.cur.peer.id),
		zap.Int64("offset", from), zap.Error(cause))

	// a peer may ignore the range and send everything (manifests are never
	// served in ranges): the bytes up to the break are then skipped
	req := b.req
	req.method = http.MethodGet
	req.rng = "bytes=" + strconv.FormatInt(from, 10) + "-" + strconv.FormatInt(to, 10)
	req.anyStatus = []int{http.StatusPartialContent, http.StatusOK}
	check := func(resp *http.Response) error {
		if b.check != nil {
			if err := b.check(resp); err != nil {
				return err
			}
		}
		if resp.StatusCode == http.StatusOK {
			if from > maxResumeSkip || resp.ContentLength <= to {
				return fmt.Errorf("peer ignored the range and sent %d bytes for bytes %d-%d", resp.ContentLength, from, to)
			}
			return nil
		}
		return checkContentRange(resp, from, to)
	}
	// peers tried before go to the back, the one that failed last
	retry := make(chan peerCandidate, len(b.cands.tried))
	failed := b.cur.peer
	for _, p := range b.cands.tried {
		if p.id != failed.id && !b.f.bad.has(p.id) {
			retry <- p
		}
	}
	if !b.f.bad.has(failed.id) {
		retry <- failed
	}
	close(retry)
	again := &candidates{ch: merge(b.ctx, b.cands, retry), bad: b.f.bad, open: true}
	r, err := b.f.open(b.ctx, again, req, b.f.resolveTimeout, check)
	if err != nil {
		return fmt.Errorf("resuming at byte %d: %w (stream broke: %v)", from, err, cause)
	}
	b.cur = r
	b.peers[r.peer.id] = true
	b.timer.Stop()
	b.timer = time.AfterFunc(b.f.stallTimeout, r.cancel)
	b.waited, b.got = 0, 0
	if r.resp.StatusCode == http.StatusOK {
		if _, err := io.CopyN(io.Discard, r.resp.Body, from); err != nil {
			return fmt.Errorf("resuming at byte %d: skipping the bytes before it: %w", from, err)
		}
	}
	return nil
}

// merge yields the lookup's further peers first, then the retry list.
func merge(ctx context.Context, c *candidates, retry <-chan peerCandidate) <-chan peerCandidate {
	out := make(chan peerCandidate)
	go func() {
		defer close(out)
		for {
			p, ok := c.next(ctx, time.Time{})
			if !ok {
				break
			}
			select {
			case out <- p:
			case <-ctx.Done():
				return
			}
		}
		for p := range retry {
			select {
			case out <- p:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// Close releases the current stream.
func (b *peerBody) Close() error {
	b.timer.Stop()
	if b.cur.resp != nil {
		b.cur.resp.Body.Close()
	}
	if b.cur.cancel != nil {
		b.cur.cancel()
	}
	return nil
}

// checkContentRange checks that a 206 answers exactly bytes from-to.
func checkContentRange(resp *http.Response, from, to int64) error {
	cr := resp.Header.Get("Content-Range")
	var a, z, size int64
	if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &a, &z, &size); err != nil || a != from || z != to {
		return fmt.Errorf("peer answered Content-Range %q for bytes %d-%d", cr, from, to)
	}
	return nil
}

// newPeerFetcher returns a fetcher over resolver with its own HTTP client:
// no proxy, bounded dials and response headers, connections kept for
// reuse between nodes.
func newPeerFetcher(resolver peerResolver, resolveTimeout, hedgeDelay, peerTimeout time.Duration,
	maxPeers int, logger *zap.Logger) *peerFetcher {
	transport := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: peerTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ResponseHeaderTimeout: peerTimeout,
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true,
		ForceAttemptHTTP2:     false,
	}
	cold := transport.Clone()
	cold.ResponseHeaderTimeout = ingestStartWait + peerTimeout
	return &peerFetcher{
		resolver:       resolver,
		client:         &http.Client{Transport: transport},
		coldClient:     &http.Client{Transport: cold},
		logger:         logger,
		resolveTimeout: resolveTimeout,
		hedgeDelay:     hedgeDelay,
		stallTimeout:   peerTimeout,
		maxPeers:       maxPeers,
		maxResumes:     maxPeers + 2,
		bad:            newPeerSet(),
		recent:         newRecentPeers(),
	}
}

// close drops idle connections to peers.
// useTLS makes the fetcher's requests use cfg (HTTPS to peers).
func (f *peerFetcher) useTLS(cfg *tls.Config) {
	for _, c := range []*http.Client{f.client, f.coldClient} {
		c.Transport.(*http.Transport).TLSClientConfig = cfg.Clone()
	}
}

func (f *peerFetcher) close() {
	f.client.CloseIdleConnections()
	f.coldClient.CloseIdleConnections()
}
