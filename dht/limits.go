package dht

import (
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/x/rate"
)

const (
	// defaultConnGrace is how long a new connection is safe from the
	// connection manager's trimming (go-libp2p's default).
	defaultConnGrace = time.Minute
	// defaultConnSilence is how often, at most, the connection manager
	// trims (go-libp2p's default).
	defaultConnSilence = 10 * time.Second
)

// newConnManager makes the connection manager: it trims the connections
// down to ConnLow once there are ConnHigh, sparing those younger than
// grace, at most once per silence.
func newConnManager(pc *parsedConfig, grace, silence time.Duration) (*connmgr.BasicConnMgr, error) {
	cm, err := connmgr.NewConnManager(pc.ConnLow, pc.ConnHigh,
		connmgr.WithGracePeriod(grace), connmgr.WithSilencePeriod(silence))
	if err != nil {
		return nil, fmt.Errorf("making the connection manager: %w", err)
	}
	return cm, nil
}

// newResourceManager makes the resource manager: go-libp2p's default
// limits, scaled to the machine's memory and file descriptors, with the
// system-wide inbound connections and streams capped at MaxInboundConns
// and MaxInboundStreams, and the outbound ones left to the connection
// manager (ConnHigh).
//
// go-libp2p's default also caps the connections per IP subnet (8 per IPv4
// address and per IPv6 /56, 64 per /48) and rate-limits new connections
// per subnet (a burst of 16, then one every 5s), in both directions. That
// guards a node on the internet against one network; in a cluster, where
// every node's address is in the same /56 (or many nodes share one IP),
// it would let a node talk to 8 of its peers at most. Both are off here:
// MaxInboundConns, the per-peer limits and, with a network key, the key
// itself bound what others can take.
func newResourceManager(pc *parsedConfig) (network.ResourceManager, error) {
	scaling := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&scaling)
	limits := rcmgr.PartialLimitConfig{
		System: rcmgr.ResourceLimits{
			ConnsInbound:    rcmgr.LimitVal(pc.MaxInboundConns),
			ConnsOutbound:   rcmgr.Unlimited,
			Conns:           rcmgr.Unlimited,
			StreamsInbound:  rcmgr.LimitVal(pc.MaxInboundStreams),
			StreamsOutbound: rcmgr.Unlimited,
			Streams:         rcmgr.Unlimited,
		},
	}.Build(scaling.AutoScale())
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits),
		rcmgr.WithLimitPerSubnet([]rcmgr.ConnLimitPerSubnet{}, []rcmgr.ConnLimitPerSubnet{}),
		rcmgr.WithConnRateLimiters(&rate.Limiter{}),
		rcmgr.WithMetricsDisabled(),
	)
	if err != nil {
		return nil, fmt.Errorf("making the resource manager: %w", err)
	}
	return rm, nil
}
