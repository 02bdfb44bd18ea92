// Package hoststoml puts a node-local registry mirror in front of
// containerd's registries. It writes the registry host files that
// containerd reads (<certs.d>/<registry>/hosts.toml), keeps the bytes that
// were there first so they can be put back, and checks the node's
// containerd configuration for settings that would make containerd ignore
// those files or drop the content that the mirror serves.
//
// It knows nothing of Caddy or of Kubernetes: the Caddy commands of
// caddymodule and the Helm chart call it.
package hoststoml

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// DefaultMirrorPort is the port given to a mirror target named without
// one: the port of peermirror's mirror site.
const DefaultMirrorPort = 30020

// ParseMirror turns a mirror target into the URL written as a host in
// hosts.toml. A target is a URL ("http://127.0.0.1:30020",
// "https://[fd00::1]:8443"), a host and port ("10.0.0.2:30020",
// "[fd00::2]:30020", "mirror.internal:30020") or a bare host or IP
// ("10.0.0.2", "fd00::2"), which gets DefaultMirrorPort. Targets without a
// scheme are plain HTTP. IPv6 addresses always come out in brackets; an
// IPv6 address without brackets inside a URL is refused, because its port
// cannot be told apart from its last group.
func ParseMirror(target string) (string, error) {
	target = strings.TrimSpace(target)
	if target == "" {
		return "", fmt.Errorf("parsing mirror target: empty")
	}
	if strings.Contains(target, "://") {
		return parseMirrorURL(target)
	}

	// a bare IP, IPv6 included, is unambiguous without brackets
	if addr, err := netip.ParseAddr(target); err == nil {
		if addr.Zone() != "" {
			return "", fmt.Errorf("parsing mirror target %q: IPv6 zones are not supported", target)
		}
		return "http://" + net.JoinHostPort(addr.String(), strconv.Itoa(DefaultMirrorPort)), nil
	}
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		// a host name without a port
		if strings.ContainsAny(target, ":/[]@?#% ") {
			return "", fmt.Errorf("parsing mirror target %q: want a URL, host:port or a bare host", target)
		}
		host, port = target, strconv.Itoa(DefaultMirrorPort)
	}
	if err := checkHostPort("mirror target", target, host, port); err != nil {
		return "", err
	}
	return "http://" + joinHost(host, port), nil
}

// parseMirrorURL checks a target given as a URL and normalizes it.
func parseMirrorURL(target string) (string, error) {
	return parseURL("mirror target", target)
}

// parseURL checks a URL (what names it in errors) and normalizes it: IPv6
// in brackets, no trailing slash.
func parseURL(what, target string) (string, error) {
	_, rest, _ := strings.Cut(target, "://")
	hostPart, _, _ := strings.Cut(rest, "/")
	hostPart, _, _ = strings.Cut(hostPart, "?")
	if i := strings.LastIndex(hostPart, "@"); i >= 0 {
		hostPart = hostPart[i+1:]
	}
	if strings.Count(hostPart, ":") > 1 && !strings.Contains(hostPart, "[") {
		return "", fmt.Errorf("parsing %s %q: an IPv6 address in a URL must be in brackets", what, target)
	}
	u, err := url.Parse(target)
	if err != nil {
		return "", fmt.Errorf("parsing %s %q: %w", what, target, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("parsing %s %q: scheme must be http or https", what, target)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("parsing %s %q: no user, query or fragment allowed", what, target)
	}
	host, port := u.Hostname(), u.Port()
	if err := checkHostPort(what, target, host, port); err != nil {
		return "", err
	}
	out := u.Scheme + "://" + joinHost(host, port)
	if p := strings.TrimRight(u.EscapedPath(), "/"); p != "" {
		out += p
	}
	return out, nil
}

// checkHostPort validates the parts of a target.
func checkHostPort(what, target, host, port string) error {
	if host == "" {
		return fmt.Errorf("parsing %s %q: no host", what, target)
	}
	if addr, err := netip.ParseAddr(host); err == nil && addr.Zone() != "" {
		return fmt.Errorf("parsing %s %q: IPv6 zones are not supported", what, target)
	}
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("parsing %s %q: bad port %q", what, target, port)
		}
	}
	return nil
}

// joinHost writes host and an optional port, with IPv6 in brackets.
func joinHost(host, port string) string {
	if addr, err := netip.ParseAddr(host); err == nil {
		host = addr.String()
	}
	if port == "" {
		if strings.Contains(host, ":") {
			return "[" + host + "]"
		}
		return host
	}
	return net.JoinHostPort(host, port)
}
