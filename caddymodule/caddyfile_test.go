package caddymodule

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

// TestCaddyfileAdapt adapts each testdata/caddyfile_adapt/*.caddyfiletest:
// a Caddyfile, a line of dashes, then the JSON it must become, or the text
// "error: <substring>" when adapting must fail with that message.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no adapt tests found: %v", err)
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, want, ok := strings.Cut(string(raw), "\n----------\n")
			if !ok {
				t.Fatalf("%s: no ---------- separator", file)
			}
			got, _, err := adapter.Adapt([]byte(input), map[string]any{"filename": file})
			want = strings.TrimSpace(want)
			if msg, isErr := strings.CutPrefix(want, "error: "); isErr {
				if err == nil || !strings.Contains(err.Error(), msg) {
					t.Fatalf("adapting: error = %v, want one containing %q", err, msg)
				}
				return
			}
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			var gotBuf, wantBuf bytes.Buffer
			if err := json.Indent(&gotBuf, got, "", "\t"); err != nil {
				t.Fatal(err)
			}
			if err := json.Indent(&wantBuf, []byte(want), "", "\t"); err != nil {
				t.Fatalf("expected JSON in %s: %v", file, err)
			}
			if gotBuf.String() != wantBuf.String() {
				t.Fatalf("adapted JSON differs\n--- got\n%s\n--- want\n%s", gotBuf.String(), wantBuf.String())
			}
		})
	}
}
