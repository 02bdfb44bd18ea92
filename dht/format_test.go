package dht

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multihash"
)

func testPeerID(t *testing.T) peer.ID {
	t.Helper()
	key, err := generateKey()
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestPeerListRoundTrip(t *testing.T) {
	id1, id2 := testPeerID(t), testPeerID(t)
	in := PeerList{Peers: []PeerInfo{
		{ID: id1, Addrs: []ma.Multiaddr{ma.StringCast("/ip4/10.0.0.2/tcp/5001"), ma.StringCast("/ip6/fd00::2/tcp/5001")}, MirrorPort: 30020},
		{ID: id2, MirrorPort: 30021},
	}}
	var buf bytes.Buffer
	if err := EncodePeerList(&buf, in); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `"version":1`) || !strings.Contains(buf.String(), `"mirror_port":30020`) ||
		!strings.Contains(buf.String(), `"id":"`+id1.String()+`"`) ||
		!strings.Contains(buf.String(), `"addrs":[]`) {
		t.Errorf("encoded peer list does not follow the format: %s", buf.String())
	}
	out, err := DecodePeerList(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if out.Version != 1 || len(out.Peers) != 2 || out.Peers[0].ID != id1 || len(out.Peers[0].Addrs) != 2 ||
		!out.Peers[0].Addrs[1].Equal(in.Peers[0].Addrs[1]) || out.Peers[1].MirrorPort != 30021 {
		t.Errorf("round trip = %+v, want %+v", out, in)
	}
}

func TestPeerListVersionTolerance(t *testing.T) {
	id := testPeerID(t)
	// a version 2 writer: unknown fields at every level, an address this
	// version cannot parse, an address with /p2p and a peer with a bad ID
	doc := `{
	  "version": 2,
	  "cluster": "prod-eu",
	  "peers": [
	    {"id": "` + id.String() + `",
	     "addrs": ["/ip4/10.0.0.2/tcp/5001", "/future-transport/x", "/ip4/10.0.0.2/tcp/5002/p2p/` + id.String() + `"],
	     "mirror_port": 30020,
	     "zone": "eu-1a",
	     "capabilities": {"range": true}},
	    {"id": "not-a-peer-id", "addrs": [], "mirror_port": 1}
	  ]
	}`
	pl, err := DecodePeerList(strings.NewReader(doc))
	if err != nil {
		t.Fatalf("a version 2 peer list was refused: %v", err)
	}
	if pl.Version != 2 || len(pl.Peers) != 1 {
		t.Fatalf("decoded %+v, want version 2 with one usable peer", pl)
	}
	p := pl.Peers[0]
	if p.ID != id || p.MirrorPort != 30020 || len(p.Addrs) != 2 ||
		p.Addrs[0].String() != "/ip4/10.0.0.2/tcp/5001" || p.Addrs[1].String() != "/ip4/10.0.0.2/tcp/5002" {
		t.Errorf("decoded peer %+v", p)
	}

	for _, bad := range []string{`{"peers":[]}`, `{"version":0,"peers":[]}`, `[1,2]`, `{"version":1`} {
		if _, err := DecodePeerList(strings.NewReader(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
	big := `{"version":1,"peers":[],"pad":"` + strings.Repeat("x", maxPeerListSize) + `"}`
	if _, err := DecodePeerList(strings.NewReader(big)); err == nil {
		t.Error("accepted a peer list over 1 MiB")
	}
}

func TestInfoVersionTolerance(t *testing.T) {
	doc, err := decodeInfo(strings.NewReader(`{"version":2,"mirror_port":30020,"tls_port":30443,"features":["hedge"]}`))
	if err != nil || doc.MirrorPort != 30020 || doc.Version != 2 {
		t.Errorf("version 2 info = %+v, %v; want accepted with port 30020", doc, err)
	}
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(infoDoc{Version: InfoVersion, MirrorPort: 30021}); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(buf.String()); got != `{"version":1,"mirror_port":30021}` {
		t.Errorf("info document %s", got)
	}
	for _, bad := range []string{
		`{"mirror_port":30020}`, `{"version":1}`, `{"version":1,"mirror_port":70000}`, `nope`,
		`{"version":1,"mirror_port":1,"pad":"` + strings.Repeat("x", maxInfoSize) + `"}`,
	} {
		if _, err := decodeInfo(strings.NewReader(bad)); err == nil {
			t.Errorf("accepted info %s", bad)
		}
	}
}

func TestKeyCID(t *testing.T) {
	const key = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
	c := KeyCID(key)
	if c.Version() != 1 || c.Type() != cid.Raw {
		t.Errorf("KeyCID is v%d codec %x, want v1 raw", c.Version(), c.Type())
	}
	dec, err := multihash.Decode(c.Hash())
	if err != nil || dec.Code != multihash.SHA2_256 {
		t.Fatalf("multihash %v, %v; want sha2-256", dec, err)
	}
	// the preimage is versioned: not the plain key
	plain, _ := multihash.Sum([]byte(key), multihash.SHA2_256, -1)
	if bytes.Equal(c.Hash(), plain) {
		t.Error("KeyCID hashes the bare key, want the versioned preimage")
	}
	want, _ := multihash.Sum([]byte("peermirror/key/v1\x00"+key), multihash.SHA2_256, -1)
	if !bytes.Equal(c.Hash(), want) {
		t.Error("KeyCID changed: nodes of this version would no longer find each other's records")
	}
	if KeyCID("docker.io/library/nginx:1.27").Equals(c) {
		t.Error("two keys share a CID")
	}
}

func TestKeyPEMRoundTrip(t *testing.T) {
	key, err := generateKey()
	if err != nil {
		t.Fatal(err)
	}
	data, err := encodeKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), "-----BEGIN PRIVATE KEY-----") {
		t.Errorf("key file does not start with a PKCS #8 PEM header:\n%s", data)
	}
	back, err := decodeKeyPEM(data)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Equals(key) {
		t.Error("key changed in a round trip")
	}
	// the same key as `openssl genpkey -algorithm ed25519` writes it
	const opensslKey = "-----BEGIN PRIVATE KEY-----\n" +
		"MC4CAQAwBQYDK2VwBCIEIED3Sg4Xd29MB9SjYDFLvf1U1/zNuOtvZ6X05PJy7yhO\n" +
		"-----END PRIVATE KEY-----\n"
	if _, err := decodeKeyPEM([]byte(opensslKey)); err != nil {
		t.Errorf("openssl ed25519 key refused: %v", err)
	}
}
