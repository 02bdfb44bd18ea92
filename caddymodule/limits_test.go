package caddymodule

import (
	"net/http/httptest"
	"testing"
	"time"
)

func TestUploadSlots(t *testing.T) {
	l := newUploadLimits(2, 0)
	for i := 0; i < 2; i++ {
		if !l.acquire() {
			t.Fatalf("slot %d of two not taken", i+1)
		}
	}
	if l.acquire() {
		t.Fatal("a third upload got a slot")
	}
	l.release()
	if !l.acquire() {
		t.Fatal("a released slot was not taken again")
	}
	var none *uploadLimits
	if !none.acquire() || !newUploadLimits(0, 0).acquire() {
		t.Error("no cap refused an upload")
	}
}

// TestUploadRate checks that the bandwidth cap holds: 2 MiB at 4 MiB/s
// (with a 256 KiB burst) cannot take much less than half a second.
func TestUploadRate(t *testing.T) {
	l := newUploadLimits(0, 4<<20)
	rec := httptest.NewRecorder()
	w := l.writer(rec, httptest.NewRequest("GET", "/", nil))
	buf := make([]byte, 64<<10)
	start := time.Now()
	for i := 0; i < 32; i++ {
		if _, err := w.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	if rec.Body.Len() != 2<<20 {
		t.Fatalf("wrote %d bytes, want %d", rec.Body.Len(), 2<<20)
	}
	// (2 MiB - burst) / rate = 0.44 s at least
	if took < 400*time.Millisecond {
		t.Errorf("2 MiB went out in %s under a 4 MiB/s cap", took)
	}
	t.Logf("2 MiB in %s: %.1f MiB/s", took, 2/took.Seconds())
}
