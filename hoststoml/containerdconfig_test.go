package hoststoml

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestCheckContainerdConfig(t *testing.T) {
	const certs = "/etc/containerd/certs.d"
	type want struct {
		sev     Severity
		setting string // a substring of Finding.Setting
		text    string // a substring of Finding.Message
	}
	tests := []struct {
		name    string
		files   map[string]string // node paths, under the host root
		version string
		want    []want // every finding, in any order
	}{
		{
			name: "version 3, config_path set: nothing to say",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
`},
		},
		{
			name: "version 2 names are migrated",
			files: map[string]string{"/etc/containerd/config.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d/"
`},
		},
		{
			name: "version 1 names are migrated",
			files: map[string]string{"/etc/containerd/config.toml": `[plugins.cri.registry]
  config_path = "/etc/containerd/certs.d"
[plugins.cri.containerd]
  discard_unpacked_layers = true
`},
			want: []want{
				{SeverityError, "discard_unpacked_layers", "cannot serve the layers"},
				{SeverityInfo, "", "because discard_unpacked_layers is set"},
			},
		},
		{
			name:  "no config file: the default config_path is ignored by the transfer service",
			files: map[string]string{},
			want: []want{
				{SeverityInfo, "", "no config file"},
				{SeverityError, "config_path", "single folder that does not exist"},
			},
		},
		{
			name: "config_path unset, but local pull reads the default roots",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images"]
  use_local_image_pull = true
`},
			want: []want{
				{SeverityWarning, "config_path", "only because CRI pulls with the local client"},
				{SeverityInfo, "use_local_image_pull", "local client"},
			},
		},
		{
			name: "config_path elsewhere",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/other/certs.d"
`},
			want: []want{{SeverityError, "config_path", "not from /etc/containerd/certs.d"}},
		},
		{
			name: "several roots with the transfer service",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"
`},
			want: []want{{SeverityError, "config_path", "takes the whole value as one folder"}},
		},
		{
			name: "several roots with the local pull, ours second",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images"]
  image_pull_with_sync_fs = true
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/docker/certs.d:/etc/containerd/certs.d"
`},
			want: []want{
				{SeverityWarning, "config_path", "earlier entry hides"},
				{SeverityInfo, "", "image_pull_with_sync_fs"},
			},
		},
		{
			name: "mirrors with config_path: CRI refuses to start",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.cri.v1.images".registry.mirrors."docker.io"]
  endpoint = ["https://mirror.gcr.io"]
`},
			want: []want{
				{SeverityError, "registry.mirrors", "refuses to start"},
				{SeverityInfo, "", "registry.mirrors is set"},
			},
		},
		{
			name: "mirrors without config_path (version 2): hosts.toml never read",
			files: map[string]string{"/etc/containerd/config.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["https://mirror.gcr.io"]
`},
			want: []want{
				{SeverityError, "registry.mirrors", "never read hosts.toml"},
				{SeverityInfo, "", "registry.mirrors is set"},
			},
		},
		{
			name: "deprecated configs and auths",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.cri.v1.images".registry.configs."registry.internal".auth]
  username = "u"
[plugins."io.containerd.cri.v1.images".registry.auths."https://gcr.io"]
  username = "u"
`},
			want: []want{
				{SeverityWarning, "registry.configs", "registry.internal"},
				{SeverityWarning, "registry.auths", "https://gcr.io"},
				{SeverityInfo, "", "registry.configs is set"},
			},
		},
		{
			name: "imports override the main file, globs resolved on the host",
			files: map[string]string{
				"/etc/containerd/config.toml": `version = 3
imports = ["conf.d/*.toml", "/etc/missing.toml"]
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
`,
				"/etc/containerd/conf.d/10-gpu.toml": `version = 3
[plugins."io.containerd.cri.v1.images"]
  discard_unpacked_layers = true
`,
				"/etc/containerd/conf.d/20-registry.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/other"
`,
			},
			want: []want{
				{SeverityWarning, "imports", "/etc/missing.toml"},
				{SeverityError, "config_path", `is "/etc/other"`},
				{SeverityError, "discard_unpacked_layers", "cannot serve"},
				{SeverityInfo, "", "discard_unpacked_layers is set"},
			},
		},
		{
			name: "version 4 ignores the old CRI registry table",
			files: map[string]string{"/etc/containerd/config.toml": `version = 4
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/elsewhere"
`},
			want: []want{{SeverityWarning, `grpc.v1.cri".registry`, "ignored"}},
		},
		{
			name: "version 3 still migrates the old CRI registry table",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/elsewhere"
`},
			want: []want{{SeverityError, "config_path", `is "/elsewhere"`}},
		},
		{
			name: "a config version from the future",
			files: map[string]string{"/etc/containerd/config.toml": `version = 5
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
`},
			want: []want{{SeverityError, "version", "refuses to start"}},
		},
		{
			name: "CRI disabled, max_concurrent_downloads changed",
			files: map[string]string{"/etc/containerd/config.toml": `version = 3
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[plugins."io.containerd.cri.v1.images"]
  max_concurrent_downloads = 10
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "/etc/containerd/certs.d"
`},
			want: []want{
				{SeverityWarning, "disabled_plugins", "CRI plugin is disabled"},
				{SeverityInfo, "", "max_concurrent_downloads"},
			},
		},
		{
			name:    "another major version is flagged",
			version: "v1.7.27",
			files: map[string]string{"/etc/containerd/config.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
`},
			want: []want{{SeverityWarning, "", "containerd v1.7.27 was found"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			files := map[string]string{}
			for p, c := range tt.files {
				files[strings.TrimPrefix(p, "/")] = c
			}
			writeFiles(t, root, files)
			got, err := CheckContainerdConfig(CheckOptions{
				ConfigFile:        "/etc/containerd/config.toml",
				HostRoot:          root,
				CertsDir:          certs,
				ContainerdVersion: tt.version,
			})
			if err != nil {
				t.Fatalf("CheckContainerdConfig: %v", err)
			}
			var unmatched []Finding
			matched := make([]bool, len(tt.want))
			for _, f := range got {
				i := slices.IndexFunc(tt.want, func(w want) bool {
					return w.sev == f.Severity && strings.Contains(f.Setting, w.setting) &&
						(w.setting != "" || f.Setting == "") && strings.Contains(f.Message, w.text)
				})
				if i < 0 || matched[i] {
					unmatched = append(unmatched, f)
					continue
				}
				matched[i] = true
			}
			for i, m := range matched {
				if !m {
					t.Errorf("missing finding %+v", tt.want[i])
				}
			}
			for _, f := range unmatched {
				t.Errorf("unexpected finding: %s %s", f.Severity, f)
			}
		})
	}
}

func TestCheckContainerdConfigErrors(t *testing.T) {
	root := t.TempDir()
	writeFiles(t, root, map[string]string{"etc/containerd/config.toml": "version = [\n"})
	_, err := CheckContainerdConfig(CheckOptions{HostRoot: root, CertsDir: "/etc/containerd/certs.d"})
	if err == nil || !strings.Contains(err.Error(), "decoding containerd config") {
		t.Errorf("broken TOML: err = %v", err)
	}
	_, err = CheckContainerdConfig(CheckOptions{HostRoot: root})
	if err == nil {
		t.Errorf("no certs folder: no error")
	}
}

func TestMajorVersion(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int
		ok   bool
	}{{"v2.4.2", 2, true}, {"2.1.0-rc.1", 2, true}, {"1.7.27-k3s1", 1, true}, {"", 0, false}, {"dev", 0, false}} {
		got, ok := majorVersion(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("majorVersion(%q) = %d, %v", tt.in, got, ok)
		}
	}
}

func TestOnHost(t *testing.T) {
	for _, tt := range []struct{ root, p, on string }{
		{"", "/etc/x", "/etc/x"},
		{"/", "/etc/x", "/etc/x"},
		{"/host", "/etc/x", "/host/etc/x"},
	} {
		if got := onHost(tt.root, tt.p); got != tt.on {
			t.Errorf("onHost(%q, %q) = %q", tt.root, tt.p, got)
		}
		if got := offHost(tt.root, tt.on); got != filepath.Clean(tt.p) {
			t.Errorf("offHost(%q, %q) = %q", tt.root, tt.on, got)
		}
	}
}
