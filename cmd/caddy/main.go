// Command caddy is a full Caddy build: Caddy's standard modules plus the
// peermirror plugin.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/peermirror/peermirror/caddymodule"
)

func main() {
	caddycmd.Main()
}
