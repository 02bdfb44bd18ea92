package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
)

var (
	buildsMu sync.Mutex
	builds   = map[string]string{} // ldflags -> binary
)

// BuildCaddy builds ./cmd/caddy with the given -ldflags (for example
// "-X github.com/peermirror/peermirror/dht.infoVersion=2") into a
// temporary directory and returns the binary's path. The binary is shared
// by the tests of this test binary while it exists; t.Cleanup of the test
// that built it removes it, and a later test builds it again (a link step
// only, the packages are in the build cache).
func BuildCaddy(t T, ldflags string) string {
	t.Helper()
	buildsMu.Lock()
	defer buildsMu.Unlock()
	if bin, ok := builds[ldflags]; ok {
		if _, err := os.Stat(bin); err == nil {
			return bin
		}
	}
	bin := filepath.Join(makeTempDir(t, "pm-caddy-build-"), "caddy")
	cmd := exec.Command("go", "build", "-ldflags", ldflags, "-o", bin, "./cmd/caddy")
	cmd.Dir = RepoRoot(t)
	cmd.Env = childEnv()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("testenv: building caddy with -ldflags %q: %v\n%s", ldflags, err, out)
	}
	builds[ldflags] = bin
	return bin
}
