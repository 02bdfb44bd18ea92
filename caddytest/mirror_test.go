// Package caddytest runs a real Caddy built with the peermirror plugin,
// started through its own Caddyfile, against real containerd instances and
// a real distribution registry.
package caddytest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/internal/testenv"
)

// upstreamHost is the registry name images carry. Node A maps it to the
// real registry; node B maps it to a dead port, behind our mirror.
const upstreamHost = "registry.test"

// mirrorCaddyfile returns a Caddyfile serving containerd at socket.
func mirrorCaddyfile(socket string) func(port int, admin string) string {
	return func(port int, admin string) string {
		return fmt.Sprintf(`{
	admin %s
	debug
	peermirror {
		containerd {
			address %s
			namespace k8s.io
		}
		registries %s
	}
}

:%d {
	peermirror
}
`, admin, socket, upstreamHost, port)
	}
}

// deadUpstream returns the URL of a loopback port where nothing listens.
func deadUpstream(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr
}

func skipShort(t *testing.T) {
	if testing.Short() {
		t.Skip("runs containerd, a registry and Caddy; skipped with -short")
	}
}

// TestPullThroughMirror is the single-node mirror end to end: containerd B,
// whose upstream is unreachable, pulls images through our Caddy, which
// serves them from containerd A's store; with ctr and through the CRI.
func TestPullThroughMirror(t *testing.T) {
	skipShort(t)
	a := testenv.StartContainerd(t)
	b := testenv.StartContainerd(t)
	reg := testenv.StartRegistry(t)

	oci := reg.PushRandomImage(t, "team/app", "v1", 3, 512<<10)
	multi := reg.PushIndex(t, "team/multi", "v2", []string{testenv.LocalPlatform(), otherPlatform()}, 2, 128<<10)
	docker := reg.PushDockerImage(t, "library/tool", "1.0", 2, 256<<10)
	for _, img := range []testenv.Image{oci, multi, docker} {
		a.PullFromRegistry(t, reg, upstreamHost, img)
	}
	reg.Stop(t) // from here on, only the mirror has the images

	mirror := testenv.StartCaddy(t, mirrorCaddyfile(a.Socket))
	b.WriteHostsToml(t, upstreamHost, deadUpstream(t), mirror.URL)

	// ctr, through the transfer service, for an image and an index
	for _, img := range []testenv.Image{oci, multi} {
		b.PullRef(t, img.Ref(upstreamHost))
		checkImage(t, b, img)
	}
	// the kubelet's way: CRI
	if out, err := b.Crictl(t, "pull", docker.Ref(upstreamHost)); err != nil {
		t.Fatalf("crictl pull through the mirror: %v\n%s", err, out)
	}
	checkImage(t, b, docker)

	// every blob B holds came from the mirror, none from elsewhere
	for _, d := range docker.All() {
		if len(mirror.LogLines(`"msg":"served"`, d.String())) == 0 {
			t.Errorf("mirror log has no served line for %s", d)
		}
	}
}

// checkImage checks that c holds img under its reference, pointing at the
// same root digest, with every digest a pull of the local platform needs.
func checkImage(t *testing.T, c *testenv.Containerd, img testenv.Image) {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), c.Namespace)
	cl := c.Client(t)
	rec, err := cl.ImageService().Get(ctx, img.Ref(upstreamHost))
	if err != nil {
		t.Fatalf("image %s not in containerd: %v", img.Ref(upstreamHost), err)
	}
	if rec.Target.Digest != img.Digest {
		t.Fatalf("image %s points at %s, want %s", rec.Name, rec.Target.Digest, img.Digest)
	}
	for _, d := range img.PlatformDigests(testenv.LocalPlatform()) {
		if _, err := cl.ContentStore().Info(ctx, d); err != nil {
			t.Errorf("digest %s of %s missing after the pull: %v", d, rec.Name, err)
		}
	}
}

func otherPlatform() string {
	if testenv.LocalPlatform() == "linux/arm64" {
		return "linux/amd64"
	}
	return "linux/arm64"
}

// TestContainerdRestart kills containerd under a running Caddy: the mirror
// keeps answering (with fast 404s) and serves content again once
// containerd is back, without a restart of Caddy.
func TestContainerdRestart(t *testing.T) {
	skipShort(t)
	a := testenv.StartContainerd(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/restart", "v1", 1, 64<<10)
	a.PullFromRegistry(t, reg, upstreamHost, img)
	mirror := testenv.StartCaddy(t, mirrorCaddyfile(a.Socket))

	blob := "/v2/team/restart/blobs/" + img.Layers[0].String() + "?ns=" + upstreamHost
	tag := "/v2/team/restart/manifests/v1?ns=" + upstreamHost
	expectBlob(t, mirror, blob, img.Layers[0])

	a.Kill(t)
	for _, path := range []string{blob, tag} {
		start := time.Now()
		resp, body := mirror.Get(t, path)
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("GET %s with containerd down = %d %s, want 404", path, resp.StatusCode, body)
		}
		// a hang detector, not a target: a miss must not wait on containerd
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("404 took %s with containerd down", d)
		}
	}

	a.Restart(t)
	deadline := time.Now().Add(60 * time.Second) // hang detector
	for {
		resp, _ := mirror.Get(t, tag)
		if resp.StatusCode == http.StatusOK {
			if got := resp.Header.Get("Docker-Content-Digest"); got != img.Digest.String() {
				t.Fatalf("after restart the tag resolves to %s, want %s", got, img.Digest)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("mirror still answers %d for %s after containerd came back", resp.StatusCode, tag)
		}
		time.Sleep(100 * time.Millisecond)
	}
	expectBlob(t, mirror, blob, img.Layers[0])
	// the watcher follows containerd's events again too
	for len(mirror.LogLines("connected to containerd")) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the mirror never logged its reconnect to containerd")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func expectBlob(t *testing.T, mirror *testenv.Caddy, path string, d digest.Digest) {
	t.Helper()
	resp, body := mirror.Get(t, path)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s = %d %s", path, resp.StatusCode, body)
	}
	if got := digest.FromBytes(body); got != d {
		t.Fatalf("GET %s: body digest %s, want %s", path, got, d)
	}
}

// TestValidateWithoutContainerd checks that `caddy validate` provisions the
// config without dialling anything: it must pass with no containerd.
func TestValidateWithoutContainerd(t *testing.T) {
	skipShort(t)
	out, err := testenv.RunCaddy(t, "validate", "--adapter", "caddyfile", "--config",
		testenv.WriteFile(t, "Caddyfile", mirrorCaddyfile("/nonexistent/containerd.sock")(30020, "127.0.0.1:0")))
	if err != nil || !strings.Contains(out, "Valid configuration") {
		t.Fatalf("caddy validate: %v\n%s", err, out)
	}
}

// TestListModules checks that the binary carries both modules.
func TestListModules(t *testing.T) {
	skipShort(t)
	out, err := testenv.RunCaddy(t, "list-modules")
	if err != nil {
		t.Fatalf("caddy list-modules: %v\n%s", err, out)
	}
	for _, m := range []string{"peermirror", "http.handlers.peermirror"} {
		if !strings.Contains("\n"+out+"\n", "\n"+m+"\n") {
			t.Errorf("list-modules does not show %s", m)
		}
	}
}

// TestProbes checks liveness and readiness: ready while containerd
// answers, not ready (but alive) while it is down.
func TestProbes(t *testing.T) {
	skipShort(t)
	a := testenv.StartContainerd(t)
	mirror := testenv.StartCaddy(t, mirrorCaddyfile(a.Socket))
	const live, ready = "/.well-known/peermirror/v1/live", "/.well-known/peermirror/v1/ready"
	waitStatus := func(path string, want int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second) // hang detector
		for {
			resp, body := mirror.Get(t, path)
			if resp.StatusCode == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET %s = %d %s, want %d", path, resp.StatusCode, body, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitStatus(ready, http.StatusOK)
	waitStatus(live, http.StatusOK)
	a.Kill(t)
	waitStatus(ready, http.StatusServiceUnavailable)
	waitStatus(live, http.StatusOK)
	a.Restart(t)
	waitStatus(ready, http.StatusOK)
}

// TestMetricsAcrossReload checks the peermirror collectors on Caddy's
// /metrics, and that they keep counting after a config reload.
func TestMetricsAcrossReload(t *testing.T) {
	skipShort(t)
	a := testenv.StartContainerd(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/metrics", "v1", 1, 64<<10)
	a.PullFromRegistry(t, reg, upstreamHost, img)
	site := mirrorCaddyfile(a.Socket)
	mirror := testenv.StartCaddy(t, site)
	blob := "/v2/team/metrics/blobs/" + img.Layers[0].String() + "?ns=" + upstreamHost

	metric := func(name string) float64 {
		t.Helper()
		resp, err := testenv.HTTPClient().Get("http://" + mirror.AdminAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, line := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(line, name+" ") {
				v, err := strconv.ParseFloat(strings.TrimPrefix(line, name+" "), 64)
				if err != nil {
					t.Fatalf("metric line %q: %v", line, err)
				}
				return v
			}
		}
		t.Fatalf("no %s in /metrics:\n%s", name, body)
		return 0
	}
	const served = `peermirror_requests_total{kind="blob",method="GET",registry="registry.test",source="local"}`
	const missed = `peermirror_requests_total{kind="blob",method="GET",registry="registry.test",source="miss"}`
	expectBlob(t, mirror, blob, img.Layers[0])
	expectBlob(t, mirror, blob, img.Layers[0])
	if got := metric(served); got != 2 {
		t.Fatalf("%s = %v, want 2", served, got)
	}
	if got := metric(`peermirror_response_bytes_total{source="local"}`); got != float64(2*img.Sizes[img.Layers[0]]) {
		t.Fatalf("bytes served = %v, want %d", got, 2*img.Sizes[img.Layers[0]])
	}
	if got := metric("peermirror_containerd_connected"); got != 1 {
		t.Fatalf("containerd_connected = %v", got)
	}

	// reload with a changed setting: the counters go on from where they were
	reloaded := strings.Replace(site(mirror.Port, mirror.AdminAddr), "registries "+upstreamHost,
		"registries "+upstreamHost+"\n\t\tresolve_timeout 70ms", 1)
	req, _ := http.NewRequest(http.MethodPost, "http://"+mirror.AdminAddr+"/load", strings.NewReader(reloaded))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := testenv.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reload: %d %s", resp.StatusCode, body)
	}
	// the old config's server closes its idle connections as it stops
	testenv.HTTPClient().CloseIdleConnections()
	expectBlob(t, mirror, blob, img.Layers[0])
	if got := metric(served); got != 3 {
		t.Fatalf("after reload %s = %v, want 3", served, got)
	}
	resp, _ = mirror.Get(t, "/v2/team/metrics/blobs/"+digest.FromString("absent").String()+"?ns="+upstreamHost)
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("absent blob: %d", resp.StatusCode)
	}
	if got := metric(missed); got != 1 {
		t.Fatalf("%s = %v, want 1", missed, got)
	}
	if got := metric("peermirror_containerd_connected"); got != 1 {
		t.Fatalf("containerd_connected after reload = %v", got)
	}
}
