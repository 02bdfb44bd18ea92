package caddymodule

import "testing"

func TestParseRange(t *testing.T) {
	const size = 1000
	tests := []struct {
		header  string
		size    int64
		want    byteRange
		partial bool
		err     bool
	}{
		{header: "", size: size},
		{header: "bytes=0-99", size: size, want: byteRange{0, 100}, partial: true},
		{header: "bytes=100-", size: size, want: byteRange{100, 900}, partial: true},
		{header: "bytes=999-", size: size, want: byteRange{999, 1}, partial: true},
		{header: "bytes=0-5000", size: size, want: byteRange{0, 1000}, partial: true},
		{header: "bytes=-100", size: size, want: byteRange{900, 100}, partial: true},
		{header: "bytes=-5000", size: size, want: byteRange{0, 1000}, partial: true},
		{header: "bytes= 10 - 19 ", size: size, want: byteRange{10, 10}, partial: true},
		{header: "bytes=1000-", size: size, err: true},
		{header: "bytes=5000-6000", size: size, err: true},
		{header: "bytes=-0", size: size, err: true},
		{header: "bytes=20-10", size: size, err: true},
		{header: "bytes=abc", size: size, err: true},
		{header: "bytes=-", size: size, err: true},
		{header: "bytes=+1-2", size: size, err: true},
		{header: "bytes=1--2", size: size, err: true},
		{header: "bytes=99999999999999999999-", size: size, err: true},
		{header: "bytes=0-0", size: 0, err: true},
		{header: "bytes=-1", size: 0, err: true},
		// whole blob: unknown unit, several ranges
		{header: "items=0-1", size: size},
		{header: "bytes=0-1,5-6", size: size},
	}
	for _, tt := range tests {
		got, partial, err := parseRange(tt.header, tt.size)
		if (err != nil) != tt.err {
			t.Errorf("parseRange(%q, %d) error = %v, want error %v", tt.header, tt.size, err, tt.err)
			continue
		}
		if partial != tt.partial || (partial && got != tt.want) {
			t.Errorf("parseRange(%q, %d) = %+v, %v; want %+v, %v", tt.header, tt.size, got, partial, tt.want, tt.partial)
		}
	}
}
