package caddymodule

import (
	"errors"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/peermirror/peermirror/dht"
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

	// BootstrapPort is the port where bootstrap_dns reads each address's
	// peer list (/.well-known/peermirror/v1/peers, over plain HTTP), when
	// peers are served elsewhere: for example behind mutual TLS on
	// mirror_port, with the peer list on an operations listener. Default:
	// mirror_port. Caddyfile: `bootstrap_port`.
	BootstrapPort int `json:"bootstrap_port,omitempty"`

	// RecordTTL is how long a provider record lives in the DHT unless it
	// is advertised again. Default: 10m. Caddyfile: `record_ttl`.
	RecordTTL caddy.Duration `json:"record_ttl,omitempty"`

	// ReprovideInterval is how often this node advertises everything it
	// holds again; it must be shorter than RecordTTL. Default: a third of
	// RecordTTL. Caddyfile: `reprovide_interval`.
	ReprovideInterval caddy.Duration `json:"reprovide_interval,omitempty"`

	// NetworkKeyFile holds a pre-shared key that makes the DHT a libp2p
	// private network: only nodes with the same key can connect to this
	// node, join the DHT and read or add provider records. It does not
	// guard the mirror port. The file holds the lines
	// "/key/swarm/psk/1.0.0/", "/base16/" and 64 hex digits, as printed by
	// `caddy peermirror-network-key`, and must exist. With a key libp2p
	// runs over TCP only: a QUIC listen (or announce, or static bootstrap)
	// address is an error. A new key (or path) starts a new libp2p node on
	// reload. Default: none, any node that reaches the listen port may
	// join. Caddyfile: `network_key_file <path>`.
	NetworkKeyFile string `json:"network_key_file,omitempty"`

	// ConnLow and ConnHigh are the libp2p connection manager's
	// watermarks: from ConnHigh connections on, the least useful ones are
	// closed down to ConnLow (connections younger than a minute, and those
	// to the closest DHT peers, are kept). Peers reconnect when they need
	// to. Default: ConnHigh 400, ConnLow half of ConnHigh.
	// Caddyfile: `conn_low <n>`, `conn_high <n>`.
	ConnLow  int `json:"conn_low,omitempty"`
	ConnHigh int `json:"conn_high,omitempty"`

	// MaxInboundConns caps the libp2p connections that peers open to this
	// node, all peers together; the ones over it are refused. The
	// connections this node opens are bounded by ConnHigh instead.
	// Default: 1024. Caddyfile: `max_inbound_conns <n>`.
	MaxInboundConns int `json:"max_inbound_conns,omitempty"`

	// MaxInboundStreams caps the libp2p streams (DHT requests, mirror port
	// queries) that peers open to this node, all peers together; the ones
	// over it are reset. Default: 4096.
	// Caddyfile: `max_inbound_streams <n>`.
	MaxInboundStreams int `json:"max_inbound_streams,omitempty"`

	// networkKeyID is the fingerprint of the network key read at
	// provision: a new key in the same file makes a new pool key.
	networkKeyID string
}

// provision fills in defaults and checks the values.
func (c *DHTConfig) provision() error {
	if c.MirrorPort == 0 {
		c.MirrorPort = 30020
	}
	if c.MirrorPort < 1 || c.MirrorPort > 65535 {
		return errors.New("mirror_port must be between 1 and 65535")
	}
	if c.BootstrapPort < 0 || c.BootstrapPort > 65535 {
		return errors.New("bootstrap_port must be between 1 and 65535")
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

	// connection limits
	if c.ConnHigh == 0 {
		c.ConnHigh = dht.DefaultConnHigh
	}
	if c.ConnLow == 0 {
		c.ConnLow = c.ConnHigh / 2
	}
	if c.ConnLow < 1 || c.ConnLow >= c.ConnHigh {
		return fmt.Errorf("conn_low (%d) must be at least 1 and below conn_high (%d)", c.ConnLow, c.ConnHigh)
	}
	if c.MaxInboundConns == 0 {
		c.MaxInboundConns = dht.DefaultMaxInboundConns
	}
	if c.MaxInboundStreams == 0 {
		c.MaxInboundStreams = dht.DefaultMaxInboundStreams
	}
	if c.MaxInboundConns < 0 || c.MaxInboundStreams < 0 {
		return errors.New("max_inbound_conns and max_inbound_streams must not be negative")
	}

	// network key
	c.networkKeyID = ""
	if c.NetworkKeyFile != "" {
		for _, f := range []struct {
			name  string
			addrs []string
		}{{"listen", c.Listen}, {"announce", c.Announce}, {"bootstrap_static", c.BootstrapStatic}} {
			if err := dht.CheckTCPOnly(f.addrs); err != nil {
				return fmt.Errorf("%s: %v: with network_key_file, libp2p runs over TCP only "+
					"(its private networks do not work over QUIC); remove the address or the key", f.name, err)
			}
		}
		psk, err := dht.ReadNetworkKeyFile(c.NetworkKeyFile)
		if err != nil {
			return fmt.Errorf("network_key_file: %w", err)
		}
		c.networkKeyID = dht.NetworkKeyFingerprint(psk)
	}
	return nil
}
