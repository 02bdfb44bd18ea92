package bench

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"

	"github.com/peermirror/peermirror/internal/testenv"
)

// With PEERMIRROR_BENCH_PROFILE set to a folder, the harness saves pprof
// profiles there, taken from Caddy's admin endpoint: a CPU profile of the
// serving process in each throughput section and heap profiles in the
// memory section. Read them with `go tool pprof -top bin/caddy FILE`. With
// PEERMIRROR_BENCH_STRACE=1 as well, each CPU profile comes with a count
// of the process's system calls (`strace -c -f`, NAME.strace.txt) taken
// right after it, under the same load.
func profileDir() string { return os.Getenv("PEERMIRROR_BENCH_PROFILE") }

// profileCPU saves a 5 s CPU profile of the Caddy whose admin endpoint is
// admin while GETs of url run one after the other. host is the network
// namespace the admin endpoint is in, nil for this one.
func profileCPU(t *testing.T, host *testenv.Host, admin, url, name string, pid int) {
	t.Helper()
	if profileDir() == "" {
		return
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		client := &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true}}
		defer client.CloseIdleConnections()
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := client.Get(url)
			if err != nil {
				t.Errorf("GET %s while profiling: %v", url, err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	saveProfile(t, host, admin, "debug/pprof/profile?seconds=5", name+".cpu.pprof")
	if os.Getenv("PEERMIRROR_BENCH_STRACE") != "" {
		file := filepath.Join(profileDir(), name+".strace.txt")
		cmd := exec.Command("timeout", "-s", "INT", "5", "strace", "-c", "-f", "-o", file, "-p", strconv.Itoa(pid))
		if out, err := cmd.CombinedOutput(); err != nil && cmd.ProcessState.ExitCode() != 124 {
			t.Errorf("strace of %s: %v: %s", name, err, out)
		}
	}
	close(stop)
	wg.Wait()
}

// saveProfile saves the admin endpoint's answer at path as file name in
// the profile folder, if one is set.
func saveProfile(t *testing.T, host *testenv.Host, admin, path, name string) {
	t.Helper()
	if profileDir() == "" {
		return
	}
	file := filepath.Join(profileDir(), name)
	url := "http://" + admin + "/" + path
	if host != nil {
		if out, err := host.Run(t, "curl", "-sSf", "-o", file, url); err != nil {
			t.Errorf("saving profile %s: %v: %s", name, err, out)
		}
		return
	}
	resp, err := http.Get(url)
	if err != nil {
		t.Errorf("saving profile %s: %v", name, err)
		return
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = &os.PathError{Op: "GET", Path: url, Err: os.ErrInvalid}
	}
	if err == nil {
		err = os.WriteFile(file, b, 0o644)
	}
	if err != nil {
		t.Errorf("saving profile %s: %v", name, err)
	}
}
