package hoststoml

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// DefaultDialTimeout bounds containerd's dial to a mirror host: a mirror
// on the node answers at once or refuses at once, so this only matters
// when packets are dropped.
const DefaultDialTimeout = 200 * time.Millisecond

// DefaultRegistry is the folder name containerd reads for every registry
// that has no folder of its own.
const DefaultRegistry = "_default"

// Names of the files kept beside hosts.toml in each registry folder.
const (
	hostsFileName  = "hosts.toml"
	backupFileName = "hosts.toml.peermirror-backup"
	stateFileName  = "peermirror.json"
	// replacedFileName keeps a hosts.toml that someone changed after
	// peermirror wrote it, when cleanup puts the original back.
	replacedFileName = "hosts.toml.peermirror-replaced"
)

// Options says which hosts.toml files Configure writes.
type Options struct {
	// CertsDir is containerd's registry hosts folder (its config_path) as
	// this process sees it. Created when missing (and removed again by
	// Cleanup when empty). Required.
	CertsDir string

	// Registries are the registries to put the mirror in front of, by the
	// host name in image references ("docker.io", "ghcr.io",
	// "registry.example:5000"), or DefaultRegistry ("_default") for every
	// registry without a folder of its own. Required.
	Registries []string

	// Mirrors are the mirror targets, tried in this order before the
	// registry; see ParseMirror for the forms accepted. Required.
	Mirrors []string

	// Upstreams overrides the server written for a registry. Default:
	// https://registry-1.docker.io for docker.io, none for _default and
	// for loopback registries (containerd then picks the registry's own
	// address, as it would without a file), https://<registry> otherwise.
	Upstreams map[string]string

	// PullOnly gives the mirror hosts the pull capability only, so
	// containerd resolves tags at the registry and fetches by digest from
	// the mirror. Default: false (pull and resolve).
	PullOnly bool

	// DialTimeout is the dial_timeout of each mirror host. Default:
	// DefaultDialTimeout (200ms); negative writes none.
	DialTimeout time.Duration

	// KeepExisting keeps the hosts and settings containerd used for the
	// registry before (its own hosts.toml, or else _default's) after the
	// mirror hosts. Default: false, the file names the mirror and the
	// upstream only.
	KeepExisting bool
}

// Action is what happened to one registry's hosts.toml.
type Action string

// The actions in a Report.
const (
	// ActionWritten: Configure wrote a new hosts.toml.
	ActionWritten Action = "written"
	// ActionUnchanged: the hosts.toml was already what Configure writes.
	ActionUnchanged Action = "unchanged"
	// ActionRestored: the original hosts.toml is back.
	ActionRestored Action = "restored"
	// ActionRemoved: there was no hosts.toml before, and now there is none.
	ActionRemoved Action = "removed"
)

// Change is what Configure or Cleanup did to one registry folder.
type Change struct {
	// Registry is the registry folder's name.
	Registry string
	// Path is the hosts.toml, as this process sees it.
	Path string
	// Action says what happened.
	Action Action
	// Notes are things the operator should know, in full sentences.
	Notes []string
}

// Report lists the changes of one run, one per registry folder.
type Report struct {
	// Changes has one entry per registry folder, in the order handled.
	Changes []Change
}

// state is peermirror.json: what was in a registry folder before
// peermirror wrote its hosts.toml there.
type state struct {
	Version  int    `json:"version"`
	Registry string `json:"registry"`
	// Original describes the hosts.toml that was there (its bytes are in
	// the backup file).
	Original original `json:"original"`
	// CreatedDirs are the folders peermirror made, relative to the certs
	// folder ("." for the certs folder itself), removed again by cleanup
	// when empty.
	CreatedDirs []string `json:"created_dirs,omitempty"`
	// Written is the SHA-256 of the hosts.toml peermirror wrote last.
	Written string `json:"written_sha256,omitempty"`
}

type original struct {
	Present bool        `json:"present"`
	Mode    fs.FileMode `json:"mode,omitempty"`
	SHA256  string      `json:"sha256,omitempty"`
	// DirExisted says the registry folder was there before, so its
	// certificate files counted.
	DirExisted bool `json:"dir_existed"`
}

const stateVersion = 1

// Configure writes a hosts.toml for each registry in opts: the mirrors
// first, then the upstream. The first run in a folder backs up the
// hosts.toml found there; later runs render from that backup, so running
// Configure again with the same options changes nothing, and the backup
// is never overwritten. Folders that an earlier run configured for a
// registry no longer listed are restored, as Cleanup would.
func Configure(opts Options) (Report, error) {
	if err := opts.validate(); err != nil {
		return Report{}, err
	}
	mirrors, err := opts.mirrorHosts()
	if err != nil {
		return Report{}, err
	}

	// the certs folder itself
	var createdCerts bool
	if _, err := os.Stat(opts.CertsDir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(opts.CertsDir, 0o755); err != nil {
			return Report{}, fmt.Errorf("creating certs folder: %w", err)
		}
		createdCerts = true
	} else if err != nil {
		return Report{}, fmt.Errorf("reading certs folder: %w", err)
	}

	var rep Report
	var errs []error
	configured := map[string]bool{}
	for _, reg := range opts.Registries {
		configured[filepath.Base(registryDir(opts.CertsDir, reg))] = true
		ch, err := configureRegistry(opts, reg, mirrors, createdCerts)
		if err != nil {
			errs = append(errs, fmt.Errorf("configuring %s: %w", reg, err))
			continue
		}
		rep.Changes = append(rep.Changes, ch)
	}

	// folders of registries no longer listed
	stale, err := ownedFolders(opts.CertsDir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, name := range stale {
		if configured[name] {
			continue
		}
		ch, err := restoreFolder(opts.CertsDir, name)
		if err != nil {
			errs = append(errs, fmt.Errorf("restoring %s (no longer mirrored): %w", name, err))
			continue
		}
		ch.Notes = append(ch.Notes, "this registry is no longer mirrored")
		rep.Changes = append(rep.Changes, ch)
	}
	return rep, errors.Join(errs...)
}

// validate checks opts and fills in defaults.
func (o *Options) validate() error {
	if o.CertsDir == "" {
		return errors.New("no certs folder given")
	}
	if len(o.Registries) == 0 {
		return errors.New("no registry given")
	}
	if len(o.Mirrors) == 0 {
		return errors.New("no mirror given")
	}
	seen := map[string]bool{}
	for _, r := range o.Registries {
		if err := checkRegistryName(r); err != nil {
			return err
		}
		if seen[r] {
			return fmt.Errorf("registry %s given twice", r)
		}
		seen[r] = true
	}
	upstreams := map[string]string{}
	for r, u := range o.Upstreams {
		if !seen[r] {
			return fmt.Errorf("upstream given for %s, which is not a mirrored registry", r)
		}
		if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			return fmt.Errorf("upstream of %s must be an http or https URL, not %q", r, u)
		}
		// the same rules as a mirror URL: IPv6 in brackets
		norm, err := parseURL("upstream of "+r, u)
		if err != nil {
			return err
		}
		upstreams[r] = norm
	}
	o.Upstreams = upstreams
	if o.DialTimeout == 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	return nil
}

// checkRegistryName refuses names that are no registry folder.
func checkRegistryName(r string) error {
	switch {
	case r == "":
		return errors.New("empty registry name")
	case r == "." || r == ".." || strings.HasPrefix(r, "."):
		return fmt.Errorf("bad registry name %q", r)
	case strings.ContainsAny(r, "/\\ \t\n"):
		return fmt.Errorf("bad registry name %q: want a host name such as docker.io", r)
	}
	return nil
}

// mirrorHosts parses the mirror targets.
func (o *Options) mirrorHosts() ([]mirrorHost, error) {
	caps := []string{"pull", "resolve"}
	if o.PullOnly {
		caps = []string{"pull"}
	}
	var dial string
	if o.DialTimeout > 0 {
		dial = o.DialTimeout.String()
	}
	var out []mirrorHost
	seen := map[string]bool{}
	for _, t := range o.Mirrors {
		u, err := ParseMirror(t)
		if err != nil {
			return nil, err
		}
		if seen[u] {
			continue
		}
		seen[u] = true
		out = append(out, mirrorHost{url: u, capabilities: caps, dialTimeout: dial})
	}
	return out, nil
}

// defaultUpstream is the server written for a registry when none is
// given.
func defaultUpstream(reg string) string {
	switch {
	case reg == DefaultRegistry:
		return ""
	case reg == "docker.io":
		return "https://registry-1.docker.io"
	case isLoopbackRegistry(reg):
		// containerd tries http as well for these: leave it to containerd
		return ""
	default:
		return "https://" + reg
	}
}

// isLoopbackRegistry mirrors containerd's notion of a local registry
// (localhost or a loopback address, with or without a port).
func isLoopbackRegistry(reg string) bool {
	host := reg
	if h, _, err := net.SplitHostPort(reg); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if host == "localhost" {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.IsLoopback()
}

// registryDir is the folder containerd reads for reg: of the two names a
// registry with a port may have (host_port_ first, then host:port), the
// one that exists, else host:port.
func registryDir(certsDir, reg string) string {
	if i := strings.LastIndex(reg, ":"); i > 0 && reg != DefaultRegistry {
		alt := filepath.Join(certsDir, reg[:i]+"_"+reg[i+1:]+"_")
		if fi, err := os.Stat(alt); err == nil && fi.IsDir() {
			return alt
		}
	}
	return filepath.Join(certsDir, reg)
}

// configureRegistry writes one registry's hosts.toml.
func configureRegistry(opts Options, reg string, mirrors []mirrorHost, createdCerts bool) (Change, error) {
	dir := registryDir(opts.CertsDir, reg)
	ch := Change{Registry: reg, Path: filepath.Join(dir, hostsFileName)}

	st, err := readState(dir)
	if err != nil {
		return ch, err
	}
	if st == nil {
		// first run here: note what there is and back it up
		st, err = takeOver(opts.CertsDir, dir, reg, createdCerts)
		if err != nil {
			return ch, err
		}
	}
	orig, err := readBackup(dir, st)
	if err != nil {
		return ch, err
	}

	// the server and top-level settings, and the hosts kept
	server := defaultUpstream(reg)
	if u, ok := opts.Upstreams[reg]; ok {
		server = u
	}
	var top []setting
	var kept []hostEntry
	prev, prevNote, err := previousHosts(opts.CertsDir, dir, reg, st, orig)
	switch {
	case err != nil && opts.KeepExisting:
		return ch, err
	case err != nil:
		// nothing of it is kept anyway
		ch.Notes = append(ch.Notes, "ignored what was there before: "+err.Error())
		prev = nil
	}
	switch {
	case opts.KeepExisting && prev != nil:
		if _, ok := opts.Upstreams[reg]; !ok && prev.server != "" {
			server = prev.server
		}
		top = prev.top
		kept = prev.hosts
		if prevNote != "" {
			ch.Notes = append(ch.Notes, "kept the hosts of "+prevNote)
		}
	case prev != nil && prevNote != "":
		ch.Notes = append(ch.Notes, "replaces the hosts of "+prevNote+
			" for this registry (--keep-existing keeps them after the mirror)")
	}
	if !st.Original.Present && st.Original.DirExisted {
		// certificate files that only count while there is no hosts.toml
		certs, err := folderCertSettings(dir)
		if err != nil {
			return ch, err
		}
		if len(certs) > 0 && !hasKey(top, "ca") && !hasKey(top, "client") {
			top = append(top, certs...)
			ch.Notes = append(ch.Notes,
				"the folder's certificate files are named in hosts.toml so the "+
					"registry keeps using them")
		}
	}
	content, err := render(server, top, mirrors, kept)
	if err != nil {
		return ch, err
	}

	// write only when something changed
	path := filepath.Join(dir, hostsFileName)
	cur, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return ch, fmt.Errorf("reading hosts.toml: %w", err)
	}
	sum := digest(content)
	if err == nil && string(cur) == string(content) {
		ch.Action = ActionUnchanged
	} else {
		if err == nil && st.Written != "" && digest(cur) != st.Written {
			ch.Notes = append(ch.Notes,
				"hosts.toml had been changed since peermirror wrote it; the change is "+
					"overwritten (the original backup is untouched)")
		}
		mode := fs.FileMode(0o644)
		if st.Original.Present && st.Original.Mode != 0 {
			mode = st.Original.Mode
		}
		if err := writeFileAtomic(path, content, mode); err != nil {
			return ch, fmt.Errorf("writing hosts.toml: %w", err)
		}
		ch.Action = ActionWritten
	}
	if st.Written != sum {
		st.Written = sum
		if err := writeState(dir, st); err != nil {
			return ch, err
		}
	}
	return ch, nil
}

// takeOver records the first state of a registry folder and backs up its
// hosts.toml, before anything in it changes.
func takeOver(certsDir, dir, reg string, createdCerts bool) (*state, error) {
	st := &state{Version: stateVersion, Registry: reg}
	if createdCerts {
		st.CreatedDirs = append(st.CreatedDirs, ".")
	}
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.Mkdir(dir, 0o755); err != nil {
			return nil, fmt.Errorf("creating registry folder: %w", err)
		}
		rel, _ := filepath.Rel(certsDir, dir)
		st.CreatedDirs = append(st.CreatedDirs, rel)
	case err != nil:
		return nil, fmt.Errorf("reading registry folder: %w", err)
	case !fi.IsDir():
		return nil, fmt.Errorf("%s is not a folder", dir)
	default:
		st.Original.DirExisted = true
	}

	path := filepath.Join(dir, hostsFileName)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("reading hosts.toml: %w", err)
	default:
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("reading hosts.toml: %w", err)
		}
		st.Original = original{Present: true, Mode: fi.Mode().Perm(), SHA256: digest(b), DirExisted: true}
		if err := writeFileAtomic(filepath.Join(dir, backupFileName), b, 0o600); err != nil {
			return nil, fmt.Errorf("backing up hosts.toml: %w", err)
		}
	}
	// the state goes last: without it a later run starts over
	if err := writeState(dir, st); err != nil {
		return nil, err
	}
	return st, nil
}

// previousHosts returns what containerd used for reg before peermirror:
// the folder's own original hosts.toml, or, when peermirror made the
// folder, _default's. note names the source when it is a file.
func previousHosts(certsDir, dir, reg string, st *state, orig []byte) (*hostsFile, string, error) {
	if st.Original.Present {
		f, err := parseHostsFile(orig)
		if err != nil {
			return nil, "", fmt.Errorf("reading the original hosts.toml: %w", err)
		}
		return &f, "the original hosts.toml", nil
	}
	if st.Original.DirExisted || reg == DefaultRegistry {
		return nil, "", nil
	}
	defDir := filepath.Join(certsDir, DefaultRegistry)
	if _, err := os.Stat(defDir); err != nil {
		return nil, "", nil
	}
	// _default's own original when peermirror manages it too
	var b []byte
	defState, err := readState(defDir)
	if err != nil {
		return nil, "", err
	}
	if defState != nil {
		if !defState.Original.Present {
			return nil, "", nil
		}
		if b, err = readBackup(defDir, defState); err != nil {
			return nil, "", err
		}
	} else {
		b, err = os.ReadFile(filepath.Join(defDir, hostsFileName))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, "", nil
		} else if err != nil {
			return nil, "", fmt.Errorf("reading _default/hosts.toml: %w", err)
		}
	}
	f, err := parseHostsFile(b)
	if err != nil {
		return nil, "", fmt.Errorf("reading _default/hosts.toml: %w", err)
	}
	rel, _ := filepath.Rel(dir, defDir)
	f = f.rebase(filepath.ToSlash(rel))
	return &f, "_default/hosts.toml", nil
}

// folderCertSettings names the Docker-style certificate files of dir.
func folderCertSettings(dir string) ([]setting, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading registry folder: %w", err)
	}
	var names []string
	files := map[string]bool{}
	for _, e := range entries {
		if !e.IsDir() {
			names = append(names, e.Name())
			files[e.Name()] = true
		}
	}
	return dockerCertSettings(names, func(n string) bool { return files[n] }), nil
}

func hasKey(ss []setting, k string) bool {
	return slices.ContainsFunc(ss, func(s setting) bool { return s.key == k })
}

// Cleanup puts back every registry folder under certsDir that Configure
// wrote to: the original hosts.toml, byte for byte and with its mode, or
// no hosts.toml where there was none, and without the folders Configure
// made. Folders Configure never touched are left alone, and running
// Cleanup again changes nothing.
func Cleanup(certsDir string) (Report, error) {
	if certsDir == "" {
		return Report{}, errors.New("no certs folder given")
	}
	if _, err := os.Stat(certsDir); errors.Is(err, fs.ErrNotExist) {
		return Report{}, nil
	}
	names, err := ownedFolders(certsDir)
	if err != nil {
		return Report{}, err
	}
	var rep Report
	var errs []error
	for _, name := range names {
		ch, err := restoreFolder(certsDir, name)
		if err != nil {
			errs = append(errs, fmt.Errorf("restoring %s: %w", name, err))
			continue
		}
		rep.Changes = append(rep.Changes, ch)
	}
	return rep, errors.Join(errs...)
}

// ownedFolders lists the folders under certsDir that hold peermirror's
// state.
func ownedFolders(certsDir string) ([]string, error) {
	entries, err := os.ReadDir(certsDir)
	if err != nil {
		return nil, fmt.Errorf("reading certs folder: %w", err)
	}
	var out []string
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		if _, err := os.Stat(filepath.Join(certsDir, e.Name(), stateFileName)); err == nil {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// restoreFolder undoes Configure in one registry folder.
func restoreFolder(certsDir, name string) (Change, error) {
	dir := filepath.Join(certsDir, name)
	path := filepath.Join(dir, hostsFileName)
	st, err := readState(dir)
	if err != nil || st == nil {
		return Change{}, err
	}
	ch := Change{Registry: st.Registry, Path: path}
	orig, err := readBackup(dir, st)
	if err != nil {
		return ch, err
	}

	// keep a copy of a file someone changed after peermirror wrote it
	cur, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return ch, fmt.Errorf("reading hosts.toml: %w", err)
	}
	if err == nil && digest(cur) != st.Written && (!st.Original.Present || digest(cur) != st.Original.SHA256) {
		if err := writeFileAtomic(filepath.Join(dir, replacedFileName), cur, 0o600); err != nil {
			return ch, fmt.Errorf("keeping the changed hosts.toml: %w", err)
		}
		ch.Notes = append(ch.Notes,
			"hosts.toml had been changed since peermirror wrote it; that version "+
				"is kept as "+replacedFileName)
	}

	if st.Original.Present {
		if err := writeFileAtomic(path, orig, st.Original.Mode); err != nil {
			return ch, fmt.Errorf("restoring hosts.toml: %w", err)
		}
		ch.Action = ActionRestored
	} else {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return ch, fmt.Errorf("removing hosts.toml: %w", err)
		}
		ch.Action = ActionRemoved
	}
	// the backup goes before the state, so a crash leaves a state that
	// still says what to do
	for _, n := range []string{backupFileName, stateFileName} {
		if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return ch, fmt.Errorf("removing %s: %w", n, err)
		}
	}
	// folders made by Configure, deepest first, when empty
	created := slices.Clone(st.CreatedDirs)
	slices.SortFunc(created, func(a, b string) int { return len(b) - len(a) })
	for _, rel := range created {
		d := filepath.Join(certsDir, rel)
		if rel == "." && hasOwnedFolder(certsDir) {
			continue
		}
		if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if isNotEmpty(err) {
				ch.Notes = append(ch.Notes, "left "+d+" in place: it holds other files")
				continue
			}
			return ch, fmt.Errorf("removing %s: %w", d, err)
		}
	}
	return ch, nil
}

// hasOwnedFolder reports whether a folder under certsDir still holds
// peermirror's state.
func hasOwnedFolder(certsDir string) bool {
	names, err := ownedFolders(certsDir)
	return err != nil || len(names) > 0
}

func isNotEmpty(err error) bool {
	return errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST)
}

// readState reads peermirror.json from dir; nil when there is none.
func readState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("reading %s: %w", stateFileName, err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", stateFileName, err)
	}
	if st.Version < 1 || st.Version > stateVersion {
		return nil, fmt.Errorf("decoding %s: unknown version %d", stateFileName, st.Version)
	}
	return &st, nil
}

// writeState writes peermirror.json to dir.
func writeState(dir string, st *state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding %s: %w", stateFileName, err)
	}
	if err := writeFileAtomic(filepath.Join(dir, stateFileName), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", stateFileName, err)
	}
	return nil
}

// readBackup returns the original hosts.toml kept in dir, checked against
// its recorded digest; nil when there was none.
func readBackup(dir string, st *state) ([]byte, error) {
	if !st.Original.Present {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(dir, backupFileName))
	if err != nil {
		return nil, fmt.Errorf("reading the backup of the original hosts.toml: %w", err)
	}
	if digest(b) != st.Original.SHA256 {
		return nil, fmt.Errorf(
			"reading the backup of the original hosts.toml: %s does not match its "+
				"recorded digest", backupFileName)
	}
	return b, nil
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// writeFileAtomic replaces path with data: a reader (containerd reads
// hosts.toml on every pull) sees the old file or the new one, never half.
func writeFileAtomic(path string, data []byte, mode fs.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // a no-op once renamed
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
