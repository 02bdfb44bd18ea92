package hoststoml

import (
	"bytes"
	"fmt"
	"math"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// hostsFile is what a hosts.toml holds, in the order containerd reads it:
// the hosts in file order, then the server with the top-level settings.
type hostsFile struct {
	// server is the top-level server, "" when the file names none
	// (containerd then uses the registry's own address).
	server string
	// top are the other top-level settings (ca, client, capabilities, ...),
	// which apply to the server.
	top []setting
	// hosts are the [host."<url>"] tables in file order.
	hosts []hostEntry
}

// hostEntry is one [host."<url>"] table.
type hostEntry struct {
	url      string
	settings []setting
}

// setting is one key of a table with its decoded value.
type setting struct {
	key   string
	value any
}

// parseHostsFile decodes a hosts.toml, keeping the order of its hosts and
// keys.
func parseHostsFile(b []byte) (hostsFile, error) {
	var raw map[string]any
	md, err := toml.Decode(string(b), &raw)
	if err != nil {
		return hostsFile{}, fmt.Errorf("decoding hosts.toml: %w", err)
	}
	var f hostsFile
	hostTables, _ := raw["host"].(map[string]any)
	hostIndex := map[string]int{}
	for _, k := range md.Keys() {
		switch {
		case len(k) == 1 && k[0] == "server":
			s, ok := raw["server"].(string)
			if !ok {
				return hostsFile{}, fmt.Errorf("decoding hosts.toml: server is not a string")
			}
			f.server = s
		case len(k) == 1 && k[0] != "host":
			f.top = append(f.top, setting{k[0], raw[k[0]]})
		case len(k) == 2 && k[0] == "host":
			if _, ok := hostTables[k[1]].(map[string]any); !ok {
				return hostsFile{}, fmt.Errorf("decoding hosts.toml: host %q is not a table", k[1])
			}
			hostIndex[k[1]] = len(f.hosts)
			f.hosts = append(f.hosts, hostEntry{url: k[1]})
		case len(k) == 3 && k[0] == "host":
			i, ok := hostIndex[k[1]]
			if !ok {
				continue
			}
			tbl := hostTables[k[1]].(map[string]any)
			f.hosts[i].settings = append(f.hosts[i].settings, setting{k[2], tbl[k[2]]})
		}
	}
	return f, nil
}

// rebase rewrites the relative certificate paths (ca, client) of f so
// that they still name the same files when f is written into a sibling
// folder: rel is the path from the new folder to the old one, such as
// "../_default".
func (f hostsFile) rebase(rel string) hostsFile {
	if rel == "" || rel == "." {
		return f
	}
	fix := func(ss []setting) []setting {
		out := make([]setting, len(ss))
		for i, s := range ss {
			if s.key == "ca" || s.key == "client" {
				s.value = rebasePaths(s.value, rel)
			}
			out[i] = s
		}
		return out
	}
	g := hostsFile{server: f.server, top: fix(f.top)}
	for _, h := range f.hosts {
		g.hosts = append(g.hosts, hostEntry{url: h.url, settings: fix(h.settings)})
	}
	return g
}

// rebasePaths rewrites the relative paths in a ca or client value, which
// is a string, a list of strings or a list of string pairs.
func rebasePaths(v any, rel string) any {
	switch v := v.(type) {
	case string:
		if v == "" || filepath.IsAbs(v) {
			return v
		}
		return path.Join(rel, v)
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			out[i] = rebasePaths(e, rel)
		}
		return out
	default:
		return v
	}
}

// dockerCertSettings returns the top-level settings that stand for the
// Docker-style certificate files in a registry folder (*.crt as CAs,
// *.cert with its *.key as client pairs). containerd reads those files
// only while the folder has no hosts.toml, so a hosts.toml written there
// must name them itself. names are the folder's file names.
func dockerCertSettings(names []string, has func(string) bool) []setting {
	var cas, clients []any
	sorted := append([]string(nil), names...)
	sort.Strings(sorted)
	for _, n := range sorted {
		switch {
		case strings.HasSuffix(n, ".crt"):
			cas = append(cas, n)
		case strings.HasSuffix(n, ".cert"):
			key := strings.TrimSuffix(n, ".cert") + ".key"
			if has(key) {
				clients = append(clients, []any{n, key})
			} else {
				clients = append(clients, []any{n, ""})
			}
		}
	}
	var out []setting
	if len(cas) > 0 {
		out = append(out, setting{"ca", cas})
	}
	if len(clients) > 0 {
		out = append(out, setting{"client", clients})
	}
	return out
}

// fileHeader opens every hosts.toml that peermirror writes.
const fileHeader = `# Written by peermirror (caddy peermirror-configure): the node's mirror
# first, then the registry. "caddy peermirror-cleanup" puts back what was
# here before; the original is kept beside this file until then.
`

// mirrorHost is how one mirror target is written.
type mirrorHost struct {
	url          string
	capabilities []string
	dialTimeout  string
}

// render writes a hosts.toml: the server and top-level settings, the
// mirror hosts, then the hosts kept from before (without those that name
// a mirror again).
func render(server string, top []setting, mirrors []mirrorHost, kept []hostEntry) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(fileHeader)
	if server != "" || len(top) > 0 {
		b.WriteString("\n")
	}
	if server != "" {
		fmt.Fprintf(&b, "server = %s\n", quote(server))
	}
	for _, s := range top {
		if err := writeSetting(&b, "", s); err != nil {
			return nil, err
		}
	}
	ours := map[string]bool{}
	for _, m := range mirrors {
		ours[m.url] = true
		fmt.Fprintf(&b, "\n[host.%s]\n", quote(m.url))
		fmt.Fprintf(&b, "  capabilities = %s\n", mustValue(stringsToAny(m.capabilities)))
		if m.dialTimeout != "" {
			fmt.Fprintf(&b, "  dial_timeout = %s\n", quote(m.dialTimeout))
		}
	}
	for _, h := range kept {
		if ours[strings.TrimRight(h.url, "/")] {
			continue
		}
		fmt.Fprintf(&b, "\n[host.%s]\n", quote(h.url))
		for _, s := range h.settings {
			if err := writeSetting(&b, "  ", s); err != nil {
				return nil, err
			}
		}
	}
	return b.Bytes(), nil
}

// writeSetting writes one key and its value; tables become inline tables.
func writeSetting(b *bytes.Buffer, indent string, s setting) error {
	v, err := value(s.value)
	if err != nil {
		return fmt.Errorf("writing %s: %w", s.key, err)
	}
	fmt.Fprintf(b, "%s%s = %s\n", indent, key(s.key), v)
	return nil
}

// value encodes a decoded TOML value.
func value(v any) (string, error) {
	switch v := v.(type) {
	case string:
		return quote(v), nil
	case bool:
		return strconv.FormatBool(v), nil
	case int64:
		return strconv.FormatInt(v, 10), nil
	case float64:
		switch {
		case math.IsInf(v, 1):
			return "inf", nil
		case math.IsInf(v, -1):
			return "-inf", nil
		case math.IsNaN(v):
			return "nan", nil
		}
		s := strconv.FormatFloat(v, 'g', -1, 64)
		if !strings.ContainsAny(s, ".eEn") {
			s += ".0"
		}
		return s, nil
	case []any:
		parts := make([]string, len(v))
		for i, e := range v {
			p, err := value(e)
			if err != nil {
				return "", err
			}
			parts[i] = p
		}
		return "[" + strings.Join(parts, ", ") + "]", nil
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			p, err := value(v[k])
			if err != nil {
				return "", err
			}
			parts[i] = key(k) + " = " + p
		}
		return "{" + strings.Join(parts, ", ") + "}", nil
	default:
		return "", fmt.Errorf("unsupported value of type %T", v)
	}
}

// mustValue encodes a value known to be encodable.
func mustValue(v any) string {
	s, err := value(v)
	if err != nil {
		panic(err)
	}
	return s
}

func stringsToAny(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

// key writes a bare key when TOML allows one, else a quoted key.
func key(k string) string {
	if k == "" {
		return `""`
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return quote(k)
		}
	}
	return k
}

// quote writes a TOML basic string.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			b.WriteString(`\"`)
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\r':
			b.WriteString(`\r`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\u%04X`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
