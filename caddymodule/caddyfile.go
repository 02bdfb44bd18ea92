package caddymodule

import (
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
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
		case "registries":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			a.Registries = append(a.Registries, args...)
		default:
			return d.Errf("unrecognized peermirror option %q", d.Val())
		}
	}
	return nil
}

// parseHandlerDirective sets up the mirror handler in a site block:
//
//	peermirror
func parseHandlerDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return handler, err
}

// UnmarshalCaddyfile reads the peermirror handler directive, which takes
// no arguments: the app holds the configuration.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	if d.NextBlock(0) {
		return d.Errf("unrecognized peermirror handler subdirective %q", d.Val())
	}
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
