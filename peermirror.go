// Package peermirror is the Caddy plugin: importing it registers the
// peermirror app and the http.handlers.peermirror handler, which is what
// `xcaddy build --with github.com/peermirror/peermirror` does. The code
// lives in caddymodule, contentstore and dht.
package peermirror

import (
	// registers the Caddy modules
	_ "github.com/peermirror/peermirror/caddymodule"
)
