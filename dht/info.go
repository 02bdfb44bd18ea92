package dht

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
	"go.uber.org/zap"
)

// InfoProtocolID is the libp2p stream protocol through which a node tells
// a peer its mirror port: a provider record holds only a peer ID and
// libp2p addresses. The dialer opens a stream and reads one JSON document
// until the stream ends:
//
//	{"version":1,"mirror_port":30020}
//
// The protocol ID stays the same across versions; "version" tells what the
// document holds. A reader accepts any version from 1 up as long as
// mirror_port is a valid port, and ignores fields it does not know.
const InfoProtocolID protocol.ID = "/peermirror/info/1.0.0"

// InfoVersion is the version of the info document written by this package.
// It is a variable only so that tests can build a node that writes a newer
// version (see infoVersion); nothing changes it at run time.
var InfoVersion = parseVersion("infoVersion", infoVersion)

// infoVersion is InfoVersion as text, which the linker can set:
// -ldflags "-X github.com/peermirror/peermirror/dht.infoVersion=2".
var infoVersion = "1"

const (
	// maxInfoSize bounds the info document.
	maxInfoSize = 4 << 10
	// infoTimeout bounds one info exchange, dial included.
	infoTimeout = 10 * time.Second
	// maxInfoCache bounds the cached mirror ports of peers no longer
	// connected.
	maxInfoCache = 10000
)

type infoDoc struct {
	Version    int `json:"version"`
	MirrorPort int `json:"mirror_port"`
}

func decodeInfo(r io.Reader) (infoDoc, error) {
	var doc infoDoc
	data, err := io.ReadAll(io.LimitReader(r, maxInfoSize+1))
	if err != nil {
		return doc, fmt.Errorf("reading info: %w", err)
	}
	if len(data) > maxInfoSize {
		return doc, errors.New("reading info: document too large")
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return doc, fmt.Errorf("decoding info: %w", err)
	}
	if doc.Version < 1 {
		return doc, fmt.Errorf("unsupported info version %d", doc.Version)
	}
	if doc.MirrorPort < 1 || doc.MirrorPort > 65535 {
		return doc, fmt.Errorf("info mirror port %d out of range", doc.MirrorPort)
	}
	return doc, nil
}

// handleInfoStream answers the info protocol.
func (r *Router) handleInfoStream(s network.Stream) {
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(infoTimeout))
	err := json.NewEncoder(s).Encode(infoDoc{Version: InfoVersion, MirrorPort: r.conf().MirrorPort})
	if err != nil {
		_ = s.Reset()
		r.logger.Debug("answering info request",
			zap.Stringer("peer", s.Conn().RemotePeer()), zap.Error(err))
	}
}

// infoEntry is what is known of a peer's mirror.
type infoEntry struct {
	port int
	at   time.Time
}

// infoCall is one info exchange in flight; callers for the same peer share
// it.
type infoCall struct {
	done chan struct{}
	port int
	err  error
}

// infoCache holds the mirror port of each peer, by peer ID.
type infoCache struct {
	mu       sync.Mutex
	entries  map[peer.ID]infoEntry
	inflight map[peer.ID]*infoCall
}

func newInfoCache() *infoCache {
	return &infoCache{entries: make(map[peer.ID]infoEntry), inflight: make(map[peer.ID]*infoCall)}
}

func (c *infoCache) port(id peer.ID) (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[id]
	return e.port, ok
}

// fetchInfo starts an info exchange with id, unless one is running, and
// returns the call to wait on. The exchange runs under the router's
// context, not the caller's, so a caller that gives up does not waste the
// answer. Once the router is closed, the call returned has failed.
func (r *Router) fetchInfo(id peer.ID) *infoCall {
	c := r.infos
	c.mu.Lock()
	if call, ok := c.inflight[id]; ok {
		c.mu.Unlock()
		return call
	}
	call := &infoCall{done: make(chan struct{})}
	c.inflight[id] = call
	c.mu.Unlock()

	started := r.goTracked(func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, infoTimeout)
		defer cancel()
		port, err := r.askInfo(ctx, id)

		c.mu.Lock()
		delete(c.inflight, id)
		if err == nil {
			c.entries[id] = infoEntry{port: port, at: time.Now()}
			c.pruneLocked(r)
		}
		c.mu.Unlock()
		call.port, call.err = port, err
		close(call.done)
		if err != nil {
			r.logger.Debug("asking peer for its mirror port", zap.Stringer("peer", id), zap.Error(err))
		} else {
			r.logger.Debug("peer mirror port", zap.Stringer("peer", id), zap.Int("mirror_port", port))
		}
	})
	if !started {
		c.mu.Lock()
		delete(c.inflight, id)
		c.mu.Unlock()
		call.err = errClosed
		close(call.done)
	}
	return call
}

// pruneLocked drops the oldest entries of peers that are not connected
// once the cache is over its bound.
func (c *infoCache) pruneLocked(r *Router) {
	if len(c.entries) <= maxInfoCache {
		return
	}
	var oldest peer.ID
	var oldestAt time.Time
	for id, e := range c.entries {
		if r.host.Network().Connectedness(id) == network.Connected {
			continue
		}
		if oldest == "" || e.at.Before(oldestAt) {
			oldest, oldestAt = id, e.at
		}
	}
	if oldest != "" {
		delete(c.entries, oldest)
	}
}

// askInfo runs the info protocol with id.
func (r *Router) askInfo(ctx context.Context, id peer.ID) (int, error) {
	s, err := r.host.NewStream(ctx, id, InfoProtocolID)
	if err != nil {
		return 0, fmt.Errorf("opening info stream: %w", err)
	}
	defer s.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(deadline)
	}
	_ = s.CloseWrite()
	doc, err := decodeInfo(s)
	if err != nil {
		_ = s.Reset()
		return 0, err
	}
	return doc.MirrorPort, nil
}

// mirrorPort returns id's mirror port, asking the peer if it is not known.
// The peer must be connected or its addresses in the peerstore.
func (r *Router) mirrorPort(ctx context.Context, id peer.ID) (int, error) {
	if port, ok := r.infos.port(id); ok {
		return port, nil
	}
	call := r.fetchInfo(id)
	select {
	case <-call.done:
		return call.port, call.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// peerIP returns the IP at which id's mirror is reached: the remote IP of
// a live connection if there is one, else the first usable IP among the
// peer's known addresses and extra, preferring non-loopback ones.
func (r *Router) peerIP(id peer.ID, extra []ma.Multiaddr) (netip.Addr, bool) {
	for _, conn := range r.host.Network().ConnsToPeer(id) {
		if ip, ok := ipOf(conn.RemoteMultiaddr()); ok && ip.IsValid() && !ip.IsUnspecified() {
			return ip, true
		}
	}
	addrs := append(r.host.Peerstore().Addrs(id), extra...)
	var loopback netip.Addr
	for _, a := range addrs {
		ip, ok := ipOf(a)
		if !ok {
			continue
		}
		if usableIP(ip, false) {
			return ip, true
		}
		if ip.IsLoopback() && !loopback.IsValid() {
			loopback = ip
		}
	}
	return loopback, loopback.IsValid()
}

// mirrorURL returns "http://<ip>:<port>", with an IPv6 address in brackets.
func mirrorURL(ip netip.Addr, port int) string {
	return "http://" + net.JoinHostPort(ip.Unmap().WithZone("").String(), strconv.Itoa(port))
}

// knownPeer returns id as a Peer if its mirror port and an IP are known.
func (r *Router) knownPeer(id peer.ID, extra []ma.Multiaddr) (Peer, bool) {
	port, ok := r.infos.port(id)
	if !ok {
		return Peer{}, false
	}
	ip, ok := r.peerIP(id, extra)
	if !ok {
		return Peer{}, false
	}
	return Peer{ID: id, MirrorURL: mirrorURL(ip, port)}, true
}
