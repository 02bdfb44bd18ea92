package caddymodule

import (
	"math"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("peermirror", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("peermirror", parseHandlerDirective)
	// the mirror answers /v2 itself and passes everything else on, so it
	// sits before the handlers that would answer every path
	httpcaddyfile.RegisterDirectiveOrder("peermirror", httpcaddyfile.Before, "reverse_proxy")
}

// parseGlobalOption sets up the peermirror app from the global option
// block:
//
//	{
//		peermirror {
//			containerd {
//				address     <socket>
//				namespace   <namespace>
//				content_dir <dir>
//			}
//			registries <host...>
//		}
//	}
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	app := new(App)
	if existing != nil {
		return nil, d.Err("the peermirror global option may appear only once")
	}
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "peermirror", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile reads the peermirror global option block.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the option name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "containerd":
			if d.NextArg() {
				return d.ArgErr()
			}
			if a.Containerd == nil {
				a.Containerd = new(ContainerdConfig)
			}
			for d.NextBlock(1) {
				key := d.Val()
				var dest *string
				switch key {
				case "address":
					dest = &a.Containerd.Address
				case "namespace":
					dest = &a.Containerd.Namespace
				case "content_dir":
					dest = &a.Containerd.ContentDir
				default:
					return d.Errf("unrecognized containerd subdirective %q", key)
				}
				if !d.NextArg() {
					return d.ArgErr()
				}
				*dest = d.Val()
				if d.NextArg() {
					return d.ArgErr()
				}
			}
		case "registries", "private_registries":
			key := d.Val()
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if key == "registries" {
				a.Registries = append(a.Registries, args...)
			} else {
				a.PrivateRegistries = append(a.PrivateRegistries, args...)
			}
		case "peer_tls":
			if d.NextArg() {
				return d.ArgErr()
			}
			a.PeerTLS = new(PeerTLS)
			for nesting := d.Nesting(); d.NextBlock(nesting); {
				key := d.Val()
				dest := map[string]*string{"ca": &a.PeerTLS.CAFile, "cert": &a.PeerTLS.CertFile,
					"key": &a.PeerTLS.KeyFile}[key]
				if dest == nil {
					return d.Errf("unrecognized peer_tls subdirective %q", key)
				}
				if !d.AllArgs(dest) {
					return d.ArgErr()
				}
			}
		case "peer_auth":
			var user, pass string
			if !d.AllArgs(&user, &pass) {
				return d.ArgErr()
			}
			a.PeerAuth = &PeerAuth{Username: user, Password: pass}
		case "max_uploads":
			n, err := intArg(d)
			if err != nil {
				return err
			}
			a.MaxUploads = n
		case "upload_rate":
			var raw string
			if !d.AllArgs(&raw) {
				return d.ArgErr()
			}
			n, err := humanize.ParseBytes(raw)
			if err != nil || n > math.MaxInt64 {
				return d.Errf("upload_rate: %q is not a number of bytes per second, such as 100MB", raw)
			}
			a.UploadRate = int64(n)
		case "dht":
			if d.NextArg() {
				return d.ArgErr()
			}
			if a.DHT == nil {
				a.DHT = new(DHTConfig)
			}
			if err := a.DHT.unmarshalCaddyfile(d); err != nil {
				return err
			}
		case "resolve_timeout", "hedge_delay", "peer_timeout":
			key := d.Val()
			dur, err := durationArg(d)
			if err != nil {
				return err
			}
			*map[string]*caddy.Duration{"resolve_timeout": &a.ResolveTimeout,
				"hedge_delay": &a.HedgeDelay, "peer_timeout": &a.PeerTimeout}[key] = dur
		case "filter_reference":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			a.FilterReferences = append(a.FilterReferences, args...)
		case "resolve_tags", "coordinate_pulls":
			name := d.Val()
			if !d.NextArg() {
				return d.ArgErr()
			}
			v, err := strconv.ParseBool(d.Val())
			if err != nil {
				return d.Errf("%s: %v", name, err)
			}
			if name == "resolve_tags" {
				a.ResolveTags = &v
			} else {
				a.CoordinatePulls = &v
			}
			if d.NextArg() {
				return d.ArgErr()
			}
		case "max_peers":
			n, err := intArg(d)
			if err != nil {
				return err
			}
			a.MaxPeers = n
		default:
			return d.Errf("unrecognized peermirror option %q", d.Val())
		}
	}
	return nil
}

// unmarshalCaddyfile reads the dht block of the peermirror option.
func (c *DHTConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		key := d.Val()
		lists := map[string]*[]string{
			"listen":           &c.Listen,
			"announce":         &c.Announce,
			"bootstrap_static": &c.BootstrapStatic,
			"bootstrap_dns":    &c.BootstrapDNS,
			"bootstrap_http":   &c.BootstrapHTTP,
		}
		switch key {
		case "listen", "announce", "bootstrap_static", "bootstrap_dns", "bootstrap_http":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			*lists[key] = append(*lists[key], args...)
		case "key_file":
			if !d.AllArgs(&c.KeyFile) {
				return d.ArgErr()
			}
		case "network_key_file":
			if !d.AllArgs(&c.NetworkKeyFile) {
				return d.ArgErr()
			}
		case "mirror_port", "bootstrap_port":
			key := d.Val()
			n, err := intArg(d)
			if err != nil {
				return err
			}
			if key == "mirror_port" {
				c.MirrorPort = n
			} else {
				c.BootstrapPort = n
			}
		case "conn_low", "conn_high", "max_inbound_conns", "max_inbound_streams":
			n, err := intArg(d)
			if err != nil {
				return err
			}
			*map[string]*int{
				"conn_low":            &c.ConnLow,
				"conn_high":           &c.ConnHigh,
				"max_inbound_conns":   &c.MaxInboundConns,
				"max_inbound_streams": &c.MaxInboundStreams,
			}[key] = n
		case "record_ttl", "reprovide_interval":
			dur, err := durationArg(d)
			if err != nil {
				return err
			}
			if key == "record_ttl" {
				c.RecordTTL = dur
			} else {
				c.ReprovideInterval = dur
			}
		default:
			return d.Errf("unrecognized dht subdirective %q", key)
		}
	}
	return nil
}

// durationArg reads the single duration argument of the current line.
func durationArg(d *caddyfile.Dispenser) (caddy.Duration, error) {
	key := d.Val()
	var raw string
	if !d.AllArgs(&raw) {
		return 0, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(raw)
	if err != nil {
		return 0, d.Errf("%s: %v", key, err)
	}
	return caddy.Duration(dur), nil
}

// intArg reads the single integer argument of the current line.
func intArg(d *caddyfile.Dispenser) (int, error) {
	key := d.Val()
	var raw string
	if !d.AllArgs(&raw) {
		return 0, d.ArgErr()
	}
	n, err := strconv.Atoi(raw)
	if err != nil {
		return 0, d.Errf("%s: %v", key, err)
	}
	return n, nil
}

// parseHandlerDirective sets up the mirror handler in a site block:
//
//	peermirror
func parseHandlerDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile reads the peermirror handler directive; the app
// holds the configuration, the handler only where its requests come from:
//
//	peermirror {
//		peers_only
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "peers_only":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.PeersOnly = true
		default:
			return d.Errf("unrecognized peermirror handler subdirective %q", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
