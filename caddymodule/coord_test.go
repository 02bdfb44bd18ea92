package caddymodule

import (
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/dht"
)

func TestClaimTable(t *testing.T) {
	tab := &claimTable{m: map[digest.Digest]claim{}}
	d := digest.FromString("layer")
	now := time.Now()
	c, err := tab.take(d, "A", "http://a", now)
	if err != nil || !c.Granted || c.Fetcher != "A" {
		t.Fatalf("first claim: %+v %v; want granted to A", c, err)
	}
	if c, _ := tab.take(d, "B", "http://b", now.Add(time.Second)); c.Granted || c.Fetcher != "A" || c.URL != "http://a" {
		t.Errorf("second asker: %+v; want pointed at A", c)
	}
	// A renews; B still waits on A past the first lease
	if c, _ := tab.take(d, "A", "http://a", now.Add(4*time.Second)); !c.Granted {
		t.Errorf("renewal: %+v", c)
	}
	if c, _ := tab.take(d, "B", "http://b", now.Add(8*time.Second)); c.Granted {
		t.Errorf("B got the claim while A's renewed lease runs: %+v", c)
	}
	// a lapsed lease goes to the next asker
	if c, _ := tab.take(d, "B", "http://b", now.Add(20*time.Second)); !c.Granted || c.Fetcher != "B" {
		t.Errorf("after the lease: %+v; want granted to B", c)
	}
	// only the holder releases
	tab.release(d, "A")
	if c, _ := tab.take(d, "C", "http://c", now.Add(21*time.Second)); c.Granted {
		t.Errorf("A released B's claim: %+v", c)
	}
	tab.release(d, "B")
	if c, _ := tab.take(d, "C", "http://c", now.Add(21*time.Second)); !c.Granted {
		t.Errorf("after B's release: %+v; want granted to C", c)
	}
}

func TestClaimTableBound(t *testing.T) {
	tab := &claimTable{m: map[digest.Digest]claim{}}
	now := time.Now()
	for i := 0; i < maxClaims; i++ {
		if _, err := tab.take(digest.FromString(fmt.Sprint(i)), "A", "", now); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tab.take(digest.FromString("one more"), "A", "", now); err == nil {
		t.Error("a full table took one more claim")
	}
	// expired claims make room
	if c, err := tab.take(digest.FromString("one more"), "A", "", now.Add(claimLease+time.Second)); err != nil || !c.Granted {
		t.Errorf("after the leases: %+v %v", c, err)
	}
}

// TestRendezvous checks that every node picks the same coordinator from
// the same set, whatever the order, and that digests spread over nodes.
func TestRendezvous(t *testing.T) {
	var ps []dht.Peer
	for i := 0; i < 10; i++ {
		ps = append(ps, dht.Peer{ID: peer.ID(fmt.Sprintf("peer-%d", i))})
	}
	counts := map[peer.ID]int{}
	for i := 0; i < 1000; i++ {
		d := digest.FromString(fmt.Sprint(i))
		a := rendezvous(d, ps)
		rev := make([]dht.Peer, len(ps))
		for j := range ps {
			rev[len(ps)-1-j] = ps[j]
		}
		if b := rendezvous(d, rev); b.ID != a.ID {
			t.Fatalf("order changed the coordinator of %s: %s vs %s", d, a.ID, b.ID)
		}
		counts[a.ID]++
	}
	for _, p := range ps {
		if counts[p.ID] < 50 {
			t.Errorf("peer %s coordinates %d of 1000 digests; want about 100", p.ID, counts[p.ID])
		}
	}
	// removing a node moves only its digests
	moved := 0
	for i := 0; i < 1000; i++ {
		d := digest.FromString(fmt.Sprint(i))
		if a, b := rendezvous(d, ps), rendezvous(d, ps[1:]); a.ID != ps[0].ID && a.ID != b.ID {
			moved++
		}
	}
	if moved != 0 {
		t.Errorf("%d digests changed coordinator although theirs stayed", moved)
	}
}
