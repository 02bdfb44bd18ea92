package caddymodule

import (
	"context"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"go.uber.org/zap/zaptest"

	"github.com/peermirror/peermirror/contentstore"
	"github.com/peermirror/peermirror/internal/testenv"
)

// recorder is an advertiseTarget that keeps the advertised set.
type recorder struct {
	mu   sync.Mutex
	keys map[string]bool
}

func (r *recorder) Advertise(keys ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range keys {
		if r.keys[k] {
			panic("advertised twice without a withdraw: " + k)
		}
		r.keys[k] = true
	}
}

func (r *recorder) Withdraw(keys ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range keys {
		if !r.keys[k] {
			panic("withdrew a key never advertised: " + k)
		}
		delete(r.keys, k)
	}
}

func (r *recorder) has(k string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.keys[k]
}

func (r *recorder) list() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for k := range r.keys {
		out = append(out, k)
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

func TestAdvertiserFollowsContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts containerd and a registry; skipped with -short")
	}
	ctrd := testenv.StartContainerd(t)
	reg := testenv.StartRegistry(t)
	early := reg.PushRandomImage(t, "team/early", "v1", 2, 16<<10)
	latest := reg.PushRandomImage(t, "team/moving", "latest", 1, 16<<10)
	ctrd.PullFromRegistry(t, reg, testRegistry, early)
	ctrd.PullFromRegistry(t, reg, testRegistry, latest)

	logger := zaptest.NewLogger(t)
	store := contentstore.New(contentstore.Config{Address: ctrd.Socket, Namespace: ctrd.Namespace}, logger)
	if err := store.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	app := &App{FilterReferences: []string{":latest$"}, logger: logger}
	if err := app.provisionFilters(); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{keys: map[string]bool{}}
	adv := newAdvertiser(store, rec, app.advertisable, time.Hour, logger)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); adv.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	eventually := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second) // hang detector
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s; advertised:\n%s", what, rec.list())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	hasAll := func(keys ...string) func() bool {
		return func() bool {
			for _, k := range keys {
				if !rec.has(k) {
					return false
				}
			}
			return true
		}
	}
	digestsOf := func(img testenv.Image) []string {
		var out []string
		for _, d := range img.All() {
			out = append(out, d.String())
		}
		return out
	}

	// on start: everything present, and the tag
	eventually("early image not advertised at start", hasAll(append(digestsOf(early), early.Ref(testRegistry))...))
	// the filter keeps the :latest image out entirely
	if rec.has(latest.Ref(testRegistry)) || rec.has(latest.Digest.String()) {
		t.Fatalf("a filtered reference was advertised:\n%s", rec.list())
	}

	// pulled after start: advertised from its event
	later := reg.PushRandomImage(t, "team/later", "v2", 1, 16<<10)
	ctrd.PullFromRegistry(t, reg, testRegistry, later)
	eventually("image pulled after start not advertised", hasAll(append(digestsOf(later), later.Ref(testRegistry))...))

	// content deleted: its digest goes; the tag stays while the root is here
	c := ctrd.Client(t)
	nsctx := namespaces.WithNamespace(context.Background(), ctrd.Namespace)
	layer := later.Layers[0]
	if err := c.ContentStore().Delete(nsctx, layer); err != nil {
		t.Fatal(err)
	}
	eventually("deleted layer still advertised", func() bool { return !rec.has(layer.String()) })
	if !rec.has(later.Ref(testRegistry)) {
		t.Fatal("the tag was withdrawn with a layer, though its root is still here")
	}

	// image deleted: its tag goes at once
	if err := c.ImageService().Delete(nsctx, early.Ref(testRegistry)); err != nil {
		t.Fatal(err)
	}
	eventually("deleted image's tag still advertised", func() bool { return !rec.has(early.Ref(testRegistry)) })
	if adv.count() == 0 {
		t.Fatal("advertiser counts no keys")
	}
}
