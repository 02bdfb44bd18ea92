package caddytest

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// browser starts a headless Chromium for the test and returns a context
// for driving it. The binary is PEERMIRROR_CHROMIUM, else chromium on
// PATH (make tools installs Debian's package).
func browser(t *testing.T) context.Context {
	t.Helper()
	bin := os.Getenv("PEERMIRROR_CHROMIUM")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("chromium"); err != nil {
			t.Fatalf("no chromium on PATH (run make tools, or set PEERMIRROR_CHROMIUM): %v", err)
		}
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 1000),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	// a generous hang detector for the whole browser session
	ctx, cancelTimeout := context.WithTimeout(ctx, 3*time.Minute)
	t.Cleanup(func() {
		cancelTimeout()
		cancelCtx()
		cancelAlloc()
	})
	return ctx
}

// text returns the text shown in the element sel selects.
func text(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	s, err := chromedp.Run(ctx, chromedp.Text(sel))
	if err != nil {
		t.Fatalf("reading %s: %v", sel, err)
	}
	return s
}

// artifactDir is where tests keep files for a person to look at:
// PEERMIRROR_ARTIFACTS, else .artifacts at the repository's root.
func artifactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("PEERMIRROR_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join("..", ".artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(dir)
	return abs
}

// TestDebugPage drives the debug page in headless Chromium on a node that
// has one peer: the page shows the peer, a measure of an image that only
// the peer holds lists every manifest and blob as served by that peer with
// its digest checked, and a measure of a missing image shows the miss.
func TestDebugPage(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/debug", "v1", 3, 1<<20)
	a := startNode(t, "A", reg, "")
	debugPort := testenv.FreePort(t)
	b := testenv.StartNode(t, "B", upstreamHost, reg.URL, testenv.NodeOptions{
		Bootstrap: []string{a.Mirror.URL + dht.PeerListPath},
		Sites:     fmt.Sprintf("\n:%d {\n\tbind 127.0.0.1\n\tpeermirror_debug\n}\n", debugPort),
	})
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitServable(t, b, tagPath(img))
	page := "http://127.0.0.1:" + strconv.Itoa(debugPort) + "/"

	// the page refuses what it does not serve
	if resp, _, err := fetch(t, http.MethodPost, page); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST to the debug page: %v, %v; want 405", resp, err)
	}

	ctx := browser(t)
	if err := chromedp.Do(ctx, chromedp.Navigate(page), chromedp.WaitVisible("#measure-form")); err != nil {
		t.Fatalf("loading the debug page: %v", err)
	}
	peers, node := text(t, ctx, "#peer-count"), text(t, ctx, "#node")
	if strings.TrimSpace(peers) != "1" {
		t.Errorf("peer count shown: %q, want 1", peers)
	}
	if !strings.Contains(node, peerID(t, b)) || !strings.Contains(node, "connected") {
		t.Errorf("node section does not show B's peer ID and containerd:\n%s", node)
	}

	// measure: typed in and submitted as a person would
	if err := chromedp.Do(ctx,
		chromedp.SendKeys("#measure-ref", img.Ref(upstreamHost)),
		chromedp.Click("#measure-run"),
		chromedp.WaitVisible("#measure-table"),
	); err != nil {
		t.Fatalf("running a measure: %v", err)
	}
	result := text(t, ctx, "#measure-result")
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[[]string](
		`Array.from(document.querySelectorAll("tr.measure-row")).map(r => r.innerText)`))
	if err != nil {
		t.Fatalf("reading the measure's rows: %v", err)
	}
	if shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100)); err != nil {
		t.Errorf("screenshot: %v", err)
	} else {
		file := filepath.Join(artifactDir(t), "debug-page.png")
		if err := os.WriteFile(file, shot, 0o644); err != nil {
			t.Error(err)
		}
		t.Logf("screenshot of the measure: %s", file)
	}
	t.Logf("measure:\n%s", result)
	want := 2 + len(img.Layers) // manifest, config, layers
	if len(rows) != want {
		t.Fatalf("measure shows %d rows, want %d:\n%s", len(rows), want, result)
	}
	aID := peerID(t, a)
	for i, r := range rows {
		cells := strings.Split(r, "\t")
		if len(cells) != 11 {
			t.Errorf("row %d has %d cells: %q", i, len(cells), r)
			continue
		}
		kind, source, status, firstByte, total, check := cells[0], cells[5], cells[6], cells[7], cells[8], cells[10]
		wantKind := map[int]string{0: "manifest", 1: "config"}[i]
		if wantKind == "" {
			wantKind = "layer"
		}
		if kind != wantKind || status != "200" || check != "ok" {
			t.Errorf("row %d: kind %q status %q check %q; want %s, 200, ok", i, kind, status, check, wantKind)
		}
		// the source cell shortens the peer ID to its ends
		if !strings.HasPrefix(source, "peer ") || !strings.HasSuffix(aID, source[len(source)-6:]) {
			t.Errorf("row %d: source %q, want peer %s", i, source, aID)
		}
		for _, ms := range []string{firstByte, total} {
			if v, err := strconv.ParseFloat(ms, 64); err != nil || v <= 0 {
				t.Errorf("row %d: timing %q is not a positive number of ms", i, ms)
			}
		}
	}

	// a reference nobody holds, and one that does not parse
	if err := chromedp.Do(ctx, chromedp.Navigate(page+"?measure="+upstreamHost+"/team/none:v9"),
		chromedp.WaitVisible("#measure-table")); err != nil {
		t.Fatalf("measuring a missing image: %v", err)
	}
	missing := text(t, ctx, "#measure-result")
	if err := chromedp.Do(ctx, chromedp.Navigate(page+"?measure=UPPER/Case::x"),
		chromedp.WaitVisible("#measure-error")); err != nil {
		t.Fatalf("measuring a bad reference: %v", err)
	}
	bad := text(t, ctx, "#measure-error")
	if !strings.Contains(missing, "miss") || !strings.Contains(missing, "404") {
		t.Errorf("measure of a missing image:\n%s", missing)
	}
	if !strings.Contains(bad, "not an image reference") {
		t.Errorf("measure of a bad reference: %q", bad)
	}

	// the requests the measure made are listed, by source
	if err := chromedp.Do(ctx, chromedp.Navigate(page), chromedp.WaitVisible("#requests")); err != nil {
		t.Fatal(err)
	}
	peerCount, requests := text(t, ctx, "#requests-peer"), text(t, ctx, "#requests")
	if n, _ := strconv.Atoi(strings.TrimSpace(peerCount)); n < want {
		t.Errorf("page counts %q requests served from peers, want at least %d", peerCount, want)
	}
	if !strings.Contains(requests, img.Layers[0].Encoded()[:12]) {
		t.Errorf("latest requests do not list layer %s:\n%s", img.Layers[0], requests)
	}
}
