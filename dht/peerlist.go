package dht

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// PeerListPath is where every node's mirror port serves its PeerList, and
// where DNS bootstrap looks for it.
const PeerListPath = "/.well-known/peermirror/v1/peers"

// PeerListVersion is the version of the peer list format written by this
// package. Readers accept any version from 1 up: a newer writer keeps the
// fields described here and may add others, which are ignored. It is a
// variable only so that tests can build a node that writes a newer version
// (see peerListVersion); nothing changes it at run time.
var PeerListVersion = parseVersion("peerListVersion", peerListVersion)

// peerListVersion is PeerListVersion as text, which the linker can set:
// -ldflags "-X github.com/peermirror/peermirror/dht.peerListVersion=2".
var peerListVersion = "1"

// parseVersion turns a format version set at link time into a number. A
// value that is not a positive integer is a broken build: it panics at
// start rather than write documents no peer accepts.
func parseVersion(name, s string) int {
	v, err := strconv.Atoi(s)
	if err != nil || v < 1 {
		panic(fmt.Sprintf("dht: %s %q set at link time is not a positive integer", name, s))
	}
	return v
}

// maxPeerListSize bounds the peer list document read from a bootstrap
// source.
const maxPeerListSize = 1 << 20

// PeerList is the document that tells a joining node which peers to connect
// to. Every node serves its own at PeerListPath on its mirror port (built
// by Router.PeerList), and an HTTP bootstrap URL answers with the same
// format. As JSON (Content-Type application/json):
//
//	{
//	  "version": 1,
//	  "peers": [
//	    {
//	      "id": "12D3KooWGzF...",
//	      "addrs": ["/ip4/10.0.0.2/tcp/5001", "/ip6/fd00::2/tcp/5001"],
//	      "mirror_port": 30020
//	    }
//	  ]
//	}
//
// "version" is required and at least 1; a reader accepts higher versions
// and ignores fields it does not know. "peers" lists the serving node
// itself first, then the peers it is connected to. Each peer has its
// libp2p peer ID ("id", required), the libp2p multiaddrs it can be dialed
// at without the /p2p part ("addrs") and its HTTP mirror port
// ("mirror_port", 0 if unknown). A reader skips a peer whose ID it cannot
// parse and an address it cannot parse.
type PeerList struct {
	Version int
	Peers   []PeerInfo
}

// PeerInfo is one peer in a PeerList.
type PeerInfo struct {
	ID         peer.ID
	Addrs      []ma.Multiaddr
	MirrorPort int
}

// AddrInfo returns the peer's ID and addresses in the form libp2p dials.
func (p PeerInfo) AddrInfo() peer.AddrInfo {
	return peer.AddrInfo{ID: p.ID, Addrs: p.Addrs}
}

type peerListJSON struct {
	Version int            `json:"version"`
	Peers   []peerInfoJSON `json:"peers"`
}

type peerInfoJSON struct {
	ID         string   `json:"id"`
	Addrs      []string `json:"addrs"`
	MirrorPort int      `json:"mirror_port"`
}

// MarshalJSON writes the format documented on PeerList. A zero Version is
// written as PeerListVersion.
func (pl PeerList) MarshalJSON() ([]byte, error) {
	doc := peerListJSON{Version: pl.Version, Peers: make([]peerInfoJSON, 0, len(pl.Peers))}
	if doc.Version == 0 {
		doc.Version = PeerListVersion
	}
	for _, p := range pl.Peers {
		pj := peerInfoJSON{ID: p.ID.String(), MirrorPort: p.MirrorPort}
		pj.Addrs = make([]string, 0, len(p.Addrs))
		for _, a := range p.Addrs {
			pj.Addrs = append(pj.Addrs, a.String())
		}
		doc.Peers = append(doc.Peers, pj)
	}
	return json.Marshal(doc)
}

// UnmarshalJSON reads the format documented on PeerList, skipping peers and
// addresses it cannot parse.
func (pl *PeerList) UnmarshalJSON(data []byte) error {
	var doc peerListJSON
	if err := json.Unmarshal(data, &doc); err != nil {
		return err
	}
	if doc.Version < 1 {
		return fmt.Errorf("unsupported peer list version %d", doc.Version)
	}
	out := PeerList{Version: doc.Version}
	for _, pj := range doc.Peers {
		id, err := peer.Decode(pj.ID)
		if err != nil {
			continue
		}
		p := PeerInfo{ID: id, MirrorPort: pj.MirrorPort}
		if p.MirrorPort < 0 || p.MirrorPort > 65535 {
			p.MirrorPort = 0
		}
		for _, s := range pj.Addrs {
			a, err := ma.NewMultiaddr(s)
			if err != nil {
				continue
			}
			// An address may carry its own /p2p part: drop it, the ID is
			// given beside it.
			if addr, last := ma.SplitLast(a); last != nil && last.Code() == ma.P_P2P {
				a = addr
			}
			if len(a) > 0 {
				p.Addrs = append(p.Addrs, a)
			}
		}
		out.Peers = append(out.Peers, p)
	}
	*pl = out
	return nil
}

// EncodePeerList writes pl as JSON to w.
func EncodePeerList(w io.Writer, pl PeerList) error {
	return json.NewEncoder(w).Encode(pl)
}

// DecodePeerList reads a PeerList from r, reading at most 1 MiB.
func DecodePeerList(r io.Reader) (PeerList, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxPeerListSize+1))
	if err != nil {
		return PeerList{}, fmt.Errorf("reading peer list: %w", err)
	}
	if len(data) > maxPeerListSize {
		return PeerList{}, errors.New("reading peer list: larger than 1 MiB")
	}
	var pl PeerList
	if err := json.Unmarshal(data, &pl); err != nil {
		return PeerList{}, fmt.Errorf("decoding peer list: %w", err)
	}
	return pl, nil
}
