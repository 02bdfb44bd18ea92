package caddymodule

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/peermirror/peermirror/dht"
)

// runCommand runs a registered Caddy subcommand the way caddy's command
// line does, and returns its stdout, stderr and error.
func runCommand(t *testing.T, name string, args ...string) (string, string, error) {
	t.Helper()
	def, ok := caddycmd.Commands()[name]
	if !ok {
		t.Fatalf("command %s is not registered", name)
	}
	cmd := &cobra.Command{Use: def.Name, Short: def.Short, SilenceUsage: true, SilenceErrors: true}
	def.CobraFunc(cmd)
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), errOut.String(), err
}

func TestConfigureCommand(t *testing.T) {
	tests := []struct {
		name       string
		config     string // the node's /etc/containerd/config.toml, "" for none
		extra      []string
		wantErr    string
		wantStderr []string
		wantTerm   []string
	}{
		{
			name:     "good config",
			config:   "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
			wantTerm: []string{"2 registries configured"},
		},
		{
			name:       "discarded layers reported loudly",
			config:     "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  discard_unpacked_layers = true\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
			wantStderr: []string{"!! containerd on this node will not use", "ERROR: plugins.\"io.containerd.cri.v1.images\".discard_unpacked_layers"},
			wantTerm:   []string{"ERROR: plugins.\"io.containerd.cri.v1.images\".discard_unpacked_layers"},
		},
		{
			name:       "fail on error",
			config:     "",
			extra:      []string{"--fail-on-error"},
			wantErr:    "1 errors",
			wantStderr: []string{"ERROR: plugins.\"io.containerd.cri.v1.images\".registry.config_path: not set"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			if tt.config != "" {
				p := filepath.Join(root, "etc", "containerd", "config.toml")
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(tt.config), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			term := filepath.Join(t.TempDir(), "termination-log")
			args := append([]string{"--host-root", root, "--registry", "docker.io", "--registry", "ghcr.io",
				"--mirror", "http://127.0.0.1:30020", "--mirror", "fd00::7", "--upstream", "ghcr.io=https://ghcr.internal",
				"--containerd-address", "", "--termination-log", term}, tt.extra...)
			out, errOut, err := runCommand(t, configureCommand, args...)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatalf("configure: %v\n%s%s", err, out, errOut)
			}
			for _, s := range []string{"docker.io: written " + root + "/etc/containerd/certs.d/docker.io/hosts.toml", "ghcr.io: written"} {
				if !strings.Contains(out, s) {
					t.Errorf("stdout lacks %q:\n%s", s, out)
				}
			}
			for _, s := range tt.wantStderr {
				if !strings.Contains(errOut, s) {
					t.Errorf("stderr lacks %q:\n%s", s, errOut)
				}
			}
			termText, _ := os.ReadFile(term)
			for _, s := range tt.wantTerm {
				if !strings.Contains(string(termText), s) {
					t.Errorf("termination log lacks %q:\n%s", s, termText)
				}
			}
			hosts, err := os.ReadFile(filepath.Join(root, "etc/containerd/certs.d/ghcr.io/hosts.toml"))
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{`server = "https://ghcr.internal"`, `[host."http://[fd00::7]:30020"]`, `dial_timeout = "200ms"`} {
				if !strings.Contains(string(hosts), s) {
					t.Errorf("ghcr.io/hosts.toml lacks %q:\n%s", s, hosts)
				}
			}

			// again: nothing changes
			out, _, _ = runCommand(t, configureCommand, args...)
			if strings.Count(out, ": unchanged ") != 2 {
				t.Errorf("second run:\n%s", out)
			}

			// cleanup, twice
			out, _, err = runCommand(t, cleanupCommand, "--host-root", root)
			if err != nil || strings.Count(out, ": removed ") != 2 {
				t.Errorf("cleanup: %v\n%s", err, out)
			}
			if _, err := os.Stat(filepath.Join(root, "etc/containerd/certs.d")); !os.IsNotExist(err) {
				t.Errorf("certs.d made by configure is still there: %v", err)
			}
			out, _, err = runCommand(t, cleanupCommand, "--host-root", root)
			if err != nil || !strings.Contains(out, "nothing to restore") {
				t.Errorf("second cleanup: %v\n%s", err, out)
			}
		})
	}
}

func TestCommandArguments(t *testing.T) {
	tests := []struct {
		name    string
		command string
		args    []string
		wantErr string
	}{
		{"bad upstream", configureCommand, []string{"--host-root", t.TempDir(), "--registry", "docker.io", "--upstream", "docker.io"}, "want registry=URL"},
		{"no registry", configureCommand, []string{"--host-root", t.TempDir()}, "no registry given"},
		{"bad mirror", configureCommand, []string{"--host-root", t.TempDir(), "--registry", "docker.io", "--mirror", "http://fd00::1:30020"}, "brackets"},
		{"uninstall without daemonset", uninstallCommand, []string{"--", "peermirror-cleanup"}, "--daemonset is required"},
		{"uninstall without cleanup args", uninstallCommand, []string{"--daemonset", "pm"}, "after --"},
		{"uninstall outside a cluster", uninstallCommand, []string{"--daemonset", "pm", "--", "peermirror-cleanup"}, "KUBERNETES_SERVICE_HOST"},
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runCommand(t, tt.command, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestNetworkKeyCommand(t *testing.T) {
	dir := t.TempDir()
	var keys []string
	for i := range 2 {
		out, errOut, err := runCommand(t, networkKeyCommand)
		if err != nil || errOut != "" {
			t.Fatalf("run %d: err %v, stderr %q", i, err, errOut)
		}
		lines := strings.Split(out, "\n")
		if len(lines) != 4 || lines[0] != "/key/swarm/psk/1.0.0/" || lines[1] != "/base16/" || lines[3] != "" {
			t.Fatalf("output is not the key file format:\n%q", out)
		}
		if _, err := hex.DecodeString(lines[2]); err != nil || len(lines[2]) != 64 {
			t.Fatalf("key line %q is not 64 hex digits", lines[2])
		}
		// what it prints is what network_key_file reads
		path := filepath.Join(dir, fmt.Sprintf("key%d", i))
		if err := os.WriteFile(path, []byte(out), 0o600); err != nil {
			t.Fatal(err)
		}
		psk, err := dht.ReadNetworkKeyFile(path)
		if err != nil {
			t.Fatalf("reading the printed key: %v", err)
		}
		if hex.EncodeToString(psk) != strings.ToLower(lines[2]) {
			t.Errorf("read key %x, printed %s", []byte(psk), lines[2])
		}
		keys = append(keys, lines[2])
	}
	if keys[0] == keys[1] {
		t.Error("two runs printed the same key")
	}
	if _, _, err := runCommand(t, networkKeyCommand, "extra"); err == nil {
		t.Error("an argument was accepted")
	}
}
