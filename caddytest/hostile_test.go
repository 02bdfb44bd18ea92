package caddytest

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/peermirror/peermirror/internal/testenv"
)

// rawTimeout bounds each raw exchange: a hang detector only.
const rawTimeout = 60 * time.Second

// rawExchange writes request to addr over a fresh TCP connection, byte for
// byte, and reads one response. A connection the server closes or resets
// comes back as a nil response with the error.
func rawExchange(t *testing.T, addr, request string) (*http.Response, []byte, error) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dialling %s: %v", addr, err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(rawTimeout)); err != nil {
		t.Fatal(err)
	}
	// write alongside the read: a server that refuses a large request
	// answers and closes before it is all sent
	written := make(chan error, 1)
	go func() {
		_, err := io.WriteString(conn, request)
		written <- err
	}()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		checkNotHung(t, err)
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	checkNotHung(t, err)
	if werr := <-written; werr != nil {
		checkNotHung(t, werr)
	}
	return resp, body, err
}

// checkNotHung fails the test when an exchange ran into the hang detector.
func checkNotHung(t *testing.T, err error) {
	t.Helper()
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("no answer within %s: %v", rawTimeout, err)
	}
}

// ociCode returns the code of a body that is exactly one OCI error, or "".
func ociCode(body []byte) string {
	var e struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &e) != nil || len(e.Errors) != 1 || e.Errors[0].Message == "" {
		return ""
	}
	return e.Errors[0].Code
}

// TestHostileRequests sends a real node requests that no client library
// would write: path tricks in the raw request line and oversized headers.
// Each must be refused with the right status, and the node must go on
// serving.
func TestHostileRequests(t *testing.T) {
	skipShort(t)
	reg := testenv.StartRegistry(t)
	img := reg.PushRandomImage(t, "team/hostile", "v1", 1, 64<<10)
	n := startNode(t, "A", reg, "")
	n.Ctrd.PullRef(t, img.Ref(upstreamHost))
	layer := img.Layers[0]
	blobPath := "/v2/team/hostile/blobs/" + layer.String() + "?ns=" + upstreamHost
	waitServable(t, n, blobPath)
	addr := strings.TrimPrefix(n.Mirror.URL, "http://")
	hex := layer.Encoded()
	refusedBefore := len(n.Mirror.LogLines(`"msg":"request refused"`))

	tests := []struct {
		name   string
		target string // the request target, written as is
		status int
		code   string // the OCI error code; "" when the server refuses before the handler
	}{
		{"dot dot out of v2", "/v2/../etc/passwd", 404, "UNSUPPORTED"},
		{"dot dot to a blob", "/v2/a/../../blobs/" + layer.String(), 400, "NAME_INVALID"},
		{"dot dot in the name", "/v2/../../../etc/passwd/blobs/" + layer.String(), 400, "NAME_INVALID"},
		{"dot dot after the digest", "/v2/team/hostile/blobs/" + layer.String() + "/../../../../etc/passwd", 404,
			"UNSUPPORTED"},
		{"empty name", "/v2//blobs/" + layer.String(), 400, "NAME_INVALID"},
		{"encoded dots", "/v2/%2e%2e/%2e%2e/blobs/" + layer.String(), 400, "NAME_INVALID"},
		{"encoded slash", "/v2/team%2Fhostile/blobs/" + layer.String(), 400, "NAME_INVALID"},
		{"encoded slashes out of v2", "/v2%2F..%2F..%2Fetc%2Fpasswd", 400, "NAME_INVALID"},
		{"encoded nul", "/v2/team/hostile/blobs/" + layer.String() + "%00", 400, "DIGEST_INVALID"},
		{"backslashes", `/v2/team\..\..\etc/blobs/` + layer.String(), 400, "NAME_INVALID"},
		{"upper case hex", "/v2/team/hostile/blobs/sha256:" + strings.ToUpper(hex), 400, "DIGEST_INVALID"},
		{"md5", "/v2/team/hostile/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400, "DIGEST_INVALID"},
		{"ns twice", "/v2/team/hostile/manifests/v1?ns=" + upstreamHost + "&ns=" + upstreamHost, 400, "NAME_INVALID"},
		// Go's server refuses these before any handler
		{"nul byte", "/v2/team\x00/blobs/" + layer.String(), 400, ""},
		{"no leading slash", "v2/team/hostile/blobs/" + layer.String(), 400, ""},
	}
	handled := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body, err := rawExchange(t, addr, "GET "+tt.target+" HTTP/1.1\r\nHost: "+addr+
				"\r\nConnection: close\r\n\r\n")
			if err != nil {
				t.Fatalf("GET %q: %v", tt.target, err)
			}
			if resp.StatusCode != tt.status {
				t.Fatalf("GET %q = %d %.200q, want %d", tt.target, resp.StatusCode, body, tt.status)
			}
			if tt.code != "" {
				handled++
				if got := ociCode(body); got != tt.code {
					t.Fatalf("GET %q: body %.200q, want one OCI error %s", tt.target, body, tt.code)
				}
			}
			if digest.FromBytes(body) == layer {
				t.Fatalf("GET %q served the layer", tt.target)
			}
		})
	}

	// headers past the server's limit: 431, or the connection closed
	for _, tt := range []struct{ name, request string }{
		{"2 MiB header line", "GET /v2/ HTTP/1.1\r\nHost: " + addr + "\r\nX-Big: " + strings.Repeat("a", 2<<20) +
			"\r\n\r\n"},
		{"2 MiB request line", "GET /v2/" + strings.Repeat("a", 2<<20) + "/blobs/" + layer.String() +
			" HTTP/1.1\r\nHost: " + addr + "\r\n\r\n"},
		{"64k headers", "GET /v2/ HTTP/1.1\r\nHost: " + addr + "\r\n" + strings.Repeat("X-Many: a\r\n", 64<<10) + "\r\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body, err := rawExchange(t, addr, tt.request)
			switch {
			case err != nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
				errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)):
				t.Logf("connection closed: %v", err)
			case err != nil:
				t.Fatalf("%v", err)
			case resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge:
				t.Fatalf("status %d %.200q, want 431", resp.StatusCode, body)
			}
		})
	}

	// the node goes on serving
	resp, body := n.Mirror.Get(t, "/v2/")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Distribution-API-Version") != "registry/2.0" {
		t.Fatalf("GET /v2/ after the hostile requests = %d %q", resp.StatusCode, body)
	}
	expectBlob(t, n.Mirror, blobPath, layer)
	// every request that reached the handler was logged as refused
	deadline := time.Now().Add(10 * time.Second) // hang detector: the log is written as it goes
	for len(n.Mirror.LogLines(`"msg":"request refused"`))-refusedBefore < handled {
		if time.Now().After(deadline) {
			t.Fatalf("%d refusals logged, want %d", len(n.Mirror.LogLines(`"msg":"request refused"`))-refusedBefore, handled)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
