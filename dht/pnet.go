package dht

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/libp2p/go-libp2p/core/pnet"
	ma "github.com/multiformats/go-multiaddr"
)

// networkKeyHeader opens a network key file in the format of libp2p's
// private networks (go-libp2p's pnet, IPFS's swarm.key): the version line
// and the encoding line. The key follows as 64 hex digits.
const networkKeyHeader = "/key/swarm/psk/1.0.0/\n/base16/\n"

// networkKeyFormat describes the file format in error messages.
const networkKeyFormat = `want the lines "/key/swarm/psk/1.0.0/", "/base16/" and 64 hex digits`

// GenerateNetworkKey returns a new random network key (32 bytes from
// crypto/rand) in the file format that ReadNetworkKeyFile reads, ending
// in a newline.
func GenerateNetworkKey() ([]byte, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("generating a network key: %w", err)
	}
	return []byte(networkKeyHeader + hex.EncodeToString(key) + "\n"), nil
}

// ReadNetworkKeyFile reads a libp2p pre-shared key file (see
// Config.NetworkKeyFile). It is decoded by go-libp2p's pnet.DecodeV1PSK,
// so the "/base64/" and "/bin/" encodings of that format are accepted
// too; unlike DecodeV1PSK, anything after the key other than white space
// is refused, so a damaged file cannot pass for a key.
func ReadNetworkKeyFile(path string) (pnet.PSK, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading network key file: %w", err)
	}
	psk, err := pnet.DecodeV1PSK(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("network key file %s: %v; %s", path, err, networkKeyFormat)
	}
	if err := checkKeyBody(data); err != nil {
		return nil, fmt.Errorf("network key file %s: %v; %s", path, err, networkKeyFormat)
	}
	return psk, nil
}

// checkKeyBody checks that the key in a file DecodeV1PSK accepted is all
// that follows the two header lines.
func checkKeyBody(data []byte) error {
	var lines [2][]byte
	rest := data
	for i := range lines {
		var ok bool
		lines[i], rest, ok = bytes.Cut(rest, []byte("\n"))
		if !ok {
			return errors.New("truncated header")
		}
	}
	encoding := string(bytes.TrimRight(lines[1], "\r"))
	var want int
	switch encoding {
	case "/base16/":
		rest, want = bytes.TrimSpace(rest), 64
	case "/base64/":
		rest, want = bytes.TrimSpace(rest), 44
	case "/bin/":
		want = 32
	default:
		return fmt.Errorf("unknown encoding %q", encoding)
	}
	if len(rest) != want {
		return fmt.Errorf("the key is %d characters after the %s line, want %d", len(rest), encoding, want)
	}
	return nil
}

// NetworkKeyFingerprint identifies a network key without revealing it: the
// first 8 bytes of its SHA-256, in hex. Nodes that log the same fingerprint
// hold the same key.
func NetworkKeyFingerprint(psk pnet.PSK) string {
	sum := sha256.Sum256(psk)
	return hex.EncodeToString(sum[:8])
}

// CheckTCPOnly returns an error naming the first of addrs that is a
// multiaddr over another transport than TCP, such as QUIC: with a network
// key libp2p runs over TCP only. Entries that are not multiaddrs (a plain
// announce IP, or an address that does not parse, which Config checks on
// its own) pass.
func CheckTCPOnly(addrs []string) error {
	for _, s := range addrs {
		addr, err := ma.NewMultiaddr(s)
		if err != nil {
			continue
		}
		if !isTCP(addr) {
			return fmt.Errorf("address %s is not TCP", s)
		}
	}
	return nil
}

// isTCP reports whether addr runs over TCP and nothing on top of it that
// the router lacks a transport for (QUIC, WebSocket, ...): an IP or DNS
// component, /tcp, and at most /p2p after.
func isTCP(addr ma.Multiaddr) bool {
	sawTCP := false
	for _, c := range addr {
		switch c.Protocol().Code {
		case ma.P_IP4, ma.P_IP6, ma.P_IP6ZONE, ma.P_DNS, ma.P_DNS4, ma.P_DNS6:
			if sawTCP {
				return false
			}
		case ma.P_TCP:
			if sawTCP {
				return false
			}
			sawTCP = true
		case ma.P_P2P:
		default:
			return false
		}
	}
	return sawTCP
}
