package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

const testRegistryHost = "registry.test"

// TestHarness starts two containerds and a registry, pushes every image kind,
// pulls them with ctr and CRI and checks what landed in the content stores.
func TestHarness(t *testing.T) {
	reg := StartRegistry(t)
	a := StartContainerd(t)
	b := StartContainerd(t)
	if a.Socket == b.Socket || a.Root == b.Root {
		t.Fatalf("two containerds share paths: %+v %+v", a, b)
	}

	oci := reg.PushRandomImage(t, "team/app", "oci", 2, 64<<10)
	docker := reg.PushDockerImage(t, "team/docker", "v1", 3, 32<<10)
	nonLocal := "linux/arm64/v8"
	if LocalPlatform() == "linux/arm64" {
		nonLocal = "linux/amd64"
	}
	index := reg.PushIndex(t, "team/multi", "v1", []string{LocalPlatform(), nonLocal}, 2, 16<<10)

	checkImageDescription(t, oci, string(types.OCIManifestSchema1), 2)
	checkImageDescription(t, docker, string(types.DockerManifestSchema2), 3)
	checkIndexDescription(t, index, []string{LocalPlatform(), nonLocal}, 2)

	ca := a.Client(t)
	for _, img := range []Image{oci, docker, index} {
		before := len(reg.Requests())
		out := a.PullFromRegistry(t, reg, testRegistryHost, img)
		t.Logf("ctr pull %s: ...%s", img.Ref(testRegistryHost), lastLine(out))
		checkPulled(t, ca, img)
		checkRegistryServed(t, reg, img, before)
	}

	// ctr fetches every platform's manifest and config of an index, but only
	// the local platform's layers.
	ctx := context.Background()
	for _, d := range append(append([]digest.Digest{}, index.Manifests...), index.Configs...) {
		if _, err := ca.ContentStore().Info(ctx, d); err != nil {
			t.Errorf("index pull: %s (%s) not in content store: %v", d, index.MediaTypes[d], err)
		}
	}
	for _, d := range index.LayersFor[nonLocal] {
		if _, err := ca.ContentStore().Info(ctx, d); !errdefs.IsNotFound(err) {
			t.Errorf("index pull: non-local layer %s: want not found, got %v", d, err)
		}
	}

	// A graceful restart keeps images and content; the old client reconnects.
	a.Restart(t)
	for _, img := range []Image{oci, docker, index} {
		checkPulled(t, ca, img)
	}
	// So does a crash.
	a.Kill(t)
	if a.Running() {
		t.Fatal("containerd still running after Kill")
	}
	a.Restart(t)
	for _, img := range []Image{oci, docker, index} {
		checkPulled(t, a.Client(t), img)
	}

	// ctr output of the image list mentions the pulled references.
	out, err := a.Ctr(t, "images", "ls", "-q")
	if err != nil {
		t.Fatalf("ctr images ls: %v\n%s", err, out)
	}
	for _, img := range []Image{oci, docker, index} {
		if !strings.Contains(out, img.Ref(testRegistryHost)) {
			t.Errorf("ctr images ls -q does not list %s:\n%s", img.Ref(testRegistryHost), out)
		}
	}

	t.Run("CRI", func(t *testing.T) {
		b.WriteHostsToml(t, testRegistryHost, reg.URL)
		cb := b.Client(t)
		for _, img := range []Image{oci, docker, index} {
			ref := img.Ref(testRegistryHost)
			before := len(reg.Requests())
			out, err := b.Crictl(t, "pull", ref)
			if err != nil {
				t.Fatalf("crictl pull %s: %v\n%s", ref, err, out)
			}
			t.Logf("crictl pull %s: %s", ref, strings.TrimSpace(out))
			checkPulled(t, cb, img)
			checkRegistryServed(t, reg, img, before)
		}
		out, err := b.Crictl(t, "images", "--digests")
		if err != nil {
			t.Fatalf("crictl images: %v\n%s", err, out)
		}
		t.Logf("crictl images:\n%s", out)
		if !strings.Contains(out, testRegistryHost+"/"+oci.Repo) {
			t.Errorf("crictl images does not list %s", oci.Repo)
		}
	})

	t.Run("MirrorFirst", func(t *testing.T) {
		// The upstream is a loopback port nobody listens on: the pull can
		// only succeed through the mirror.
		dead := fmt.Sprintf("http://127.0.0.1:%d", FreePort(t))
		img := reg.PushRandomImage(t, "team/mirrored", "v1", 1, 4<<10)
		b.WriteHostsToml(t, "upstream.test", dead, reg.URL)
		before := len(reg.Requests())
		out, err := b.Crictl(t, "pull", img.Ref("upstream.test"))
		if err != nil {
			t.Fatalf("crictl pull through mirror: %v\n%s", err, out)
		}
		checkPulled(t, b.Client(t), img)
		checkRegistryServed(t, reg, img, before)
		// containerd tells a mirror which registry it stands for.
		var withNS bool
		for _, q := range reg.Requests()[before:] {
			if strings.Contains(q, "ns=upstream.test") {
				withNS = true
			}
		}
		if !withNS {
			t.Errorf("no mirror request carried ?ns=upstream.test: %v", reg.Requests()[before:])
		}

		// ctr with --hosts-dir goes through the mirror too.
		a.WriteHostsToml(t, "upstream.test", dead, reg.URL)
		before = len(reg.Requests())
		a.PullRef(t, img.Ref("upstream.test"))
		checkPulled(t, a.Client(t), img)
		checkRegistryServed(t, reg, img, before)
	})

	t.Run("AllPlatforms", func(t *testing.T) {
		c := StartContainerd(t)
		c.PullFromRegistryAllPlatforms(t, reg, testRegistryHost, index)
		cl := c.Client(t)
		checkPulled(t, cl, index)
		for _, d := range index.All() {
			info, err := cl.ContentStore().Info(context.Background(), d)
			if err != nil {
				t.Errorf("all-platforms pull: %s (%s) missing: %v", d, index.MediaTypes[d], err)
				continue
			}
			if info.Size != index.Sizes[d] {
				t.Errorf("all-platforms pull: %s size %d, want %d", d, info.Size, index.Sizes[d])
			}
		}
		c.Stop(t)
		if c.Running() {
			t.Fatal("containerd still running after Stop")
		}
		c.Stop(t) // idempotent
	})
}

// checkImageDescription checks an Image of a single manifest.
func checkImageDescription(t *testing.T, img Image, mediaType string, layers int) {
	t.Helper()
	if img.MediaType != mediaType || img.MediaTypes[img.Digest] != mediaType {
		t.Errorf("%s: media type %q, want %q", img.Repo, img.MediaType, mediaType)
	}
	if len(img.Manifests) != 1 || img.Manifests[0] != img.Digest || len(img.Configs) != 1 || len(img.Layers) != layers {
		t.Errorf("%s: tree %d manifests, %d configs, %d layers; want 1, 1, %d", img.Repo, len(img.Manifests), len(img.Configs), len(img.Layers), layers)
	}
	for _, d := range img.All() {
		if err := d.Validate(); err != nil {
			t.Errorf("%s: bad digest %q: %v", img.Repo, d, err)
		}
		if img.Sizes[d] <= 0 || img.MediaTypes[d] == "" {
			t.Errorf("%s: %s has size %d, media type %q", img.Repo, d, img.Sizes[d], img.MediaTypes[d])
		}
	}
	if got := img.LayersFor[LocalPlatform()]; !slices.Equal(got, img.Layers) {
		t.Errorf("%s: LayersFor[%s] = %v, want %v", img.Repo, LocalPlatform(), got, img.Layers)
	}
}

// checkIndexDescription checks an Image of an index.
func checkIndexDescription(t *testing.T, img Image, platforms []string, layers int) {
	t.Helper()
	if img.MediaType != string(types.OCIImageIndex) || !img.IsIndex() {
		t.Errorf("index media type %q", img.MediaType)
	}
	if !slices.Equal(img.Platforms, platforms) {
		t.Errorf("index platforms %v, want %v", img.Platforms, platforms)
	}
	if len(img.Manifests) != 1+len(platforms) || len(img.Configs) != len(platforms) || len(img.Layers) != layers*len(platforms) {
		t.Errorf("index tree %d manifests, %d configs, %d layers", len(img.Manifests), len(img.Configs), len(img.Layers))
	}
	for i, p := range platforms {
		if img.ManifestFor[p] != img.Manifests[i+1] {
			t.Errorf("ManifestFor[%s] = %s, want %s", p, img.ManifestFor[p], img.Manifests[i+1])
		}
		if img.MediaTypes[img.ManifestFor[p]] != string(types.OCIManifestSchema1) {
			t.Errorf("manifest for %s has media type %q", p, img.MediaTypes[img.ManifestFor[p]])
		}
	}
	if n := len(img.PlatformDigests(LocalPlatform())); n != 3+layers {
		t.Errorf("PlatformDigests(%s) has %d digests, want %d", LocalPlatform(), n, 3+layers)
	}
}

// checkPulled checks that the containerd behind cl has an image record for
// img whose target is img's root, and the local platform's content.
func checkPulled(t *testing.T, cl *client.Client, img Image) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ref := img.Ref(testRegistryHost)
	rec, err := cl.ImageService().Get(ctx, ref)
	if errors.Is(err, errdefs.ErrNotFound) {
		// Pulled under another registry host name (mirror test).
		var list []string
		all, _ := cl.ImageService().List(ctx)
		for _, i := range all {
			list = append(list, i.Name)
			if strings.HasSuffix(i.Name, "/"+img.Repo+":"+img.Tag) {
				rec, err = i, nil
			}
		}
		if err != nil {
			t.Fatalf("image %s not found; images: %v", ref, list)
		}
	} else if err != nil {
		t.Fatalf("getting image %s: %v", ref, err)
	}
	if rec.Target.Digest != img.Digest {
		t.Errorf("image %s target %s, want %s", rec.Name, rec.Target.Digest, img.Digest)
	}
	if rec.Target.MediaType != img.MediaType {
		t.Errorf("image %s target media type %s, want %s", rec.Name, rec.Target.MediaType, img.MediaType)
	}
	for _, d := range img.PlatformDigests(LocalPlatform()) {
		info, err := cl.ContentStore().Info(ctx, d)
		if err != nil {
			t.Errorf("image %s: %s (%s) not in content store: %v", rec.Name, d, img.MediaTypes[d], err)
			continue
		}
		if info.Size != img.Sizes[d] {
			t.Errorf("image %s: %s has size %d, want %d", rec.Name, d, info.Size, img.Sizes[d])
		}
	}
}

// checkRegistryServed checks the registry logged GETs of the local platform's
// blobs and a manifest of img since request number before.
func checkRegistryServed(t *testing.T, reg *Registry, img Image, before int) {
	t.Helper()
	var want []string
	for _, d := range img.PlatformDigests(LocalPlatform()) {
		kind := "blobs"
		if slices.Contains(img.Manifests, d) {
			kind = "manifests"
		}
		want = append(want, "GET /v2/"+img.Repo+"/"+kind+"/"+d.String())
	}
	// Wait for the last one: the registry logs a request when its handler
	// returns.
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := reg.Requests()[before:]
		var missing []string
		for _, w := range want {
			if !slices.ContainsFunc(got, func(q string) bool {
				// Mirror requests carry "?ns=<registry>".
				path, _, _ := strings.Cut(q, "?")
				return path == w
			}) {
				missing = append(missing, w)
			}
		}
		if len(missing) == 0 {
			t.Logf("registry requests for %s:\n  %s", img.Repo, strings.Join(got, "\n  "))
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("registry did not log %v; logged:\n%s", missing, strings.Join(got, "\n"))
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// lastLine returns the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

func TestSweepStale(t *testing.T) {
	// A pid that is certainly gone: a child that has exited and been reaped.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := cmd.Process.Pid
	stale, err := os.MkdirTemp("/tmp", "pm-stale-")
	if err != nil {
		t.Fatal(err)
	}
	live, err := os.MkdirTemp("/tmp", "pm-live-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(live)
	defer os.RemoveAll(stale)
	if err := os.WriteFile(filepath.Join(stale, ownerFile), []byte(strconv.Itoa(dead)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(live, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		t.Fatal(err)
	}
	sweepStale(t)
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale dir %s still there: %v", stale, err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("live dir %s removed: %v", live, err)
	}
}

func TestAccessLogParse(t *testing.T) {
	dir := t.TempDir()
	r := &Registry{logPath: dir + "/registry.log"}
	log := `time="2026-12-04T17:08:48Z" level=info msg="response completed" http.request.uri=/v2/
127.0.0.1 - - [04/Dec/2026:17:08:48 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
127.0.0.1 - - [04/Dec/2026:17:08:48 +0000] "HEAD /v2/team/app/manifests/v1?ns=registry.test HTTP/1.1" 404 100 "" "containerd/v2.4.2"
`
	if err := os.WriteFile(r.logPath, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	want := []string{"GET /v2/", "HEAD /v2/team/app/manifests/v1?ns=registry.test"}
	if got := r.Requests(); !slices.Equal(got, want) {
		t.Errorf("Requests() = %q, want %q", got, want)
	}
	if got := r.AccessLog(); len(got) != 2 || got[1].Status != 404 || got[1].UserAgent != "containerd/v2.4.2" {
		t.Errorf("AccessLog() = %+v", got)
	}
}

func TestCheckLoopbackURL(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:5000", "https://127.0.0.2:1", "http://[::1]:80"} {
		if err := checkLoopbackURL(u); err != nil {
			t.Errorf("checkLoopbackURL(%q) = %v, want nil", u, err)
		}
	}
	for _, u := range []string{"http://localhost:5000", "http://registry.test", "http://10.0.0.1:80", "ftp://127.0.0.1", "127.0.0.1:5000"} {
		if err := checkLoopbackURL(u); err == nil {
			t.Errorf("checkLoopbackURL(%q) = nil, want error", u)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	if got := unescapeMountinfo(`/tmp/a\040b`); got != "/tmp/a b" {
		t.Errorf("got %q", got)
	}
}
