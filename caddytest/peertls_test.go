package caddytest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
	"github.com/peermirror/peermirror/internal/testenv"
)

// testCA is a certificate authority for a test's nodes.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	file string // its certificate, PEM
}

func newTestCA(t *testing.T, dir, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{cert: cert, key: key, file: filepath.Join(dir, name+"-ca.pem")}
	writePEM(t, ca.file, "CERTIFICATE", der)
	return ca
}

// issue makes a node certificate, for serving and for client use, and
// returns the paths of its certificate and key.
func (ca *testCA) issue(t *testing.T, dir, name string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	kb, _ := x509.MarshalECPrivateKey(key)
	writePEM(t, keyFile, "EC PRIVATE KEY", kb)
	return certFile, keyFile
}

func writePEM(t *testing.T, path, kind string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// tlsNodeOptions runs a node's peer listener on peerPort with Caddy's TLS
// and client_auth, tells peers that port, and makes the node ask peers
// over HTTPS with its certificate. The plain mirror stays for its own
// containerd.
func tlsNodeOptions(ca *testCA, cert, key string, peerPort int) testenv.NodeOptions {
	return testenv.NodeOptions{
		// peers reach the listener by IP, with no SNI to match the Host
		// header against: the certificate check is the CA's
		Global: fmt.Sprintf("\tauto_https disable_redirects\n\tservers :%d {\n\t\tstrict_sni_host insecure_off\n\t}\n",
			peerPort),
		MirrorPort: peerPort,
		Extra:      fmt.Sprintf("\t\tpeer_tls {\n\t\t\tca %s\n\t\t\tcert %s\n\t\t\tkey %s\n\t\t}", ca.file, cert, key),
		Sites: fmt.Sprintf("\nhttps://:%d {\n\ttls %s %s {\n\t\tclient_auth {\n\t\t\tmode require_and_verify\n"+
			"\t\t\ttrust_pool file %s\n\t\t}\n\t}\n\tpeermirror {\n\t\tpeers_only\n\t}\n}\n", peerPort, cert, key, ca.file),
	}
}

// TestPeerTLS: two nodes serve each other only on a listener with mutual
// TLS. B's mirror gets A's layer from A over it; plain HTTP, HTTPS without
// a client certificate and a certificate of another CA are refused there.
// It logs the throughput of one large blob through a peer, with TLS and
// (on two more nodes) without.
func TestPeerTLS(t *testing.T) {
	skipShort(t)
	dir := t.TempDir()
	ca := newTestCA(t, dir, "cluster")
	other := newTestCA(t, dir, "other")
	reg := testenv.StartRegistry(t)
	img := reg.PushUncompressedImage(t, "team/tls", "v1", 1, 128<<20)
	layer := img.Layers[0]

	certA, keyA := ca.issue(t, dir, "a")
	certB, keyB := ca.issue(t, dir, "b")
	portA, portB := testenv.FreePort(t), testenv.FreePort(t)
	a := testenv.StartNode(t, "A", upstreamHost, reg.URL, tlsNodeOptions(ca, certA, keyA, portA))
	optsB := tlsNodeOptions(ca, certB, keyB, portB)
	optsB.Bootstrap = []string{a.Mirror.URL + dht.PeerListPath}
	b := testenv.StartNode(t, "B", upstreamHost, reg.URL, optsB)
	a.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitLog(t, a.Mirror, `"msg":"provided key"`, layer.String())

	tlsGet := func(cfg *tls.Config) (int, error) {
		c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		req, _ := http.NewRequest(http.MethodHead, "https://127.0.0.1:"+strconv.Itoa(portA)+blobPath(img, layer), nil)
		req.Header.Set("X-Peermirror-Forwarded", "1")
		resp, err := c.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	good, _ := tls.LoadX509KeyPair(certB, keyB)
	certO, keyO := other.issue(t, dir, "outsider")
	outsider, _ := tls.LoadX509KeyPair(certO, keyO)
	if status, err := tlsGet(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{good}}); err != nil || status != http.StatusOK {
		t.Errorf("a node's certificate on A's peer listener: %d %v, want 200", status, err)
	}
	if status, err := tlsGet(&tls.Config{RootCAs: pool}); err == nil {
		t.Errorf("no client certificate: %d, want a refused handshake", status)
	}
	if status, err := tlsGet(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{outsider}}); err == nil {
		t.Errorf("another CA's certificate: %d, want a refused handshake", status)
	}
	if resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(portA) + blobPath(img, layer)); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP on A's peer listener served the blob")
		}
	}

	// B's mirror, asked by B's own clients in plain HTTP, fetches from A
	// over mutual TLS
	tlsRate := peerRate(t, b, img, layer, peerID(t, a))

	// the same transfer between two nodes without TLS
	c := testenv.StartNode(t, "C", upstreamHost, reg.URL, testenv.NodeOptions{})
	d := testenv.StartNode(t, "D", upstreamHost, reg.URL,
		testenv.NodeOptions{Bootstrap: []string{c.Mirror.URL + dht.PeerListPath}})
	c.Ctrd.PullRef(t, img.Ref(upstreamHost))
	waitLog(t, c.Mirror, `"msg":"provided key"`, layer.String())
	plainRate := peerRate(t, d, img, layer, peerID(t, c))
	t.Logf("a 128 MiB layer through a peer: %.0f MB/s with mutual TLS, %.0f MB/s in plain HTTP (%.2f)",
		tlsRate/1e6, plainRate/1e6, tlsRate/plainRate)
}

// peerRate GETs layer through n's mirror, which must fetch it from the
// peer id, and returns the bytes per second (best of three).
func peerRate(t *testing.T, n *node, img testenv.Image, layer digest.Digest, id string) float64 {
	t.Helper()
	waitSource(t, n, blobPath(img, layer), id)
	best := 0.0
	for i := 0; i < 3; i++ {
		start := time.Now()
		resp, err := plainClient().Get(n.Mirror.URL + blobPath(img, layer))
		if err != nil {
			t.Fatal(err)
		}
		h := digest.Canonical.Digester()
		k, err := io.Copy(h.Hash(), resp.Body)
		resp.Body.Close()
		if err != nil || h.Digest() != layer || source(resp) != id {
			t.Fatalf("GET through %s: %d bytes, %v, from %q", n.Name, k, err, source(resp))
		}
		best = max(best, float64(k)/time.Since(start).Seconds())
	}
	return best
}
