package contentstore

import (
	"strings"
	"testing"
)

func TestIsImageName(t *testing.T) {
	id := "sha256:" + strings.Repeat("ab", 32)
	tests := []struct {
		name string
		want bool
	}{
		{"registry.test/team/app:v1", true},
		{"docker.io/library/nginx:1.27", true},
		{"registry.test/team/app@" + id, true},
		{"registry.test/team/app:v1@" + id, true},
		{"localhost:5000/app:v1", true},
		{id, false},              // CRI's record named by the image ID
		{"nginx:1.27", false},    // not fully qualified
		{"library/nginx", false}, // not fully qualified
		{"Registry.test/App:v1", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := isImageName(tt.name); got != tt.want {
			t.Errorf("isImageName(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}
