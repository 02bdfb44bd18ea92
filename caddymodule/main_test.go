package caddymodule

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that no test leaves goroutines behind: peer fetches
// that failed, stalled or were cut, lookups, hedged attempts and their
// bodies must all end with their requests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// testenv starts every child process from one goroutine locked to
		// its OS thread for the life of the test binary
		goleak.IgnoreTopFunction("github.com/peermirror/peermirror/internal/testenv.spawn.func1.1"),
		// caddy's global state: its logger sink and the admin's timers
		goleak.IgnoreAnyFunction("github.com/caddyserver/caddy/v2.(*fileWriter).OpenWriter"),
	)
}
