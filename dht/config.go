package dht

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// Defaults of Config. They are exported so that the Caddy module can show
// them in its own documentation.
const (
	DefaultRecordTTL         = 10 * time.Minute
	DefaultBootstrapInterval = 30 * time.Second
	DefaultListenPort        = 5001

	// DefaultConnHigh is Config.ConnHigh's default, DefaultConnHigh/2
	// ConnLow's: room for the routing table of a cluster of a few
	// thousand nodes and for the peers of the lookups in flight.
	DefaultConnHigh = 400
	// DefaultMaxInboundConns and DefaultMaxInboundStreams are the defaults
	// of Config.MaxInboundConns and Config.MaxInboundStreams.
	DefaultMaxInboundConns   = 1024
	DefaultMaxInboundStreams = 4096
)

// DefaultListenAddrs are the libp2p listen addresses used when
// Config.ListenAddrs is empty: TCP port 5001 on every IPv4 and IPv6
// address.
var DefaultListenAddrs = []string{
	"/ip4/0.0.0.0/tcp/5001",
	"/ip6/::/tcp/5001",
}

// Config configures a Router. The zero value is not usable: MirrorPort is
// required. New fills in the defaults named on each field.
type Config struct {
	// ListenAddrs are the libp2p multiaddrs to listen on. TCP is always
	// available; QUIC ("/ip4/0.0.0.0/udp/5001/quic-v1") may be added. An
	// address family that cannot be bound (no IPv6 on the host) is logged and
	// skipped as long as one address binds. Default: DefaultListenAddrs
	// (/ip4/0.0.0.0/tcp/5001 and /ip6/::/tcp/5001).
	ListenAddrs []string

	// AnnounceAddrs replaces the detected addresses that are told to peers.
	// Each entry is either an IP ("10.0.0.2", "fd00::2"), combined with the
	// port and transport of every listen address of the same family, or a
	// full multiaddr ("/ip4/10.0.0.2/tcp/5001") used as is. In Kubernetes,
	// pass the node IP from the downward API. Default: the addresses of the
	// host's interfaces, without loopback, link-local and container bridge
	// addresses (see Router.Addrs); loopback is kept when every listen
	// address is a loopback address.
	AnnounceAddrs []string

	// KeyFile is the path of the node's Ed25519 private key (PKCS #8, PEM,
	// as written by `openssl genpkey -algorithm ed25519`). When the file is
	// missing, a key is generated and written there (mode 0600, parent
	// folders created) at Start, so the peer ID survives restarts. Default:
	// empty, a new random key on every start.
	KeyFile string

	// PrivateKey is the node's identity given directly, as an alternative to
	// KeyFile (tests, embedding). It must be an Ed25519 key. Default: nil.
	PrivateKey crypto.PrivKey

	// BootstrapStatic are multiaddrs of peers to join, each ending in
	// /p2p/<peer ID> ("/ip4/10.0.0.2/tcp/5001/p2p/12D3KooW..."). Default:
	// none.
	BootstrapStatic []string

	// BootstrapDNS are host names whose A and AAAA records are peers with
	// unknown peer IDs, such as a Kubernetes headless service. For each
	// address the router fetches
	// http://<address>:<BootstrapPeerPort>/.well-known/peermirror/v1/peers
	// (see PeerList) to learn the peer's ID and libp2p addresses. Default:
	// none.
	BootstrapDNS []string

	// BootstrapHTTP are URLs that answer with a PeerList document. Default:
	// none.
	BootstrapHTTP []string

	// MirrorPort is this node's HTTP mirror port. Peers are told it and build
	// this node's mirror URL from it and this node's IP. Required, 1 to
	// 65535.
	MirrorPort int

	// BootstrapPeerPort is the mirror port assumed for the addresses that
	// BootstrapDNS resolves to. Default: MirrorPort.
	BootstrapPeerPort int

	// RecordTTL is how long a provider record lives on the nodes that store
	// it. The nodes that store a record enforce their own RecordTTL, so all
	// nodes of a cluster should use the same value. Default: 10m.
	RecordTTL time.Duration

	// ReprovideInterval is how often every advertised key is advertised
	// again. It must be shorter than RecordTTL. Default: RecordTTL / 3.
	ReprovideInterval time.Duration

	// BootstrapInterval is how often the bootstrap sources are checked again,
	// for as long as the router runs, so that a node that started alone joins
	// the others later and split groups merge. Until the first peer connects,
	// the router retries with a backoff that starts at 100ms and grows to
	// BootstrapInterval. Default: 30s.
	BootstrapInterval time.Duration

	// Resolver resolves BootstrapDNS names and the host names of
	// BootstrapHTTP URLs. Default: net.DefaultResolver.
	Resolver *net.Resolver

	// NetworkKeyFile is the path of a pre-shared key that makes the DHT a
	// libp2p private network: every libp2p connection is encrypted with
	// the key before anything else is said, so a node without it (or with
	// another one) can neither connect to this node nor accept its
	// connections, and so cannot join the DHT, read its provider records or
	// add its own. The file holds the lines "/key/swarm/psk/1.0.0/",
	// "/base16/" and 64 hex digits (see ReadNetworkKeyFile and
	// GenerateNetworkKey); it must exist. libp2p private networks work over
	// TCP only: with a key QUIC is off, and a listen, announce or static
	// bootstrap multiaddr that is not TCP is an error. Default: empty, no
	// key: any node that reaches a listen address may join.
	NetworkKeyFile string

	// ConnLow and ConnHigh are the connection manager's watermarks: when
	// the node holds ConnHigh connections or more, it closes the least
	// useful ones down to ConnLow. Connections younger than a minute and
	// those to the peers of the two closest routing table buckets (which
	// kad-dht protects) are kept. 1 <= ConnLow < ConnHigh. Defaults:
	// ConnHigh DefaultConnHigh (400), ConnLow ConnHigh/2.
	ConnLow  int
	ConnHigh int

	// MaxInboundConns caps the libp2p connections that peers open to this
	// node, all peers together: the resource manager refuses the ones over
	// it. The connections this node opens are not capped (ConnHigh trims
	// them). Default: DefaultMaxInboundConns (1024).
	MaxInboundConns int

	// MaxInboundStreams caps the streams that peers open to this node, all
	// connections together; a stream over it is reset. Default:
	// DefaultMaxInboundStreams (4096).
	MaxInboundStreams int

	// HTTPClient fetches peer lists for DNS and HTTP bootstrap. Default: a
	// client with a 5s timeout that ignores proxy environment variables
	// (bootstrap targets are inside the cluster) and resolves with Resolver.
	HTTPClient *http.Client
}

// parsedConfig is a validated Config with its strings parsed.
type parsedConfig struct {
	Config

	listenAddrs  []ma.Multiaddr
	keepLoopback bool
	announceIPs  []netip.Addr
	announceFull []ma.Multiaddr
	static       []peer.AddrInfo
	dnsNames     []string
	httpURLs     []string
	// ownHTTPClient is set when HTTPClient was made here, so Close may close
	// its idle connections.
	ownHTTPClient bool
}

const defaultHTTPTimeout = 5 * time.Second

// parseConfig checks cfg, fills its defaults and parses its strings. It
// touches no network and no file.
func parseConfig(cfg Config) (*parsedConfig, error) {
	pc := &parsedConfig{Config: cfg}

	if cfg.MirrorPort < 1 || cfg.MirrorPort > 65535 {
		return nil, fmt.Errorf("mirror port %d out of range 1-65535", cfg.MirrorPort)
	}
	if pc.BootstrapPeerPort == 0 {
		pc.BootstrapPeerPort = cfg.MirrorPort
	}
	if pc.BootstrapPeerPort < 1 || pc.BootstrapPeerPort > 65535 {
		return nil, fmt.Errorf("bootstrap peer port %d out of range 1-65535", pc.BootstrapPeerPort)
	}

	// timing
	if pc.RecordTTL == 0 {
		pc.RecordTTL = DefaultRecordTTL
	}
	if pc.RecordTTL < 0 {
		return nil, fmt.Errorf("record ttl %s is negative", pc.RecordTTL)
	}
	if pc.ReprovideInterval == 0 {
		pc.ReprovideInterval = pc.RecordTTL / 3
	}
	if pc.ReprovideInterval <= 0 || pc.ReprovideInterval >= pc.RecordTTL {
		return nil, fmt.Errorf("reprovide interval %s must be positive and shorter than record ttl %s",
			pc.ReprovideInterval, pc.RecordTTL)
	}
	if pc.BootstrapInterval == 0 {
		pc.BootstrapInterval = DefaultBootstrapInterval
	}
	if pc.BootstrapInterval < 0 {
		return nil, fmt.Errorf("bootstrap interval %s is negative", pc.BootstrapInterval)
	}

	// identity
	if cfg.PrivateKey != nil && cfg.KeyFile != "" {
		return nil, errors.New("private key and key file are mutually exclusive")
	}
	if cfg.PrivateKey != nil && cfg.PrivateKey.Type() != crypto.Ed25519 {
		return nil, fmt.Errorf("private key is %s, want Ed25519", cfg.PrivateKey.Type())
	}

	// connection limits
	if pc.ConnHigh == 0 {
		pc.ConnHigh = DefaultConnHigh
	}
	if pc.ConnLow == 0 {
		pc.ConnLow = pc.ConnHigh / 2
	}
	if pc.ConnLow < 1 || pc.ConnLow >= pc.ConnHigh {
		return nil, fmt.Errorf("connection watermarks low %d and high %d: want 1 <= low < high", pc.ConnLow, pc.ConnHigh)
	}
	if pc.MaxInboundConns == 0 {
		pc.MaxInboundConns = DefaultMaxInboundConns
	}
	if pc.MaxInboundStreams == 0 {
		pc.MaxInboundStreams = DefaultMaxInboundStreams
	}
	if pc.MaxInboundConns < 0 || pc.MaxInboundStreams < 0 {
		return nil, fmt.Errorf("max inbound connections %d and streams %d must not be negative",
			pc.MaxInboundConns, pc.MaxInboundStreams)
	}

	// listen addresses
	listen := cfg.ListenAddrs
	if len(listen) == 0 {
		listen = DefaultListenAddrs
	}
	pc.keepLoopback = true
	for _, s := range listen {
		addr, err := ma.NewMultiaddr(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("parsing listen address %q: %w", s, err)
		}
		if _, ok := ipOf(addr); !ok {
			return nil, fmt.Errorf("listen address %q does not start with /ip4 or /ip6", s)
		}
		if !manet.IsIPLoopback(addr) {
			pc.keepLoopback = false
		}
		pc.listenAddrs = append(pc.listenAddrs, addr)
	}

	// announce addresses
	for _, s := range cfg.AnnounceAddrs {
		s = strings.TrimSpace(s)
		if ip, err := netip.ParseAddr(s); err == nil {
			if ip.IsUnspecified() || ip.Zone() != "" {
				return nil, fmt.Errorf("announce address %q is unspecified or has a zone", s)
			}
			pc.announceIPs = append(pc.announceIPs, ip.Unmap())
			continue
		}
		addr, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("parsing announce address %q: neither an IP nor a multiaddr: %w", s, err)
		}
		if _, err := addr.ValueForProtocol(ma.P_P2P); err == nil {
			return nil, fmt.Errorf("announce address %q must not contain /p2p", s)
		}
		pc.announceFull = append(pc.announceFull, addr)
	}

	// bootstrap sources
	var staticAddrs []ma.Multiaddr
	for _, s := range cfg.BootstrapStatic {
		addr, err := ma.NewMultiaddr(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("parsing static bootstrap address %q: %w", s, err)
		}
		staticAddrs = append(staticAddrs, addr)
	}
	if len(staticAddrs) > 0 {
		infos, err := peer.AddrInfosFromP2pAddrs(staticAddrs...)
		if err != nil {
			return nil, fmt.Errorf("parsing static bootstrap addresses (each needs /p2p/<peer ID>): %w", err)
		}
		pc.static = infos
	}
	if cfg.NetworkKeyFile != "" {
		for _, group := range []struct {
			what  string
			addrs []ma.Multiaddr
		}{{"listen", pc.listenAddrs}, {"announce", pc.announceFull}, {"static bootstrap", staticAddrs}} {
			for _, addr := range group.addrs {
				if !isTCP(addr) {
					return nil, fmt.Errorf("%s address %s is not TCP: with a network key libp2p "+
						"runs over TCP only (private networks do not work over QUIC)", group.what, addr)
				}
			}
		}
	}
	for _, name := range cfg.BootstrapDNS {
		name = strings.TrimSpace(name)
		if name == "" || strings.ContainsAny(name, "/: ") {
			return nil, fmt.Errorf("bootstrap dns name %q is not a plain host name", name)
		}
		pc.dnsNames = append(pc.dnsNames, name)
	}
	for _, s := range cfg.BootstrapHTTP {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("parsing bootstrap url %q: %w", s, err)
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("bootstrap url %q: want an absolute http or https url", s)
		}
		pc.httpURLs = append(pc.httpURLs, u.String())
	}

	// clients
	if pc.Resolver == nil {
		pc.Resolver = net.DefaultResolver
	}
	if pc.HTTPClient == nil {
		dialer := &net.Dialer{Timeout: defaultHTTPTimeout, Resolver: pc.Resolver}
		pc.HTTPClient = &http.Client{
			Timeout: defaultHTTPTimeout,
			Transport: &http.Transport{
				Proxy:       nil,
				DialContext: dialer.DialContext,
				// Bootstrap fetches are rare: keep no idle connection (and
				// no goroutine) between them.
				DisableKeepAlives:     true,
				ResponseHeaderTimeout: defaultHTTPTimeout,
			},
		}
		pc.ownHTTPClient = true
	}
	return pc, nil
}
