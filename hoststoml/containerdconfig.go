package hoststoml

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// The rules below are read from containerd v2.4.2's code; the file and
// function each one comes from is named where it is applied.
const (
	// checkedContainerd is the containerd release whose code the checks
	// follow.
	checkedContainerd = "2.4.2"
	// maxConfigVersion is containerd 2.4.2's version.ConfigVersion.
	maxConfigVersion = 4

	imagesPlugin  = "io.containerd.cri.v1.images"
	grpcCRIPlugin = "io.containerd.grpc.v1.cri"
	// defaultConfigPath is what plugins/cri/images/plugin.go sets when
	// neither config_path nor mirrors is set (on Linux).
	defaultConfigPath = "/etc/containerd/certs.d:/etc/docker/certs.d"
)

// Severity grades a Finding.
type Severity int

// Severities, from least to most serious.
const (
	// SeverityInfo is worth knowing and needs no action.
	SeverityInfo Severity = iota
	// SeverityWarning works today but is fragile or deprecated.
	SeverityWarning
	// SeverityError means containerd ignores the mirror, or the node
	// loses the content the mirror would serve.
	SeverityError
)

// String returns "info", "warning" or "error".
func (s Severity) String() string {
	switch s {
	case SeverityInfo:
		return "info"
	case SeverityWarning:
		return "warning"
	default:
		return "error"
	}
}

// Finding is one thing the check found in containerd's configuration.
type Finding struct {
	// Severity grades the finding.
	Severity Severity
	// Setting names the configuration key concerned, as written in a
	// version 3 config (for example
	// plugins."io.containerd.cri.v1.images".registry.config_path), or
	// "" for the configuration as a whole.
	Setting string
	// Message says what the setting does to the mirror and what to
	// change, in full sentences.
	Message string
}

// String formats the finding on one line.
func (f Finding) String() string {
	if f.Setting == "" {
		return f.Message
	}
	return f.Setting + ": " + f.Message
}

// CheckOptions says where to find containerd's configuration. Paths are
// the node's paths, as containerd sees them.
type CheckOptions struct {
	// ConfigFile is containerd's config file. Default:
	// /etc/containerd/config.toml.
	ConfigFile string

	// HostRoot is where the node's root folder is visible to this process
	// (the init container mounts it under /host). Default: "", this
	// process sees the node's files at their own paths.
	HostRoot string

	// CertsDir is the folder the hosts.toml files are written to, as the
	// node sees it. Required.
	CertsDir string

	// ContainerdVersion is the version containerd reports ("v2.4.2",
	// "1.7.27"), or "" when it is unknown. The rules are those of
	// containerd 2.4.2; another major version gets a warning that they
	// may not hold.
	ContainerdVersion string
}

// imagesConfig is the CRI image service's configuration after loading,
// migration and merging, as plugins/cri/images/plugin.go sees it.
type imagesConfig struct {
	configPath            string
	mirrors               []string
	configs               []string
	auths                 []string
	discardUnpackedLayers bool
	useLocalImagePull     bool
	// localPullReason names the first setting that makes CRI fall back to
	// the local pull (internal/cri/config/config.go,
	// CheckLocalImagePullConfigs), or "" for none.
	localPullReason string
}

// CheckContainerdConfig reads containerd's configuration (the config file
// and its imports, migrated from older config versions as containerd
// does) and reports what would make containerd ignore the hosts.toml
// files under CertsDir for CRI pulls, or drop the layers the mirror
// serves. A missing config file is not an error: containerd then runs on
// its defaults, which the check judges as well.
func CheckContainerdConfig(o CheckOptions) ([]Finding, error) {
	if o.ConfigFile == "" {
		o.ConfigFile = "/etc/containerd/config.toml"
	}
	if o.CertsDir == "" {
		return nil, errors.New("checking containerd config: no certs folder given")
	}
	var out []Finding
	add := func(sev Severity, setting, format string, args ...any) {
		out = append(out, Finding{Severity: sev, Setting: setting, Message: fmt.Sprintf(format, args...)})
	}

	if major, ok := majorVersion(o.ContainerdVersion); ok && major != 2 {
		add(SeverityWarning, "",
			"containerd %s was found; these checks follow containerd %s's code and "+
				"may not hold for it", o.ContainerdVersion, checkedContainerd)
	}
	cfg, err := loadContainerdConfig(o.HostRoot, o.ConfigFile)
	if err != nil {
		return nil, err
	}
	out = append(out, cfg.findings...)
	if cfg.version > maxConfigVersion {
		add(SeverityError, "version",
			"config version %d is newer than containerd %s knows (%d): that "+
				"containerd refuses to start with it", cfg.version, checkedContainerd, maxConfigVersion)
	}
	if cfg.isDisabled(imagesPlugin) || cfg.isDisabled(grpcCRIPlugin) {
		add(SeverityWarning, "disabled_plugins",
			"the CRI plugin is disabled: the kubelet cannot pull through this "+
				"containerd at all")
	}
	img := cfg.images()
	certsDir := filepath.Clean(o.CertsDir)
	const (
		cp      = `plugins."io.containerd.cri.v1.images".registry.config_path`
		mirrors = `plugins."io.containerd.cri.v1.images".registry.mirrors`
	)

	// where CRI looks for hosts.toml
	switch {
	case len(img.mirrors) > 0 && img.configPath != "":
		// internal/cri/config/config.go, ValidateImageConfig
		add(SeverityError, mirrors,
			"set together with config_path: containerd's CRI image service refuses "+
				"to start (\"`mirrors` cannot be set when `config_path` is "+
				"provided\"). Remove the mirrors (%s) and put them into hosts.toml "+
				"files", strings.Join(img.mirrors, ", "))
	case len(img.mirrors) > 0:
		// plugins/cri/images/plugin.go applies no default config_path when
		// mirrors are set; image_pull.go then builds hosts from mirrors
		add(SeverityError, mirrors,
			"set (%s) and config_path is not: CRI pulls use these mirrors and "+
				"never read hosts.toml. Remove the mirrors and set config_path = %q", strings.Join(img.mirrors, ", "), certsDir)
	case img.configPath == "":
		roots := filepath.SplitList(defaultConfigPath)
		if img.localPullReason == "" {
			// image_pull.go, pullImageWithTransferService:
			// registry.WithHostDir(ConfigPath) -> config.HostDirFromRoot,
			// which takes the whole string as one folder
			add(SeverityError, cp,
				"not set. containerd then uses %q, which the transfer service (the "+
					"default way CRI pulls) takes as a single folder that does not exist, "+
					"so every hosts.toml is ignored. Set config_path = %q", defaultConfigPath, certsDir)
		} else if !slices.Contains(roots, certsDir) {
			add(SeverityError, cp,
				"not set: containerd reads hosts.toml from %s, not from %s. Set "+
					"config_path = %q", strings.Join(roots, " and "), certsDir, certsDir)
		} else {
			add(SeverityWarning, cp,
				"not set: containerd's default %q is read only because CRI pulls with "+
					"the local client (%s); with the transfer service every hosts.toml "+
					"would be ignored. Set config_path = %q", defaultConfigPath, img.localPullReason, certsDir)
		}
	default:
		roots := filepath.SplitList(img.configPath)
		for i := range roots {
			roots[i] = filepath.Clean(roots[i])
		}
		switch {
		case len(roots) > 1 && img.localPullReason == "":
			add(SeverityError, cp,
				"%q lists several folders, but the transfer service (the default way "+
					"CRI pulls) takes the whole value as one folder, so every hosts.toml "+
					"is ignored. Set config_path = %q", img.configPath, certsDir)
		case !slices.Contains(roots, certsDir):
			add(SeverityError, cp,
				"is %q: containerd reads hosts.toml from there, not from %s. Point "+
					"config_path and peermirror at the same folder", img.configPath, certsDir)
		case roots[0] != certsDir:
			add(SeverityWarning, cp,
				"is %q: a registry folder in an earlier entry hides the one peermirror "+
					"writes in %s", img.configPath, certsDir)
		}
	}

	// content the mirror serves
	if img.discardUnpackedLayers {
		add(SeverityError, `plugins."io.containerd.cri.v1.images".discard_unpacked_layers`,
			"true: containerd deletes each layer from its content store once it is "+
				"unpacked, so this node cannot serve the layers it pulls to its peers. "+
				"Set it to false")
	}

	// deprecated registry settings
	if len(img.configs) > 0 {
		add(SeverityWarning, `plugins."io.containerd.cri.v1.images".registry.configs`,
			"set (%s): deprecated since containerd 2.0, and it switches CRI to the "+
				"local pull. Its auth entries still supply credentials; move TLS "+
				"settings into hosts.toml (ca, client, skip_verify)", strings.Join(img.configs, ", "))
	}
	if len(img.auths) > 0 {
		add(SeverityWarning, `plugins."io.containerd.cri.v1.images".registry.auths`,
			"set (%s): deprecated since containerd 2.0 (use image pull secrets), "+
				"and it switches CRI to the local pull", strings.Join(img.auths, ", "))
	}
	switch {
	case img.useLocalImagePull:
		add(SeverityInfo, `plugins."io.containerd.cri.v1.images".use_local_image_pull`,
			"true: CRI pulls with the local client instead of the transfer service")
	case img.localPullReason != "":
		add(SeverityInfo, "",
			"CRI pulls with the local client instead of the transfer service, "+
				"because %s is set", img.localPullReason)
	}
	return out, nil
}

// majorVersion parses the major number of a containerd version.
func majorVersion(v string) (int, bool) {
	v = strings.TrimPrefix(strings.TrimSpace(v), "v")
	head, _, _ := strings.Cut(v, ".")
	n, err := strconv.Atoi(head)
	return n, err == nil && v != ""
}

// containerdConfig is containerd's configuration merged from its files.
type containerdConfig struct {
	version  int
	plugins  map[string]any
	disabled []string
	findings []Finding
}

func (c *containerdConfig) isDisabled(id string) bool { return slices.Contains(c.disabled, id) }

// loadContainerdConfig loads the config file and its imports the way
// cmd/containerd/server/config/config.go (LoadConfigWithPlugins) does:
// breadth first, each file migrated to the current version on its own,
// later files merged over earlier ones.
func loadContainerdConfig(hostRoot, path string) (*containerdConfig, error) {
	c := &containerdConfig{plugins: map[string]any{}}
	loaded := map[string]bool{}
	pending := []string{path}
	for len(pending) > 0 {
		p := pending[0]
		pending = pending[1:]
		if loaded[p] {
			continue
		}
		loaded[p] = true
		b, err := os.ReadFile(onHost(hostRoot, p))
		if errors.Is(err, fs.ErrNotExist) {
			if p == path {
				c.findings = append(c.findings, Finding{Severity: SeverityInfo,
					Message: fmt.Sprintf("no config file at %s: containerd runs on its defaults", p)})
				c.version = maxConfigVersion
			} else {
				c.findings = append(c.findings, Finding{Severity: SeverityWarning, Setting: "imports",
					Message: fmt.Sprintf(
						"%s is imported but cannot be read from here (not mounted?): its "+
							"settings were not checked", p)})
			}
			continue
		} else if err != nil {
			return nil, fmt.Errorf("reading containerd config %s: %w", p, err)
		}
		var raw map[string]any
		if _, err := toml.Decode(string(b), &raw); err != nil {
			return nil, fmt.Errorf("decoding containerd config %s: %w", p, err)
		}
		version := 1
		if v, ok := raw["version"].(int64); ok && v > 0 {
			version = int(v)
		}
		c.version = max(c.version, version)
		plugins, _ := raw["plugins"].(map[string]any)
		plugins = deepCopy(plugins)
		disabled := stringList(raw["disabled_plugins"])
		if version < 2 {
			// cmd/containerd/server/config/config.go, v1Migrate: "cri"
			// became io.containerd.grpc.v1.cri
			if v, ok := plugins["cri"]; ok {
				plugins[grpcCRIPlugin] = v
				delete(plugins, "cri")
			}
			for i, d := range disabled {
				if d == "cri" {
					disabled[i] = grpcCRIPlugin
				}
			}
		}
		if version < maxConfigVersion {
			migrateImages(plugins)
		} else if src, ok := plugins[grpcCRIPlugin].(map[string]any); ok {
			if _, ok := src["registry"]; ok {
				c.findings = append(c.findings, Finding{Severity: SeverityWarning,
					Setting: `plugins."io.containerd.grpc.v1.cri".registry`,
					Message: fmt.Sprintf(
						"in %s (a version %d config) this table is ignored; it belongs under "+
							"plugins.%q", p, version, imagesPlugin)})
			}
		}
		mergeMaps(c.plugins, plugins)
		for _, d := range disabled {
			if !slices.Contains(c.disabled, d) {
				c.disabled = append(c.disabled, d)
			}
		}

		// imports, relative to the importing file
		for _, imp := range stringList(raw["imports"]) {
			imp = filepath.Clean(imp)
			if !filepath.IsAbs(imp) {
				imp = filepath.Join(filepath.Dir(p), imp)
			}
			if !strings.Contains(imp, "*") {
				pending = append(pending, imp)
				continue
			}
			matches, err := filepath.Glob(onHost(hostRoot, imp))
			if err != nil {
				return nil, fmt.Errorf("resolving import %s: %w", imp, err)
			}
			for _, m := range matches {
				pending = append(pending, offHost(hostRoot, m))
			}
		}
	}
	return c, nil
}

// migrateImages copies the image settings of the old CRI plugin table into
// the image service's table, as plugins/cri/images/plugin.go
// (configMigration) does for every config version below the current one.
func migrateImages(plugins map[string]any) {
	src, ok := plugins[grpcCRIPlugin].(map[string]any)
	if !ok {
		return
	}
	dst, ok := plugins[imagesPlugin].(map[string]any)
	if !ok {
		dst = map[string]any{}
	}
	for _, k := range []string{"registry", "image_decryption", "max_concurrent_downloads",
		"image_pull_progress_timeout", "image_pull_with_sync_fs", "stats_collect_period"} {
		if v, ok := src[k]; ok {
			dst[k] = v
		}
	}
	if ctrd, ok := src["containerd"].(map[string]any); ok {
		for _, k := range []string{"snapshotter", "disable_snapshot_annotations", "discard_unpacked_layers"} {
			if v, ok := ctrd[k]; ok {
				dst[k] = v
			}
		}
	}
	plugins[imagesPlugin] = dst
}

// images returns the CRI image service's effective settings.
func (c *containerdConfig) images() imagesConfig {
	tbl, _ := c.plugins[imagesPlugin].(map[string]any)
	reg, _ := tbl["registry"].(map[string]any)
	var img imagesConfig
	img.configPath, _ = reg["config_path"].(string)
	img.mirrors = mapKeys(reg["mirrors"])
	img.configs = mapKeys(reg["configs"])
	img.auths = mapKeys(reg["auths"])
	img.discardUnpackedLayers, _ = tbl["discard_unpacked_layers"].(bool)
	img.useLocalImagePull, _ = tbl["use_local_image_pull"].(bool)

	// internal/cri/config/config.go, CheckLocalImagePullConfigs, in its
	// order; the defaults are DefaultImageConfig's (config_unix.go)
	disableAnnotations := true
	if v, ok := tbl["disable_snapshot_annotations"].(bool); ok {
		disableAnnotations = v
	}
	maxDownloads := int64(3)
	if v, ok := tbl["max_concurrent_downloads"].(int64); ok {
		maxDownloads = v
	}
	syncFs, _ := tbl["image_pull_with_sync_fs"].(bool)
	for _, t := range []struct {
		name    string
		present bool
	}{
		{"disable_snapshot_annotations = false", !disableAnnotations},
		{"discard_unpacked_layers", img.discardUnpackedLayers},
		{"registry.mirrors", len(img.mirrors) > 0},
		{"registry.configs", len(img.configs) > 0},
		{"registry.auths", len(img.auths) > 0},
		{"max_concurrent_downloads (other than 3)", maxDownloads != 3},
		{"image_pull_with_sync_fs", syncFs},
	} {
		if t.present {
			img.localPullReason = t.name
			break
		}
	}
	if img.useLocalImagePull && img.localPullReason == "" {
		img.localPullReason = "use_local_image_pull"
	}
	return img
}

// onHost maps a node path to this process's view of it.
func onHost(hostRoot, p string) string {
	if hostRoot == "" || hostRoot == "/" {
		return p
	}
	return filepath.Join(hostRoot, p)
}

// offHost maps a path seen by this process back to the node's path.
func offHost(hostRoot, p string) string {
	if hostRoot == "" || hostRoot == "/" {
		return p
	}
	rel, err := filepath.Rel(hostRoot, p)
	if err != nil {
		return p
	}
	return "/" + rel
}

// mergeMaps merges src into dst: tables key by key, other values
// replaced, as containerd's mergeConfig treats plugin tables.
func mergeMaps(dst, src map[string]any) {
	for k, v := range src {
		if sv, ok := v.(map[string]any); ok {
			if dv, ok := dst[k].(map[string]any); ok {
				mergeMaps(dv, sv)
				continue
			}
		}
		dst[k] = v
	}
}

func deepCopy(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			v = deepCopy(sub)
		}
		out[k] = v
	}
	return out
}

func mapKeys(v any) []string {
	m, _ := v.(map[string]any)
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func stringList(v any) []string {
	list, _ := v.([]any)
	var out []string
	for _, e := range list {
		if s, ok := e.(string); ok {
			out = append(out, s)
		}
	}
	return out
}
