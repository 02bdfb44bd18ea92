package hoststoml

import (
	"strings"
	"testing"
)

func TestParseMirror(t *testing.T) {
	tests := []struct {
		in      string
		want    string
		wantErr string
	}{
		{in: "http://127.0.0.1:30020", want: "http://127.0.0.1:30020"},
		{in: "http://127.0.0.1:30020/", want: "http://127.0.0.1:30020"},
		{in: "https://mirror.internal:8443/prefix/", want: "https://mirror.internal:8443/prefix"},
		{in: "http://mirror.internal", want: "http://mirror.internal"},
		{in: "127.0.0.1", want: "http://127.0.0.1:30020"},
		{in: "10.0.0.2:5000", want: "http://10.0.0.2:5000"},
		{in: "mirror.internal", want: "http://mirror.internal:30020"},
		{in: "mirror.internal:31000", want: "http://mirror.internal:31000"},
		// IPv6 always in brackets
		{in: "::1", want: "http://[::1]:30020"},
		{in: "fd00::2", want: "http://[fd00::2]:30020"},
		{in: "[fd00::2]:30021", want: "http://[fd00::2]:30021"},
		{in: "http://[fd00::2]:30021", want: "http://[fd00::2]:30021"},
		{in: "http://[fd00:0:0::2]", want: "http://[fd00::2]"},
		{in: "[::1]", wantErr: "want a URL"},
		{in: "http://fd00::2:30021", wantErr: "must be in brackets"},
		{in: "fe80::1%eth0", wantErr: "zones"},
		{in: "http://[fe80::1%25eth0]:30020", wantErr: "zones"},
		{in: "", wantErr: "empty"},
		{in: "ftp://127.0.0.1", wantErr: "scheme"},
		{in: "http://user:pw@127.0.0.1:1", wantErr: "no user"},
		{in: "http://127.0.0.1:1?x=1", wantErr: "no user"},
		{in: "127.0.0.1:0", wantErr: "bad port"},
		{in: "127.0.0.1:99999", wantErr: "bad port"},
		{in: "http://:30020", wantErr: "no host"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseMirror(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseMirror(%q) = %q, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseMirror(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}
