//go:build deps

// This file pins modules that the next parts of peermirror (the DHT) build
// against, so the dependency graph is settled once: go-libp2p-kad-dht only
// compiles beside Caddy's quic-go with go-libp2p v0.50.0 or newer.
package peermirror

import (
	_ "github.com/libp2p/go-libp2p"
	_ "github.com/libp2p/go-libp2p-kad-dht"
)
