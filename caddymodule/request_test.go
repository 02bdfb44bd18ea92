package caddymodule

import (
	"net/url"
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	const hex = "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
	tests := []struct {
		uri      string
		kind     kind
		name     string
		registry string
		tag      string
		digest   string
		status   int
		code     string
	}{
		{uri: "/v2/", kind: kindBase},
		{uri: "/v2", kind: kindBase},
		{uri: "/v2/library/nginx/manifests/1.27?ns=docker.io", kind: kindManifest,
			name: "library/nginx", registry: "docker.io", tag: "1.27"},
		{uri: "/v2/team/app/manifests/sha256:" + hex, kind: kindManifest,
			name: "team/app", digest: "sha256:" + hex},
		{uri: "/v2/a/b/c/blobs/sha256:" + hex + "?ns=registry.test:5000", kind: kindBlob,
			name: "a/b/c", registry: "registry.test:5000", digest: "sha256:" + hex},
		{uri: "/v2/manifests/blobs/sha256:" + hex, kind: kindBlob, name: "manifests", digest: "sha256:" + hex},

		// bad names and path tricks
		{uri: "/v2/../../etc/passwd/blobs/sha256:" + hex, status: 400, code: codeNameInvalid},
		{uri: "/v2/a%2Fb/blobs/sha256:" + hex, status: 400, code: codeNameInvalid},
		{uri: "/v2/a%2e%2e/blobs/sha256:" + hex, status: 400, code: codeNameInvalid},
		{uri: "/v2/UPPER/blobs/sha256:" + hex, status: 400, code: codeNameInvalid},
		{uri: "/v2//blobs/sha256:" + hex, status: 400, code: codeNameInvalid},
		{uri: "/v2/" + strings.Repeat("a", 256) + "/blobs/sha256:" + hex, status: 400, code: codeNameInvalid},
		{uri: "/v2/a/blobs/sha256:" + hex + "?ns=docker.io&ns=ghcr.io", status: 400, code: codeNameInvalid},
		{uri: "/v2/a/blobs/sha256:" + hex + "?ns=docker.io/evil", status: 400, code: codeNameInvalid},
		{uri: "/v2/a/blobs/sha256:" + hex + "?ns=a%20b", status: 400, code: codeNameInvalid},

		// bad digests and tags
		{uri: "/v2/a/blobs/sha256:" + strings.ToUpper(hex), status: 400, code: codeDigestInvalid},
		{uri: "/v2/a/blobs/sha256:" + hex[:63], status: 400, code: codeDigestInvalid},
		{uri: "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", status: 400, code: codeDigestInvalid},
		{uri: "/v2/a/blobs/latest", status: 400, code: codeDigestInvalid},
		{uri: "/v2/a/manifests/sha256:xyz", status: 400, code: codeDigestInvalid},
		{uri: "/v2/a/manifests/" + strings.Repeat("t", 129) + "?ns=docker.io", status: 400, code: codeTagInvalid},
		{uri: "/v2/a/manifests/.hidden?ns=docker.io", status: 400, code: codeTagInvalid},

		// other API paths
		{uri: "/v2/a/tags/list", status: 404, code: codeUnsupported},
		{uri: "/v2/_catalog", status: 404, code: codeUnsupported},
		{uri: "/v2/a/blobs/uploads/", status: 404, code: codeUnsupported},
	}
	for _, tt := range tests {
		t.Run(tt.uri[:min(len(tt.uri), 60)], func(t *testing.T) {
			u, err := url.ParseRequestURI(tt.uri)
			if err != nil {
				t.Fatal(err)
			}
			got, rerr := parseRequest(u)
			if tt.status != 0 {
				if rerr == nil {
					t.Fatalf("parseRequest(%q) = %+v, want status %d", tt.uri, got, tt.status)
				}
				if rerr.status != tt.status || rerr.code != tt.code {
					t.Fatalf("parseRequest(%q) error = %d %s (%s), want %d %s",
						tt.uri, rerr.status, rerr.code, rerr.message, tt.status, tt.code)
				}
				return
			}
			if rerr != nil {
				t.Fatalf("parseRequest(%q) error = %v", tt.uri, rerr)
			}
			if got.kind != tt.kind || got.name != tt.name || got.registry != tt.registry ||
				got.tag != tt.tag || got.digest.String() != tt.digest {
				t.Fatalf("parseRequest(%q) = %+v", tt.uri, got)
			}
		})
	}
}
