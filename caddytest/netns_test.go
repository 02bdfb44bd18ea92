package caddytest

import (
	"bufio"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// The tests in this file run every node's Caddy in a network namespace of
// its own, on its own IP, as on separate machines: a bridge joins the
// namespaces, DNS bootstrap resolves a name listed in each namespace's
// /etc/netns hosts file (a stand-in for a Kubernetes headless service),
// and containerd (in the root namespace) asks its node's mirror at the
// node's IP. Every time bound below is a hang detector, ten times the
// expected time or more, never a performance target.

// netnsPeersName is the DNS bootstrap name, resolved in every namespace to
// the nodes' addresses.
const netnsPeersName = "peers.test"

// skipNetns skips under -short and where namespaces cannot be made.
func skipNetns(t *testing.T) {
	t.Helper()
	skipShort(t)
	if err := testenv.NetnsSupport(); err != nil {
		t.Skipf("network namespace tests need root and iproute2: %v", err)
	}
}

// netnsCluster is a registry and nodes in namespaces on one network.
type netnsCluster struct {
	reg   *testenv.Registry
	net   *testenv.Network
	nodes []*node
	opts  testenv.NodeOptions
	// upstream is the registry URL in the nodes' hosts.toml: the
	// registry's own, unless a test puts a proxy in front of it
	upstream string
	// dnsAddrs picks the addresses of a host listed under netnsPeersName
	dnsAddrs func(h *testenv.Host) []netip.Addr
}

// newNetnsCluster makes a registry and a network; nodes come with addNodes.
func newNetnsCluster(t *testing.T, netOpts testenv.NetworkOptions, nodeOpts testenv.NodeOptions) *netnsCluster {
	t.Helper()
	c := &netnsCluster{reg: testenv.StartRegistry(t), net: testenv.NewNetwork(t, netOpts), opts: nodeOpts}
	c.opts.BootstrapDNS = append(c.opts.BootstrapDNS, netnsPeersName)
	c.dnsAddrs = func(h *testenv.Host) []netip.Addr { return h.Addrs[:1] }
	return c
}

// addHosts adds namespaces for names and lists them under netnsPeersName,
// before their nodes start: a headless service lists pods as they come.
func (c *netnsCluster) addHosts(t *testing.T, names ...string) []*testenv.Host {
	t.Helper()
	var hosts []*testenv.Host
	for _, name := range names {
		hosts = append(hosts, c.net.AddHost(t, name))
	}
	var addrs []netip.Addr
	for _, h := range c.net.Hosts() {
		addrs = append(addrs, c.dnsAddrs(h)...)
	}
	c.net.SetName(t, netnsPeersName, addrs...)
	return hosts
}

// startNodes starts a node in each host.
func (c *netnsCluster) startNodes(t *testing.T, hosts ...*testenv.Host) []*node {
	t.Helper()
	var out []*node
	for _, h := range hosts {
		opts := c.opts
		opts.Host = h
		upstream := c.upstream
		if upstream == "" {
			upstream = c.reg.URL
		}
		n := testenv.StartNode(t, strings.ToUpper(h.Name), upstreamHost, upstream, opts)
		// stop first, then read the whole log before it is removed
		t.Cleanup(func() {
			n.Mirror.Stop(t)
			reportLogs(t, n)
		})
		c.nodes = append(c.nodes, n)
		out = append(out, n)
	}
	return out
}

// addNodes adds hosts and starts a node in each.
func (c *netnsCluster) addNodes(t *testing.T, names ...string) []*node {
	t.Helper()
	return c.startNodes(t, c.addHosts(t, names...)...)
}

// routineWarnings are warnings every Caddy of these tests logs: plain
// HTTP, and the SIGTERM of a normal stop.
var routineWarnings = []string{"HTTP/2 skipped because it requires TLS", "HTTP/3 skipped because it requires TLS",
	"exiting; byeee!!"}

// reportLogs logs the warnings and errors n's mirror wrote, counted by
// message: the report wants them even when the test passes.
func reportLogs(t *testing.T, n *node) {
	counts := map[string]int{}
	example := map[string]string{}
	for _, level := range []string{"warn", "error"} {
		for _, l := range n.Mirror.LogLines(`"level":"` + level + `"`) {
			_, msg, _ := strings.Cut(l, `"msg":"`)
			msg, _, _ = strings.Cut(msg, `"`)
			if slices.ContainsFunc(routineWarnings, func(r string) bool { return strings.HasPrefix(msg, r) }) {
				continue
			}
			key := level + ": " + msg
			counts[key]++
			if _, ok := example[key]; !ok {
				example[key] = l
			}
		}
	}
	for key, n2 := range counts {
		t.Logf("%s logged %dx %s; first: %s", n.Name, n2, key, example[key])
	}
}

// peerList reads n's peer list document.
func peerList(t *testing.T, n *node) dht.PeerList {
	t.Helper()
	resp, body := n.Mirror.Get(t, dht.PeerListPath)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: GET %s = %d %s", n.Name, dht.PeerListPath, resp.StatusCode, body)
	}
	pl, err := dht.DecodePeerList(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("%s: peer list: %v", n.Name, err)
	}
	return pl
}

// p2pAddrs returns /ip4|ip6/<addr>/tcp/<libp2p port> for each of addrs,
// sorted.
func p2pAddrs(addrs []netip.Addr) []string {
	var out []string
	for _, a := range addrs {
		family := "ip4"
		if a.Is6() {
			family = "ip6"
		}
		out = append(out, fmt.Sprintf("/%s/%s/tcp/%d", family, a, testenv.NetnsP2PPort))
	}
	sort.Strings(out)
	return out
}

func addrStrings(pi dht.PeerInfo) []string {
	var out []string
	for _, a := range pi.Addrs {
		out = append(out, a.String())
	}
	sort.Strings(out)
	return out
}

// checkAnnounced checks that every node announces exactly its host's
// addresses and that, once the cluster has formed, every node lists every
// other one with those addresses: the IPs peers build mirror URLs from.
func (c *netnsCluster) checkAnnounced(t *testing.T) {
	t.Helper()
	want := map[string][]string{}
	for _, n := range c.nodes {
		self := peerList(t, n).Peers[0]
		if got, w := addrStrings(self), p2pAddrs(n.Host.Addrs); !slices.Equal(got, w) {
			t.Errorf("%s announces %q, want %q", n.Name, got, w)
		}
		if self.MirrorPort != testenv.NetnsMirrorPort {
			t.Errorf("%s announces mirror port %d", n.Name, self.MirrorPort)
		}
		want[self.ID.String()] = p2pAddrs(n.Host.Addrs)
	}
	deadline := time.Now().Add(60 * time.Second) // hang detector; expected: a second or two
	for _, n := range c.nodes {
		for {
			missing := []string{}
			for _, p := range peerList(t, n).Peers[1:] {
				if w, ok := want[p.ID.String()]; ok && p.MirrorPort == testenv.NetnsMirrorPort {
					for _, a := range w {
						if !slices.Contains(addrStrings(p), a) {
							missing = append(missing, p.ID.String()+a)
						}
					}
				}
			}
			known := 0
			for _, p := range peerList(t, n).Peers[1:] {
				if _, ok := want[p.ID.String()]; ok {
					known++
				}
			}
			if known == len(c.nodes)-1 && len(missing) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s knows %d of %d peers; addresses missing: %q; peer list: %+v",
					n.Name, known, len(c.nodes)-1, missing, peerList(t, n))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// tagPath is the mirror path of img's tag.
func tagPath(img testenv.Image) string {
	return "/v2/" + img.Repo + "/manifests/" + img.Tag + "?ns=" + upstreamHost
}

// blobPath is the mirror path of a blob of img.
func blobPath(img testenv.Image, d digest.Digest) string {
	return "/v2/" + img.Repo + "/blobs/" + d.String() + "?ns=" + upstreamHost
}

// waitPeerServable waits until n's mirror serves every digest of img and
// its tag (through its peers: n holds none of it).
func waitPeerServable(t *testing.T, n *node, img testenv.Image) {
	t.Helper()
	waitServable(t, n, tagPath(img))
	for _, d := range img.Layers {
		waitServable(t, n, blobPath(img, d))
	}
}

// pullAll pulls img on every node at once, through their mirrors, and
// returns how long each took. Errors fail the test.
func pullAll(t *testing.T, nodes []*node, img testenv.Image) map[string]time.Duration {
	t.Helper()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		times = map[string]time.Duration{}
	)
	for _, n := range nodes {
		wg.Add(1)
		go func(n *node) {
			defer wg.Done()
			start := time.Now()
			out, err := n.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", n.Ctrd.CertsDir, img.Ref(upstreamHost))
			mu.Lock()
			times[n.Name] = time.Since(start)
			mu.Unlock()
			if err != nil {
				t.Errorf("%s pulling %s: %v\n%s", n.Name, img.Ref(upstreamHost), err, out)
			}
		}(n)
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return times
}

// checkFromPeers checks that each node holds img and served every layer
// from a peer, and that the registry served no manifest or blob since
// before requests.
func (c *netnsCluster) checkFromPeers(t *testing.T, nodes []*node, img testenv.Image, before int) {
	t.Helper()
	for _, n := range nodes {
		checkImage(t, n.Ctrd, img)
		for _, d := range img.Layers {
			if len(n.Mirror.LogLines(`"msg":"served"`, `"source":"peer"`, d.String())) == 0 {
				t.Errorf("%s's mirror did not serve layer %s from a peer", n.Name, d)
			}
		}
	}
	if after := contentRequests(c.reg); len(after) != before {
		t.Fatalf("the registry served %d manifest or blob requests after the first pull:\n%s",
			len(after)-before, strings.Join(after[before:], "\n"))
	}
}

// peerPull is the main scenario on a formed cluster: holder pulls img from
// the registry; the others pull it through their own mirrors, from peers,
// at once; the registry serves nothing more.
func (c *netnsCluster) peerPull(t *testing.T, holder *node, pullers []*node, img testenv.Image) map[string]time.Duration {
	t.Helper()
	start := time.Now()
	holder.Ctrd.PullRef(t, img.Ref(upstreamHost))
	checkImage(t, holder.Ctrd, img)
	before := len(contentRequests(c.reg))
	if before == 0 {
		t.Fatalf("%s's pull did not reach the registry", holder.Name)
	}
	t.Logf("%s pulled %s from the registry in %s", holder.Name, img.Ref(upstreamHost), time.Since(start).Round(time.Millisecond))

	start = time.Now()
	for _, n := range pullers {
		waitPeerServable(t, n, img)
	}
	t.Logf("the others serve it from their peers after %s", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	times := pullAll(t, pullers, img)
	t.Logf("%d nodes pulled it at once in %s: %v", len(pullers), time.Since(start).Round(time.Millisecond), roundTimes(times))
	c.checkFromPeers(t, pullers, img, before)
	return times
}

func roundTimes(m map[string]time.Duration) string {
	var parts []string
	for k, v := range m {
		parts = append(parts, k+"="+v.Round(time.Millisecond).String())
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

// TestNetnsPull: three nodes, one IPv4 address each, found through DNS
// bootstrap; A pulls from the registry, B and C through their mirrors from
// A (or each other), and the registry serves nothing more.
func TestNetnsPull(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4}, testenv.NodeOptions{})
	img := c.reg.PushRandomImage(t, "team/netns", "v1", 3, 1<<20)
	nodes := c.addNodes(t, "a", "b", "c")
	c.checkAnnounced(t)
	checkDNSBootstrap(t, nodes[1:], "http://10.77.")
	c.peerPull(t, nodes[0], nodes[1:], img)
	for _, n := range nodes {
		if !strings.HasPrefix(n.Mirror.URL, "http://10.77.") {
			t.Errorf("%s's mirror is at %s", n.Name, n.Mirror.URL)
		}
	}
}

// checkDNSBootstrap checks that each node joined through DNS bootstrap:
// it fetched a peer list from an address the name resolved to (urlPrefix).
// The first node may have been joined by the others before it asked.
func checkDNSBootstrap(t *testing.T, nodes []*node, urlPrefix string) {
	t.Helper()
	for _, n := range nodes {
		if len(n.Mirror.LogLines(`"msg":"fetched peer list"`, `"url":"`+urlPrefix)) == 0 {
			t.Errorf("%s never fetched a peer list from a %s... address", n.Name, urlPrefix)
		}
	}
}

// TestNetnsIPv6Only is TestNetnsPull with nodes that have no IPv4 address
// but loopback: peers reach each other's mirrors at bracketed IPv6 URLs.
func TestNetnsIPv6Only(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv6}, testenv.NodeOptions{})
	img := c.reg.PushRandomImage(t, "team/netns6", "v1", 3, 1<<20)
	nodes := c.addNodes(t, "a", "b", "c")
	for _, n := range nodes {
		out, err := n.Host.Run(t, "ip", "-4", "-o", "addr", "show")
		if err != nil {
			t.Fatalf("%s: %v", n.Name, err)
		}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if !strings.Contains(line, " lo ") {
				t.Fatalf("%s has an IPv4 address besides loopback: %s", n.Name, line)
			}
		}
		if !strings.HasPrefix(n.Mirror.URL, "http://[fd77:") {
			t.Errorf("%s's mirror is at %s, want a bracketed IPv6 URL", n.Name, n.Mirror.URL)
		}
	}
	c.checkAnnounced(t)
	checkDNSBootstrap(t, nodes[1:], "http://[fd77:")
	c.peerPull(t, nodes[0], nodes[1:], img)
	// the peers' mirrors were reached at IPv6 URLs
	for _, n := range nodes[1:] {
		for _, p := range peerList(t, n).Peers {
			for _, a := range p.Addrs {
				if strings.HasPrefix(a.String(), "/ip4/") {
					t.Errorf("%s lists IPv4 address %s for %s", n.Name, a, p.ID)
				}
			}
		}
	}
}

// TestNetnsTwoInterfaces: every node has an interface on each of two
// bridges (two subnets) and detects its addresses itself (listening on
// 0.0.0.0, announcing nothing by hand): it must announce both, and the
// nodes still find and serve each other.
func TestNetnsTwoInterfaces(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4, Subnets: 2},
		testenv.NodeOptions{DetectAddrs: true})
	// DNS names each node by its second subnet's address, so bootstrap
	// does not go the way the mirror URLs of containerd go
	c.dnsAddrs = func(h *testenv.Host) []netip.Addr { return h.Addrs[1:2] }
	img := c.reg.PushRandomImage(t, "team/netns2", "v1", 3, 1<<20)
	nodes := c.addNodes(t, "a", "b", "c")
	c.checkAnnounced(t)
	second := c.net.Subnets[1].V4.Addr().String() // 10.77.<n>.0
	checkDNSBootstrap(t, nodes[1:], "http://"+strings.TrimSuffix(second, "0"))
	c.peerPull(t, nodes[0], nodes[1:], img)
}

// TestNetnsTenNodes: one node holds an image; the nine others pull it at
// once through their mirrors; the registry serves none of it after the
// first pull. Peer timeouts are the defaults; the resolve timeout is not:
// ten nodes and their containerds share two vCPUs in CI, and a DHT lookup
// there can take longer than the 50ms default that a node with its own
// CPU needs, which would turn a hit into a (correct) fallback upstream.
func TestNetnsTenNodes(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4},
		testenv.NodeOptions{Extra: "resolve_timeout 500ms"})
	img := c.reg.PushRandomImage(t, "team/netns10", "v1", 4, 4<<20)
	start := time.Now()
	nodes := c.addNodes(t, "n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9")
	t.Logf("ten nodes started in %s", time.Since(start).Round(time.Millisecond))

	holder, pullers := nodes[0], nodes[1:]
	holder.Ctrd.PullRef(t, img.Ref(upstreamHost))
	before := len(contentRequests(c.reg))
	// Wait until one puller resolves everything: the records are then in
	// the DHT. The other eight start cold.
	start = time.Now()
	waitPeerServable(t, pullers[len(pullers)-1], img)
	t.Logf("records findable %s after the holder's pull", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	times := pullAll(t, pullers, img)
	total := time.Since(start)
	t.Logf("nine pulls at once: %s in all; each: %s", total.Round(time.Millisecond), roundTimes(times))
	if total > 120*time.Second { // hang detector; expected: a few seconds
		t.Errorf("nine pulls took %s", total)
	}
	c.reportLoad(t, pullers, img, start)
	c.checkFromPeers(t, pullers, img, before)
}

// reportLoad logs what the load since start did to the pullers' mirrors:
// misses (404s for the image's content, each one a fallback to the
// registry), failed peer attempts, resumes, and how long DHT lookups and
// peer transfers took.
func (c *netnsCluster) reportLoad(t *testing.T, nodes []*node, img testenv.Image, start time.Time) {
	t.Helper()
	since := float64(start.UnixNano()) / 1e9
	lines := func(n *node, parts ...string) []string {
		var out []string
		for _, l := range n.Mirror.LogLines(parts...) {
			if ts, ok := logNumber(l, "ts"); ok && ts >= since {
				out = append(out, l)
			}
		}
		return out
	}
	var served, resolved []float64
	misses, failed, resumed := 0, 0, 0
	for _, n := range nodes {
		for _, l := range lines(n, `"msg":"request refused"`, `"status":404`, img.Repo) {
			misses++
			t.Logf("%s miss: %s", n.Name, l)
			// what its peer to peer side did around it
			if at, ok := logNumber(l, "ts"); ok {
				for _, d := range n.Mirror.LogLines(`"logger":"peermirror.`) {
					if ts, ok := logNumber(d, "ts"); ok && ts >= at-1 && ts <= at+0.5 {
						t.Logf("%s %+.3fs: %s", n.Name, ts-at, d)
					}
				}
			}
		}
		failed += len(lines(n, `"msg":"peer attempt failed"`))
		resumed += len(lines(n, `"msg":"resuming peer stream"`))
		for _, l := range lines(n, `"msg":"served"`, `"source":"peer"`, img.Repo) {
			if v, ok := logNumber(l, "duration"); ok {
				served = append(served, v)
			}
		}
		for _, l := range lines(n, `"msg":"resolved key"`) {
			if v, ok := logNumber(l, "took"); ok {
				resolved = append(resolved, v)
			}
		}
	}
	t.Logf("under load: %d misses, %d failed peer attempts, %d resumed streams; peer-served requests (s): %s; DHT lookups (s): %s",
		misses, failed, resumed, stats(served), stats(resolved))
}

// logNumber reads a numeric field of a JSON log line.
func logNumber(line, field string) (float64, bool) {
	_, rest, ok := strings.Cut(line, `"`+field+`":`)
	if !ok {
		return 0, false
	}
	end := strings.IndexAny(rest, ",}")
	if end < 0 {
		return 0, false
	}
	v, err := strconv.ParseFloat(strings.Trim(rest[:end], `"`), 64)
	return v, err == nil
}

func stats(v []float64) string {
	if len(v) == 0 {
		return "none"
	}
	s := slices.Clone(v)
	slices.Sort(s)
	q := func(p float64) float64 { return s[min(len(s)-1, int(p*float64(len(s))))] }
	return fmt.Sprintf("n=%d p50=%.3f p90=%.3f max=%.3f", len(s), q(0.5), q(0.9), s[len(s)-1])
}

// TestNetnsNodeKilledMidTransfer: A and B hold an image with a 64 MiB
// layer; C pulls it; the node sending C the large layer has its Caddy
// killed (SIGKILL) mid-transfer. C's pull completes (the stream resumes on
// the other holder, or containerd goes upstream) and its digests match.
// Traffic into C is paced so that the transfer lasts a few seconds.
func TestNetnsNodeKilledMidTransfer(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4}, testenv.NodeOptions{})
	phase := time.Now()
	img := c.reg.PushUncompressedImage(t, "team/big", "v1", 1, 64<<20)
	big := img.Layers[0]
	t.Logf("pushed the image in %s", time.Since(phase).Round(time.Millisecond))
	nodes := c.addNodes(t, "a", "b", "c")
	a, b, cn := nodes[0], nodes[1], nodes[2]
	phase = time.Now()
	for _, n := range []*node{a, b} {
		n.Ctrd.PullRef(t, img.Ref(upstreamHost))
		checkImage(t, n.Ctrd, img)
	}
	t.Logf("A and B pulled it in %s", time.Since(phase).Round(time.Millisecond))
	// both holders' records for the layer are in the DHT
	deadline := time.Now().Add(60 * time.Second) // hang detector; expected: a second
	for _, n := range []*node{a, b} {
		for len(n.Mirror.LogLines(`"msg":"provided key"`, big.String())) == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%s never provided %s", n.Name, big)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitServable(t, cn, tagPath(img))
	before := len(contentRequests(c.reg))

	// 128 Mbit/s into C: the layer takes about 4 s
	cn.Host.LimitIngress(t, "128mbit")
	pulled := make(chan error, 1)
	var pullOut string
	start := time.Now()
	go func() {
		out, err := cn.Ctrd.Ctr(t, "images", "pull", "--hosts-dir", cn.Ctrd.CertsDir, img.Ref(upstreamHost))
		pullOut = out
		pulled <- err
	}()

	// once a quarter of the layer is in C's containerd, kill the holder
	// that sends it
	var victim *node
	deadline = time.Now().Add(60 * time.Second) // hang detector
	for victim == nil {
		select {
		case err := <-pulled:
			t.Fatalf("C's pull ended before a quarter of the layer had arrived (%v): pace it more\n%s", err, pullOut)
		default:
		}
		if ingested(cn.Ctrd, big) >= 16<<20 {
			queued := map[*node]int{}
			for _, n := range []*node{a, b} {
				queued[n] = sendQueue(t, n.Mirror.Pid(), testenv.NetnsMirrorPort, cn.Host.IP())
			}
			switch {
			case queued[a] > 0 && queued[a] >= queued[b]:
				victim = a
			case queued[b] > 0:
				victim = b
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the large layer never reached 16 MiB in C's containerd (%d bytes)", ingested(cn.Ctrd, big))
		}
		if victim == nil {
			time.Sleep(20 * time.Millisecond)
		}
	}
	got := ingested(cn.Ctrd, big)
	victimID := peerList(t, victim).Peers[0].ID.String()
	victim.Mirror.Kill(t)
	t.Logf("killed %s's Caddy %s into C's pull, with %d MiB of the layer in C's containerd",
		victim.Name, time.Since(start).Round(time.Millisecond), got>>20)

	select {
	case err := <-pulled:
		if err != nil {
			t.Fatalf("C's pull failed after %s was killed: %v\n%s", victim.Name, err, pullOut)
		}
	case <-time.After(120 * time.Second): // hang detector; expected: a few seconds
		t.Fatalf("C's pull still runs 120 s after %s was killed", victim.Name)
	}
	t.Logf("C's pull completed %s after it started", time.Since(start).Round(time.Millisecond))
	// containerd commits a blob only under the digest it asked for
	checkImage(t, cn.Ctrd, img)

	resumes := cn.Mirror.LogLines(`"msg":"resuming peer stream"`)
	upstream := contentRequests(c.reg)[before:]
	switch {
	case len(resumes) > 0 && len(upstream) == 0:
		if !strings.Contains(resumes[0], victimID) {
			t.Errorf("C's mirror resumed a stream from another peer than %s (%s): %s", victim.Name, victimID, resumes[0])
		}
		t.Logf("C's mirror resumed the stream on the other holder: %s", resumes[0])
	case len(upstream) > 0:
		t.Logf("containerd went upstream for: %s", strings.Join(upstream, ", "))
	default:
		t.Errorf("C's mirror never resumed and the registry served nothing: was the transfer cut at all?")
	}
}

// ingested returns how many bytes of d containerd c has written so far:
// the size of its ingest file, or the whole blob once it is committed.
func ingested(c *testenv.Containerd, d digest.Digest) int64 {
	if fi, err := os.Stat(filepath.Join(c.ContentDir, "blobs", d.Algorithm().String(), d.Encoded())); err == nil {
		return fi.Size()
	}
	dirs, _ := filepath.Glob(filepath.Join(c.ContentDir, "ingest", "*"))
	for _, dir := range dirs {
		ref, err := os.ReadFile(filepath.Join(dir, "ref"))
		if err != nil || !strings.Contains(string(ref), d.String()) {
			continue
		}
		if fi, err := os.Stat(filepath.Join(dir, "data")); err == nil {
			return fi.Size()
		}
	}
	return 0
}

// sendQueue returns the bytes waiting in the send queues of the TCP
// connections from local port port to remote, in the network namespace of
// process pid (read from /proc/<pid>/net/tcp and tcp6).
func sendQueue(t *testing.T, pid, port int, remote netip.Addr) int {
	t.Helper()
	total := 0
	for _, file := range []string{"tcp", "tcp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, file))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 5 || fields[3] != "01" { // ESTABLISHED
				continue
			}
			_, lport, err := procAddr(fields[1])
			if err != nil || lport != port {
				continue
			}
			rip, _, err := procAddr(fields[2])
			if err != nil || rip.Unmap() != remote {
				continue
			}
			tx, _, _ := strings.Cut(fields[4], ":")
			n, _ := strconv.ParseUint(tx, 16, 32)
			total += int(n)
		}
		f.Close()
	}
	return total
}

// procAddr decodes an address of /proc/net/tcp: the IP as 32-bit words in
// host (little-endian) order, then the port, in hex.
func procAddr(s string) (netip.Addr, int, error) {
	ipHex, portHex, ok := strings.Cut(s, ":")
	if !ok {
		return netip.Addr{}, 0, errors.New("no port")
	}
	port, err := strconv.ParseUint(portHex, 16, 16)
	if err != nil {
		return netip.Addr{}, 0, err
	}
	raw, err := hex.DecodeString(ipHex)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.Addr{}, 0, fmt.Errorf("bad address %q", ipHex)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	ip, _ := netip.AddrFromSlice(raw)
	return ip, int(port), nil
}

// TestNetnsLateJoiner: a node started alone serves its own content and
// answers misses with fast 404s; a node started later finds it through
// DNS bootstrap and pulls from it, and the first node learns of it.
func TestNetnsLateJoiner(t *testing.T) {
	skipNetns(t)
	c := newNetnsCluster(t, testenv.NetworkOptions{Family: testenv.IPv4}, testenv.NodeOptions{})
	img := c.reg.PushRandomImage(t, "team/late", "v1", 2, 1<<20)
	a := c.addNodes(t, "a")[0]

	// alone: misses are fast 404s, for a tag and for a digest
	unknown := digest.FromString("nobody has this")
	timeMiss := func(path string) {
		t.Helper()
		start := time.Now()
		resp, body := a.Mirror.Get(t, path)
		took := time.Since(start)
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("alone, GET %s = %d %s, want 404", path, resp.StatusCode, body)
		}
		t.Logf("alone, a miss took %s: %s", took.Round(time.Microsecond), path)
		if took > 2*time.Second { // hang detector; expected: the 50 ms resolve timeout or less
			t.Errorf("alone, a miss took %s", took)
		}
	}
	timeMiss(tagPath(img))
	timeMiss(blobPath(img, unknown))
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	checkImage(t, a.Ctrd, img)
	timeMiss(blobPath(img, unknown))
	// and its own content is served
	resp, _ := a.Mirror.Get(t, tagPath(img))
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != img.Digest.String() {
		t.Fatalf("alone, A answers its own tag with %d %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
	}
	for _, d := range img.Layers {
		expectBlob(t, a.Mirror, blobPath(img, d), d)
	}
	if got := peerList(t, a).Peers; len(got) != 1 {
		t.Fatalf("A alone lists peers: %+v", got)
	}
	before := len(contentRequests(c.reg))

	// a node joins: the name now lists both
	start := time.Now()
	b := c.addNodes(t, "b")[0]
	waitPeerServable(t, b, img)
	t.Logf("B serves A's image %s after it was started", time.Since(start).Round(time.Millisecond))
	pullAll(t, []*node{b}, img)
	c.checkFromPeers(t, []*node{b}, img, before)
	c.checkAnnounced(t) // A knows B too
}
