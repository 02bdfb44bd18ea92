package deploytest

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/peermirror/peermirror/internal/testenv"
)

// xcaddyModule is the xcaddy the Makefile and this test run.
const xcaddyModule = "github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5"

// dockerfileBuild is what the test reads from xcaddy.Dockerfile.
type dockerfileBuild struct {
	builderImage, runtimeImage string
	copySource                 string // where COPY . puts the tree
	args                       []string
}

// readDockerfile extracts the stages and the xcaddy build command.
func readDockerfile(t *testing.T, path string) dockerfileBuild {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// join continued lines
	text := regexp.MustCompile(`\\\n\s*`).ReplaceAllString(string(b), " ")
	var d dockerfileBuild
	var froms []string
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0 || strings.HasPrefix(f[0], "#"):
		case f[0] == "FROM":
			froms = append(froms, f[1])
		case f[0] == "COPY" && len(f) == 3 && f[1] == ".":
			d.copySource = f[2]
		case f[0] == "RUN" && len(f) > 2 && f[1] == "xcaddy" && f[2] == "build":
			d.args = f[2:]
		}
	}
	if len(froms) != 2 || len(d.args) == 0 {
		t.Fatalf("%s: want two stages and one RUN xcaddy build, got FROM %v, xcaddy %q", path, froms, d.args)
	}
	d.builderImage, d.runtimeImage = froms[0], froms[1]
	return d
}

// TestXcaddyBuild builds the plugin into Caddy the way xcaddy.Dockerfile
// does (the Docker build itself cannot run here), and checks the binary.
func TestXcaddyBuild(t *testing.T) {
	repo := testenv.RepoRoot(t)
	d := readDockerfile(t, filepath.Join(repo, "xcaddy.Dockerfile"))

	// the Dockerfile: Caddy's builder pattern, one version throughout
	const version = "v2.11.9"
	if d.builderImage != "caddy:"+strings.TrimPrefix(version, "v")+"-builder" || d.runtimeImage != "caddy:"+strings.TrimPrefix(version, "v") {
		t.Errorf("stages %s and %s, want caddy:2.11.9-builder and caddy:2.11.9", d.builderImage, d.runtimeImage)
	}
	with := "github.com/peermirror/peermirror@v0.0.0=" + d.copySource
	if d.args[1] != version || !slices.Contains(d.args, "--with") || d.args[slices.Index(d.args, "--with")+1] != with {
		t.Errorf("xcaddy args %q, want build %s --with %s", d.args, version, with)
	}
	makefile, err := os.ReadFile(filepath.Join(repo, "Makefile"))
	if err != nil || !strings.Contains(string(makefile), xcaddyModule) {
		t.Errorf("the Makefile does not run %s", xcaddyModule)
	}
	if testing.Short() {
		t.Skip("the xcaddy build takes a minute or more; skipped with -short")
	}

	// the same build, with this tree as the local source
	bin := filepath.Join(t.TempDir(), "caddy")
	args := []string{"run", xcaddyModule, "build", version,
		"--with", "github.com/peermirror/peermirror@v0.0.0=" + repo, "--output", bin}
	cmd := exec.Command("go", args...)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "XCADDY_SETCAP=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}

	run := func(args ...string) string {
		t.Helper()
		c := exec.Command(bin, args...)
		home := t.TempDir()
		c.Env = append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+home, "XDG_DATA_HOME="+home)
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("caddy %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if v := run("version"); !strings.HasPrefix(v, version) {
		t.Errorf("caddy version %q, want %s", v, version)
	}
	modules := strings.Fields(run("list-modules"))
	for _, m := range []string{"peermirror", "http.handlers.peermirror"} {
		if !slices.Contains(modules, m) {
			t.Errorf("list-modules lacks %s", m)
		}
	}
	for _, c := range []string{"peermirror-configure", "peermirror-cleanup", "peermirror-uninstall"} {
		if out := run(c, "--help"); !strings.Contains(out, "--") {
			t.Errorf("caddy %s --help:\n%s", c, out)
		}
	}
}
