package caddymodule

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/peermirror/peermirror/dht"
)

// writeKey writes a new network key file and returns its path.
func writeKey(t *testing.T, dir, name string) string {
	t.Helper()
	data, err := dht.GenerateNetworkKey()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestDHTConfigNetworkKeyAndLimits(t *testing.T) {
	dir := t.TempDir()
	key := writeKey(t, dir, "network.key")
	bad := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(bad, []byte("/key/swarm/psk/1.0.0/\n/base16/\nnot hex\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	errCases := map[string]struct {
		cfg     DHTConfig
		wantErr []string
	}{
		"quic listen with key": {
			DHTConfig{NetworkKeyFile: key, Listen: []string{"/ip4/0.0.0.0/tcp/5001", "/ip4/0.0.0.0/udp/5001/quic-v1"}},
			[]string{"listen", "/ip4/0.0.0.0/udp/5001/quic-v1", "TCP only"},
		},
		"quic bootstrap with key": {
			DHTConfig{NetworkKeyFile: key, BootstrapStatic: []string{"/ip4/10.0.0.3/udp/5001/quic-v1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"}},
			[]string{"bootstrap_static", "TCP only"},
		},
		"missing key file":   {DHTConfig{NetworkKeyFile: filepath.Join(dir, "none.key")}, []string{"network_key_file", "none.key", "no such file"}},
		"malformed key file": {DHTConfig{NetworkKeyFile: bad}, []string{"network_key_file", "bad.key", "/base16/"}},
		"low equals high":    {DHTConfig{ConnLow: 10, ConnHigh: 10}, []string{"conn_low (10)", "conn_high (10)"}},
		"low over default":   {DHTConfig{ConnLow: 1000}, []string{"conn_low (1000)", "conn_high (400)"}},
		"negative streams":   {DHTConfig{MaxInboundStreams: -1}, []string{"max_inbound_streams"}},
	}
	for name, tc := range errCases {
		t.Run(name, func(t *testing.T) {
			err := tc.cfg.provision()
			if err == nil {
				t.Fatal("provision accepted it")
			}
			for _, want := range tc.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
		})
	}

	// defaults
	var plain DHTConfig
	if err := plain.provision(); err != nil {
		t.Fatal(err)
	}
	if plain.ConnHigh != 400 || plain.ConnLow != 200 || plain.MaxInboundConns != 1024 || plain.MaxInboundStreams != 4096 {
		t.Errorf("defaults: conn_low %d conn_high %d max_inbound_conns %d max_inbound_streams %d",
			plain.ConnLow, plain.ConnHigh, plain.MaxInboundConns, plain.MaxInboundStreams)
	}
	// conn_high alone sets conn_low
	half := DHTConfig{ConnHigh: 50}
	if err := half.provision(); err != nil || half.ConnLow != 25 {
		t.Errorf("conn_high 50 alone: conn_low %d, err %v; want 25", half.ConnLow, err)
	}

	// a key: the router gets it and the limits, a new node needs it
	withKey := DHTConfig{NetworkKeyFile: key, ConnLow: 5, ConnHigh: 9, MaxInboundConns: 7, MaxInboundStreams: 70}
	if err := withKey.provision(); err != nil {
		t.Fatal(err)
	}
	rc := withKey.routerConfig()
	if rc.NetworkKeyFile != key || rc.ConnLow != 5 || rc.ConnHigh != 9 || rc.MaxInboundConns != 7 || rc.MaxInboundStreams != 70 {
		t.Errorf("router config %+v lacks the key or the limits", rc)
	}
	if withKey.poolKey() == plain.poolKey() {
		t.Error("the pool key ignores the network key and the limits")
	}
	again := withKey
	if err := again.provision(); err != nil || again.poolKey() != withKey.poolKey() {
		t.Errorf("the same config gives another pool key (err %v)", err)
	}
	// a new key in the same file needs a new node
	writeKey(t, dir, "network.key")
	rotated := DHTConfig{NetworkKeyFile: key, ConnLow: 5, ConnHigh: 9, MaxInboundConns: 7, MaxInboundStreams: 70}
	if err := rotated.provision(); err != nil {
		t.Fatal(err)
	}
	if rotated.poolKey() == withKey.poolKey() {
		t.Error("a new key in the same file keeps the pool key")
	}
	for name, tweak := range map[string]func(*DHTConfig){
		"conn_low":            func(c *DHTConfig) { c.ConnLow = 6 },
		"conn_high":           func(c *DHTConfig) { c.ConnHigh = 10 },
		"max_inbound_conns":   func(c *DHTConfig) { c.MaxInboundConns = 8 },
		"max_inbound_streams": func(c *DHTConfig) { c.MaxInboundStreams = 71 },
	} {
		c := withKey
		tweak(&c)
		if c.poolKey() == withKey.poolKey() {
			t.Errorf("a new %s keeps the pool key", name)
		}
	}
}
