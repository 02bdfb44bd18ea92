package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Network namespaces for multi-node tests.
//
// A [Network] is a set of Linux bridges in the root network namespace, one
// per subnet, and a [Host] is a network namespace with one veth pair per
// bridge: the namespace side is named eth0, eth1, ... and holds the host's
// addresses, the root side is a port of the bridge. Each bridge holds the
// first address of its subnet, so the test process and the daemons that
// stay in the root namespace (containerd, the registry) reach every host
// through it. Hosts have no route but their subnets: nothing they send can
// leave the bridges.
//
// Addresses come from private test ranges that exist only on these
// bridges: 10.77.<n>.0/24 and fd77:<n>::/64, with <n> chosen per bridge so
// that runs side by side do not collide; the bridge is .1 (::1), hosts are
// .2 (::2) upward in the order they were added.
//
// Names carry the owner: namespaces are "pmtest-<pid>-<id>-<host>", links
// are "pmb<id><subnet>" (bridges) and "pmv<id><subnet><host>" (root ends of
// veth pairs) with the alias "peermirror-testenv owner=<pid>", and
// /etc/netns/<namespace> holds each host's hosts file. t.Cleanup removes
// them all; the first network of a test binary also removes those left by
// test binaries that died before their cleanups ran.

const (
	// NetnsMirrorPort is the mirror port of a node in a namespace: every
	// namespace has its own ports, so all nodes use the same one, as a
	// DaemonSet would.
	NetnsMirrorPort = 30020
	// NetnsP2PPort is the libp2p port of a node in a namespace.
	NetnsP2PPort = 5001

	netnsNamePrefix = "pmtest-"
	bridgePrefix    = "pmb"
	vethPrefix      = "pmv"
	linkAliasPrefix = "peermirror-testenv owner="
	netnsEtcDir     = "/etc/netns"
	netnsRunDir     = "/run/netns"
	// subnetLockPath serializes the choice of subnets between test
	// binaries that run at the same time.
	subnetLockPath = "/run/peermirror-testenv-subnets.lock"
	maxHosts       = 250
)

// Family selects the address families of a [Network]'s hosts.
type Family int

const (
	// IPv4 gives each host one address in 10.77.<n>.0/24 per subnet.
	IPv4 Family = 1 << iota
	// IPv6 gives each host one address in fd77:<n>::/64 per subnet.
	IPv6
	// DualStack gives each host both.
	DualStack = IPv4 | IPv6
)

// NetworkOptions shape a [Network].
type NetworkOptions struct {
	// Subnets is the number of bridges; every host gets one interface on
	// each. Default 1.
	Subnets int
	// Family is the address families hosts get. Default IPv4.
	Family Family
}

// Subnet is one bridge of a [Network].
type Subnet struct {
	// Bridge is the bridge's link name in the root namespace.
	Bridge string
	// V4 and V6 are the subnet's prefixes; a family the network does not
	// use has an invalid prefix.
	V4, V6 netip.Prefix
	// GatewayV4 and GatewayV6 are the bridge's own addresses, by which
	// hosts reach the root namespace.
	GatewayV4, GatewayV6 netip.Addr
}

// Network is a set of bridges and the namespaces (hosts) attached to them,
// made by [NewNetwork].
type Network struct {
	// ID is the random part of every name the network uses.
	ID      string
	Subnets []Subnet

	mu    sync.Mutex
	hosts []*Host
	names []hostsEntry
}

// Host is a network namespace attached to every bridge of its [Network],
// made by [Network.AddHost].
type Host struct {
	// Name is the name the test gave the host.
	Name string
	// Netns is the namespace's name, for `ip netns exec`.
	Netns string
	// Addrs are the host's addresses: per subnet, IPv4 then IPv6.
	Addrs []netip.Addr
	// Links are the interfaces in the namespace (eth0, eth1, ...), one per
	// subnet.
	Links []string
	// RootLinks are the root namespace ends of the veth pairs, one per
	// subnet.
	RootLinks []string

	net *Network
}

// IP returns the host's first address.
func (h *Host) IP() netip.Addr { return h.Addrs[0] }

// HostURL returns "http://<addr>:<port>", with an IPv6 address in
// brackets.
func HostURL(addr netip.Addr, port int) string {
	return "http://" + net.JoinHostPort(addr.String(), strconv.Itoa(port))
}

type hostsEntry struct {
	name  string
	addrs []netip.Addr
}

var (
	netnsProbeOnce sync.Once
	netnsProbeErr  error
	netnsSweepOnce sync.Once
)

// NetnsSupport reports why network namespaces cannot be used here (not
// root, no `ip` tool, or `ip netns add` refused), or nil. Tests skip with
// its message.
func NetnsSupport() error {
	netnsProbeOnce.Do(func() {
		if os.Geteuid() != 0 {
			netnsProbeErr = errors.New("network namespaces need root")
			return
		}
		ip, err := ipTool()
		if err != nil {
			netnsProbeErr = err
			return
		}
		name := fmt.Sprintf("%s%d-probe", netnsNamePrefix, os.Getpid())
		if out, err := runTool(childEnv(), ip, "netns", "add", name); err != nil {
			netnsProbeErr = fmt.Errorf("cannot create a network namespace: %v: %s", err, strings.TrimSpace(out))
			return
		}
		if out, err := runTool(childEnv(), ip, "netns", "del", name); err != nil {
			netnsProbeErr = fmt.Errorf("cannot delete a network namespace: %v: %s", err, strings.TrimSpace(out))
		}
	})
	return netnsProbeErr
}

// ipTool returns the path of iproute2's ip, which lives in an sbin folder
// that PATH may lack.
func ipTool() (string, error) {
	return sbinTool("ip")
}

func sbinTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("no %q tool (iproute2) found", name)
}

// runIP runs `ip args...` and calls t.Fatal on failure.
func runIP(t T, args ...string) string {
	t.Helper()
	ip, err := ipTool()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	out, err := runTool(childEnv(), ip, args...)
	if err != nil {
		t.Fatalf("testenv: %v: %s", err, strings.TrimSpace(out))
	}
	return out
}

// NewNetwork creates the bridges of a new network, with addresses in
// subnets no other bridge of this machine uses. t.Cleanup deletes them
// (after the hosts, which are cleaned up first). Call [NetnsSupport] first
// to skip where namespaces cannot be made.
func NewNetwork(t T, opts NetworkOptions) *Network {
	t.Helper()
	if err := NetnsSupport(); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	netnsSweepOnce.Do(func() { sweepStaleNetns(t) })
	if opts.Subnets <= 0 {
		opts.Subnets = 1
	}
	if opts.Family == 0 {
		opts.Family = IPv4
	}
	if opts.Subnets > 9 {
		t.Fatalf("testenv: NewNetwork: at most 9 subnets")
	}
	n := &Network{ID: randomID(t)}
	t.Cleanup(func() { n.destroy(t) })

	unlock := lockSubnets(t)
	defer unlock()
	used := usedSubnets()
	for i := 0; i < opts.Subnets; i++ {
		idx, ok := pickSubnet(used)
		if !ok {
			t.Fatalf("testenv: NewNetwork: no free 10.77.x.0/24 subnet left")
		}
		used[idx] = true
		s := Subnet{Bridge: fmt.Sprintf("%s%s%d", bridgePrefix, n.ID, i)}
		if opts.Family&IPv4 != 0 {
			s.V4 = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 77, byte(idx), 0}), 24)
			s.GatewayV4 = s.V4.Addr().Next()
		}
		if opts.Family&IPv6 != 0 {
			s.V6 = netip.PrefixFrom(v6Addr(idx, 0), 64)
			s.GatewayV6 = v6Addr(idx, 1)
		}
		// recorded before it is made, so that destroy removes it whatever
		// step fails
		n.Subnets = append(n.Subnets, s)
		for _, p := range []netip.Prefix{s.V4, s.V6} {
			if p.IsValid() {
				registerTestPrefix(p)
			}
		}
		runIP(t, "link", "add", "name", s.Bridge, "type", "bridge")
		runIP(t, "link", "set", "dev", s.Bridge, "alias", ownerAlias())
		if s.GatewayV4.IsValid() {
			runIP(t, "addr", "add", netip.PrefixFrom(s.GatewayV4, 24).String(), "dev", s.Bridge)
		}
		if s.GatewayV6.IsValid() {
			runIP(t, "addr", "add", netip.PrefixFrom(s.GatewayV6, 64).String(), "dev", s.Bridge, "nodad")
		}
		runIP(t, "link", "set", "dev", s.Bridge, "up")
	}
	var desc []string
	for _, s := range n.Subnets {
		d := s.Bridge
		for _, p := range []netip.Prefix{s.V4, s.V6} {
			if p.IsValid() {
				d += " " + p.String()
			}
		}
		desc = append(desc, d)
	}
	t.Logf("testenv: network %s: %s", n.ID, strings.Join(desc, "; "))
	return n
}

// v6Addr returns fd77:<idx>::<host>.
func v6Addr(idx, host int) netip.Addr {
	var b [16]byte
	b[0], b[1] = 0xfd, 0x77
	b[2], b[3] = byte(idx>>8), byte(idx)
	b[14], b[15] = byte(host>>8), byte(host)
	return netip.AddrFrom16(b)
}

// destroy deletes the bridges and forgets the subnets.
func (n *Network) destroy(t T) {
	t.Helper()
	ip, err := ipTool()
	if err != nil {
		return
	}
	for _, s := range n.Subnets {
		if linkExists(s.Bridge) {
			if out, err := runTool(childEnv(), ip, "link", "del", "dev", s.Bridge); err != nil {
				t.Errorf("testenv: deleting bridge %s: %v: %s", s.Bridge, err, strings.TrimSpace(out))
			}
		}
		for _, p := range []netip.Prefix{s.V4, s.V6} {
			if p.IsValid() {
				unregisterTestPrefix(p)
			}
		}
	}
}

// AddHost makes a namespace attached to every bridge, with its loopback
// up, its interfaces eth0, eth1, ... up and addressed, and an
// /etc/netns/<namespace> folder whose hosts file holds the names set with
// [Network.SetName] (and whose nsswitch.conf and resolv.conf keep name
// lookups to that file). t.Cleanup deletes it all; stop what runs in the
// namespace before (a cleanup registered later runs earlier).
func (n *Network) AddHost(t T, name string) *Host {
	t.Helper()
	clean := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			return r
		}
		if r >= 'A' && r <= 'Z' {
			return r - 'A' + 'a'
		}
		return -1
	}, name)
	if clean == "" || len(clean) > 16 {
		t.Fatalf("testenv: AddHost: host name %q must have 1 to 16 letters and digits", name)
	}
	n.mu.Lock()
	idx := len(n.hosts)
	for _, h := range n.hosts {
		if h.Name == name {
			n.mu.Unlock()
			t.Fatalf("testenv: AddHost: host %q exists already", name)
		}
	}
	if idx >= maxHosts {
		n.mu.Unlock()
		t.Fatalf("testenv: AddHost: at most %d hosts", maxHosts)
	}
	h := &Host{Name: name, Netns: fmt.Sprintf("%s%d-%s-%s", netnsNamePrefix, os.Getpid(), n.ID, clean), net: n}
	n.hosts = append(n.hosts, h)
	n.mu.Unlock()

	t.Cleanup(func() { h.destroy(t) })
	// another test binary may remove an empty /etc/netns meanwhile
	err := os.MkdirAll(h.etcDir(), 0o755)
	for try := 0; errors.Is(err, os.ErrNotExist) && try < 10; try++ {
		err = os.MkdirAll(h.etcDir(), 0o755)
	}
	if err != nil {
		t.Fatalf("testenv: AddHost: %v", err)
	}
	// Go reads nsswitch.conf and resolv.conf: names come from the hosts
	// file only, and a lookup that gets past it asks the namespace's own
	// loopback, where nothing answers.
	for file, content := range map[string]string{
		"nsswitch.conf": "hosts: files\n",
		"resolv.conf":   "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
	} {
		if err := os.WriteFile(filepath.Join(h.etcDir(), file), []byte(content), 0o644); err != nil {
			t.Fatalf("testenv: AddHost: %v", err)
		}
	}
	n.writeHosts(t, h)

	runIP(t, "netns", "add", h.Netns)
	runIP(t, "-n", h.Netns, "link", "set", "dev", "lo", "up")
	hostNum := idx + 2
	for i, s := range n.Subnets {
		inner := fmt.Sprintf("eth%d", i)
		outer := fmt.Sprintf("%s%s%d%02d", vethPrefix, n.ID, i, idx)
		h.Links = append(h.Links, inner)
		h.RootLinks = append(h.RootLinks, outer)
		runIP(t, "link", "add", "name", outer, "type", "veth", "peer", "name", inner, "netns", h.Netns)
		runIP(t, "link", "set", "dev", outer, "alias", ownerAlias())
		runIP(t, "link", "set", "dev", outer, "master", s.Bridge, "up")
		runIP(t, "-n", h.Netns, "link", "set", "dev", inner, "up")
		if s.V4.IsValid() {
			a := netip.AddrFrom4([4]byte{10, 77, s.V4.Addr().As4()[2], byte(hostNum)})
			h.Addrs = append(h.Addrs, a)
			runIP(t, "-n", h.Netns, "addr", "add", netip.PrefixFrom(a, 24).String(), "dev", inner)
		}
		if s.V6.IsValid() {
			raw := s.V6.Addr().As16()
			a := v6Addr(int(raw[2])<<8|int(raw[3]), hostNum)
			h.Addrs = append(h.Addrs, a)
			// nodad: a tentative address cannot be bound for a second or two
			runIP(t, "-n", h.Netns, "addr", "add", netip.PrefixFrom(a, 64).String(), "dev", inner, "nodad")
		}
	}
	t.Logf("testenv: host %s in namespace %s: %v", name, h.Netns, h.Addrs)
	return h
}

// Hosts returns the hosts added so far, in order.
func (n *Network) Hosts() []*Host {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]*Host(nil), n.hosts...)
}

func (h *Host) etcDir() string { return filepath.Join(netnsEtcDir, h.Netns) }

// destroy deletes the namespace (its veth pairs go with it) and its
// /etc/netns folder.
func (h *Host) destroy(t T) {
	t.Helper()
	ip, err := ipTool()
	if err != nil {
		return
	}
	if _, err := os.Stat(filepath.Join(netnsRunDir, h.Netns)); err == nil {
		if out, err := runTool(childEnv(), ip, "netns", "del", h.Netns); err != nil {
			t.Errorf("testenv: deleting namespace %s: %v: %s", h.Netns, err, strings.TrimSpace(out))
		}
	}
	// The root ends go with the namespace, unless a process still holds
	// it: delete them here too.
	for _, l := range h.RootLinks {
		if linkExists(l) {
			_, _ = runTool(childEnv(), ip, "link", "del", "dev", l)
		}
	}
	if err := os.RemoveAll(h.etcDir()); err != nil {
		t.Errorf("testenv: removing %s: %v", h.etcDir(), err)
	}
	removeEtcNetnsIfEmpty()
}

// SetName makes name resolve to addrs inside every host, now and in hosts
// added later, through /etc/netns/<namespace>/hosts (which `ip netns exec`
// mounts over /etc/hosts): a stand-in for a Kubernetes headless service.
// Files are rewritten in place, so processes running already see the
// change (Go's resolver reads the file again within 5 seconds; one that
// reads it mid-write sees it empty, and reads it again next time). With
// no addrs, the name is removed.
func (n *Network) SetName(t T, name string, addrs ...netip.Addr) {
	t.Helper()
	n.mu.Lock()
	kept := n.names[:0]
	for _, e := range n.names {
		if e.name != name {
			kept = append(kept, e)
		}
	}
	n.names = kept
	if len(addrs) > 0 {
		n.names = append(n.names, hostsEntry{name: name, addrs: append([]netip.Addr(nil), addrs...)})
	}
	hosts := append([]*Host(nil), n.hosts...)
	n.mu.Unlock()
	for _, h := range hosts {
		n.writeHosts(t, h)
	}
}

// writeHosts writes h's hosts file in place (same inode: it is
// bind-mounted into running processes).
func (n *Network) writeHosts(t T, h *Host) {
	t.Helper()
	var b strings.Builder
	b.WriteString("# written by peermirror internal/testenv\n127.0.0.1 localhost\n::1 localhost\n")
	n.mu.Lock()
	for _, e := range n.names {
		for _, a := range e.addrs {
			fmt.Fprintf(&b, "%s %s\n", a, e.name)
		}
	}
	n.mu.Unlock()
	f, err := os.OpenFile(filepath.Join(h.etcDir(), "hosts"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatalf("testenv: writing hosts file of %s: %v", h.Name, err)
	}
	_, err = f.WriteString(b.String())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("testenv: writing hosts file of %s: %v", h.Name, err)
	}
}

// Command returns the command line that runs bin with args inside the
// host's namespace (with its /etc/netns files mounted): the ip tool and
// its arguments.
func (h *Host) Command(t T, bin string, args ...string) (string, []string) {
	t.Helper()
	ip, err := ipTool()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return ip, append([]string{"netns", "exec", h.Netns, bin}, args...)
}

// Run runs a short command inside the host's namespace and returns its
// combined output.
func (h *Host) Run(t T, bin string, args ...string) (string, error) {
	t.Helper()
	ip, full := h.Command(t, bin, args...)
	return runTool(childEnv(), ip, full...)
}

// LimitIngress caps the rate of the traffic into the host (a token bucket
// on the root ends of its veth pairs), for tests that need a transfer to
// last; rate is in tc's notation, such as "100mbit". It goes away with
// the host.
func (h *Host) LimitIngress(t T, rate string) {
	t.Helper()
	tc, err := sbinTool("tc")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	for _, l := range h.RootLinks {
		if out, err := runTool(childEnv(), tc, "qdisc", "replace", "dev", l, "root",
			"tbf", "rate", rate, "burst", "256kb", "latency", "500ms"); err != nil {
			t.Fatalf("testenv: limiting %s: %v: %s", l, err, strings.TrimSpace(out))
		}
	}
}

// randomID returns 6 random hex digits.
func randomID(t T) string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return hex.EncodeToString(b[:])
}

func ownerAlias() string { return linkAliasPrefix + strconv.Itoa(os.Getpid()) }

func linkExists(name string) bool {
	_, err := os.Lstat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// lockSubnets takes the machine-wide lock for choosing subnets.
func lockSubnets(t T) func() {
	t.Helper()
	f, err := os.OpenFile(subnetLockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		t.Fatalf("testenv: locking %s: %v", subnetLockPath, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}
}

// usedSubnets returns the <n> of every 10.77.<n>.x and fd77:<n>:: address
// in the root namespace.
func usedSubnets() map[int]bool {
	used := map[int]bool{0: true, 255: true}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.Is4() {
			if b := ip.As4(); b[0] == 10 && b[1] == 77 {
				used[int(b[2])] = true
			}
			continue
		}
		if b := ip.As16(); b[0] == 0xfd && b[1] == 0x77 && b[2] == 0 {
			used[int(b[3])] = true
		}
	}
	return used
}

// pickSubnet returns a random <n> from 1 to 254 that is not used.
func pickSubnet(used map[int]bool) (int, bool) {
	start := 1
	if r, err := rand.Int(rand.Reader, big.NewInt(254)); err == nil {
		start = int(r.Int64()) + 1
	}
	for i := 0; i < 254; i++ {
		idx := (start-1+i)%254 + 1
		if !used[idx] {
			return idx, true
		}
	}
	return 0, false
}

// removeEtcNetnsIfEmpty removes /etc/netns once no namespace uses it (it
// fails, harmlessly, while another is in it).
func removeEtcNetnsIfEmpty() {
	_ = os.Remove(netnsEtcDir)
}

// sweepStaleNetns removes the namespaces, /etc/netns folders and links of
// test binaries that are gone; those of live ones are left alone.
func sweepStaleNetns(t T) {
	ip, err := ipTool()
	if err != nil {
		return
	}
	dead := func(pid int) bool {
		return pid > 0 && errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
	}
	ownerOfName := func(name string) int {
		rest, ok := strings.CutPrefix(name, netnsNamePrefix)
		if !ok {
			return 0
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, _ := strconv.Atoi(pidStr)
		return pid
	}
	for _, dir := range []string{netnsRunDir, netnsEtcDir} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			pid := ownerOfName(e.Name())
			if !dead(pid) {
				continue
			}
			if dir == netnsRunDir {
				if out, err := runTool(childEnv(), ip, "netns", "del", e.Name()); err != nil {
					t.Logf("testenv: removing stale namespace %s: %v: %s", e.Name(), err, strings.TrimSpace(out))
					continue
				}
			} else if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				t.Logf("testenv: removing stale %s: %v", filepath.Join(dir, e.Name()), err)
				continue
			}
			t.Logf("testenv: removed stale %s (owner pid %d is gone)", filepath.Join(dir, e.Name()), pid)
		}
	}
	links, _ := os.ReadDir("/sys/class/net")
	for _, l := range links {
		name := l.Name()
		if !strings.HasPrefix(name, bridgePrefix) && !strings.HasPrefix(name, vethPrefix) {
			continue
		}
		alias, err := os.ReadFile(filepath.Join("/sys/class/net", name, "ifalias"))
		if err != nil {
			continue
		}
		pidStr, ok := strings.CutPrefix(strings.TrimSpace(string(alias)), linkAliasPrefix)
		if !ok {
			continue
		}
		pid, _ := strconv.Atoi(pidStr)
		if !dead(pid) {
			continue
		}
		if out, err := runTool(childEnv(), ip, "link", "del", "dev", name); err != nil {
			t.Logf("testenv: removing stale link %s: %v: %s", name, err, strings.TrimSpace(out))
			continue
		}
		t.Logf("testenv: removed stale link %s (owner pid %d is gone)", name, pid)
	}
	removeEtcNetnsIfEmpty()
}

// testPrefixes are the subnets of live networks: the harness's clients
// and hosts.toml files may use their addresses besides loopback.
var testPrefixes = struct {
	sync.RWMutex
	m map[netip.Prefix]int
}{m: map[netip.Prefix]int{}}

func registerTestPrefix(p netip.Prefix) {
	testPrefixes.Lock()
	testPrefixes.m[p.Masked()]++
	testPrefixes.Unlock()
}

func unregisterTestPrefix(p netip.Prefix) {
	testPrefixes.Lock()
	if testPrefixes.m[p.Masked()]--; testPrefixes.m[p.Masked()] <= 0 {
		delete(testPrefixes.m, p.Masked())
	}
	testPrefixes.Unlock()
}

// allowedIP reports whether the harness may talk to ip: a loopback
// address, or one in a subnet of a live [Network].
func allowedIP(ip netip.Addr) bool {
	ip = ip.Unmap()
	if ip.IsLoopback() {
		return true
	}
	testPrefixes.RLock()
	defer testPrefixes.RUnlock()
	for p := range testPrefixes.m {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// CaddyOption changes how [StartCaddy] runs Caddy.
type CaddyOption func(*caddyOptions)

type caddyOptions struct {
	netns string
	host  netip.Addr
	port  int
}

// InNetns runs Caddy under `ip netns exec <netns>` (see [Host.Netns]), so
// that its listeners and its libp2p traffic are in that network namespace
// and it resolves names through the namespace's /etc/netns hosts file.
// Its admin API listens on the namespace's loopback, on a port of its own
// (two Caddys in one namespace must not share one: Caddy binds with
// SO_REUSEPORT, so both would answer on it).
func InNetns(netns string) CaddyOption {
	return func(o *caddyOptions) { o.netns = netns }
}

// WithMirrorAddr sets the mirror's address: URL becomes http://<ip>:<port>
// (an IPv6 address in brackets) and port is the one site is given. The
// site must listen there (bind ip, or every address of a namespace): the
// readiness probe asks that URL.
func WithMirrorAddr(ip netip.Addr, port int) CaddyOption {
	return func(o *caddyOptions) { o.host, o.port = ip, port }
}

// applyOptions sets what the options change, before the Caddyfile is made.
func (c *Caddy) applyOptions(opts []CaddyOption) {
	var o caddyOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.port != 0 {
		c.Port = o.port
		c.URL = HostURL(netip.AddrFrom4([4]byte{127, 0, 0, 1}), c.Port)
	}
	if o.host.IsValid() {
		c.URL = HostURL(o.host, c.Port)
	}
	if o.netns != "" {
		c.Netns = o.netns
	}
}

// command returns the binary and arguments that run Caddy with args: the
// ip tool's `netns exec` in front under [InNetns] (ip execs Caddy in
// place, so the process is Caddy's own).
func (c *Caddy) command(t T, args ...string) (string, []string) {
	t.Helper()
	if c.Netns == "" {
		return c.bin, args
	}
	ip, err := ipTool()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return ip, append([]string{"netns", "exec", c.Netns, c.bin}, args...)
}

// Kill kills Caddy with SIGKILL, as a crash would, and waits for it to
// exit.
func (c *Caddy) Kill(t T) {
	t.Helper()
	if c.proc != nil {
		c.proc.kill()
	}
}

// Pid returns Caddy's process ID (also under [InNetns]), or 0 before it
// started.
func (c *Caddy) Pid() int {
	if c.proc == nil {
		return 0
	}
	return c.proc.cmd.Process.Pid
}

// startNetnsNode starts a node whose Caddy runs in opts.Host's namespace
// (see [NodeOptions.Host]).
func startNetnsNode(t T, name, registryHost, upstream string, opts NodeOptions) *Node {
	t.Helper()
	h := opts.Host
	n := &Node{Name: name, Ctrd: StartContainerd(t), P2PPort: NetnsP2PPort, Host: h}
	bin := opts.CaddyBinary
	if bin == "" {
		bin = CaddyBinary(t)
	}
	mirrorPort := NetnsMirrorPort
	if opts.MirrorPort != 0 {
		mirrorPort = opts.MirrorPort
	}
	var dhtLines strings.Builder
	line := func(format string, args ...any) {
		fmt.Fprintf(&dhtLines, "\t\t\t"+format+"\n", args...)
	}
	var binds []string
	if opts.DetectAddrs {
		has4, has6 := false, false
		for _, a := range h.Addrs {
			has4, has6 = has4 || a.Is4(), has6 || a.Is6()
		}
		if has4 {
			line("listen /ip4/0.0.0.0/tcp/%d", NetnsP2PPort)
		}
		if has6 {
			line("listen /ip6/::/tcp/%d", NetnsP2PPort)
		}
	} else {
		var announce []string
		for _, a := range h.Addrs {
			family := "ip4"
			if a.Is6() {
				family = "ip6"
			}
			line("listen /%s/%s/tcp/%d", family, a, NetnsP2PPort)
			announce = append(announce, a.String())
			if a.Is6() {
				binds = append(binds, "["+a.String()+"]")
			} else {
				binds = append(binds, a.String())
			}
		}
		line("announce %s", strings.Join(announce, " "))
	}
	line("mirror_port %d", mirrorPort)
	for _, b := range opts.Bootstrap {
		line("bootstrap_http %s", b)
	}
	for _, name := range opts.BootstrapDNS {
		line("bootstrap_dns %s", name)
	}
	if opts.DHTExtra != "" {
		dhtLines.WriteString(opts.DHTExtra + "\n")
	}
	bind := ""
	if len(binds) > 0 {
		bind = "\tbind " + strings.Join(binds, " ") + "\n"
	}
	extra := ""
	if opts.Extra != "" {
		extra = opts.Extra + "\n"
	}
	n.Mirror = StartCaddyWithBinary(t, bin, func(port int, admin string) string {
		return fmt.Sprintf("{\n\tadmin %s\n%s\tpeermirror {\n\t\tcontainerd {\n\t\t\taddress %s\n\t\t}\n"+
			"\t\tdht {\n%s\t\t}\n%s\t}\n}\n\nhttp://:%d {\n%s\tpeermirror\n}\n",
			admin, opts.debugOption(), n.Ctrd.Socket, dhtLines.String(), extra, port, bind)
	}, InNetns(h.Netns), WithMirrorAddr(h.IP(), NetnsMirrorPort))
	// The HTTP server may answer before the peermirror app has started
	// (apps start in no fixed order): ready means peer to peer is up.
	err := waitFor(n.Mirror.proc.done, func(ctx context.Context) bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, n.Mirror.URL+peerListPath, nil)
		resp, err := loopbackClient.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if err != nil {
		t.Fatalf("testenv: node %s: peer to peer never came up: %v", name, err)
	}
	n.Ctrd.WriteHostsToml(t, registryHost, upstream, n.Mirror.URL)
	return n
}

// peerListPath is dht.PeerListPath (not imported: the harness stays
// below the packages it tests).
const peerListPath = "/.well-known/peermirror/v1/peers"
