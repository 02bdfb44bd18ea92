package caddymodule

import (
	"errors"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// DHTConfig configures this node's libp2p host and its place in the
// private Kademlia DHT.
type DHTConfig struct {
	// Listen lists the libp2p multiaddrs to listen on.
	// Default: /ip4/0.0.0.0/tcp/5001 and /ip6/::/tcp/5001.
	// Caddyfile: `listen <multiaddr...>`.
	Listen []string `json:"listen,omitempty"`

	// Announce lists the addresses told to peers, as IPs or multiaddrs,
	// instead of the detected ones; in Kubernetes, the node IP from the
	// downward API. Default: the listen addresses' interfaces, without
	// loopback, link-local and container-bridge addresses.
	// Caddyfile: `announce <ip|multiaddr...>`.
	Announce []string `json:"announce,omitempty"`

	// BootstrapStatic lists peers as multiaddrs ending in /p2p/<peer ID>.
	// Caddyfile: `bootstrap_static <multiaddr...>`.
	BootstrapStatic []string `json:"bootstrap_static,omitempty"`

	// BootstrapDNS lists host names whose A and AAAA records are peers (a
	// Kubernetes headless service). Their peer IDs are learnt from each
	// address's mirror port, at /.well-known/peermirror/v1/peers.
	// Caddyfile: `bootstrap_dns <name...>`.
	BootstrapDNS []string `json:"bootstrap_dns,omitempty"`

	// BootstrapHTTP lists URLs that answer the peer list document (see the
	// README). Every node serves one at /.well-known/peermirror/v1/peers.
	// Caddyfile: `bootstrap_http <url...>`.
	BootstrapHTTP []string `json:"bootstrap_http,omitempty"`

	// KeyFile keeps this node's Ed25519 key, so its peer ID survives
	// restarts; it is created if missing. Default: a new key at each
	// start. Caddyfile: `key_file <path>`.
	KeyFile string `json:"key_file,omitempty"`

	// MirrorPort is the port of this node's mirror, told to peers so they
	// can fetch from it. Default: 30020. Caddyfile: `mirror_port`.
	MirrorPort int `json:"mirror_port,omitempty"`

	// RecordTTL is how long a provider record lives in the DHT unless it
	// is advertised again. Default: 10m. Caddyfile: `record_ttl`.
	RecordTTL caddy.Duration `json:"record_ttl,omitempty"`

	// ReprovideInterval is how often this node advertises everything it
	// holds again; it must be shorter than RecordTTL. Default: a third of
	// RecordTTL. Caddyfile: `reprovide_interval`.
	ReprovideInterval caddy.Duration `json:"reprovide_interval,omitempty"`
}

// provision fills in defaults and checks the values.
func (c *DHTConfig) provision() error {
	if c.MirrorPort == 0 {
		c.MirrorPort = 30020
	}
	if c.MirrorPort < 1 || c.MirrorPort > 65535 {
		return errors.New("mirror_port must be between 1 and 65535")
	}
	if c.RecordTTL == 0 {
		c.RecordTTL = caddy.Duration(10 * time.Minute)
	}
	if c.ReprovideInterval == 0 {
		c.ReprovideInterval = c.RecordTTL / 3
	}
	if c.ReprovideInterval >= c.RecordTTL || c.ReprovideInterval <= 0 {
		return errors.New("reprovide_interval must be positive and shorter than record_ttl")
	}
	return nil
}
