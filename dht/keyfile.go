package dht

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
)

// The key file holds the node's Ed25519 key as PKCS #8 in a PEM block of
// type "PRIVATE KEY", the format of `openssl genpkey -algorithm ed25519`,
// so an operator can make one, or inspect it, with common tools.
const keyPEMType = "PRIVATE KEY"

// generateKey returns a new random Ed25519 key.
func generateKey() (crypto.PrivKey, error) {
	priv, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating ed25519 key: %w", err)
	}
	return priv, nil
}

// readKeyFile reads the key at path. A missing file yields an error that
// matches fs.ErrNotExist.
func readKeyFile(path string) (crypto.PrivKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading key file: %w", err)
	}
	key, err := decodeKeyPEM(data)
	if err != nil {
		return nil, fmt.Errorf("reading key file %s: %w", path, err)
	}
	return key, nil
}

// writeKeyFileOnce writes key to path unless a file is already there, in
// which case it returns the key in that file: of two processes that start
// with the same missing file, both end with the same key. The file is
// written in full under a temporary name, then linked into place, so no
// reader ever sees half a key.
func writeKeyFileOnce(path string, key crypto.PrivKey) (crypto.PrivKey, error) {
	data, err := encodeKeyPEM(key)
	if err != nil {
		return nil, err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating key file folder: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".peermirror-key-*")
	if err != nil {
		return nil, fmt.Errorf("creating key file: %w", err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp makes the file 0600 already; say so for the reader.
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("creating key file: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("writing key file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("writing key file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("writing key file: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return readKeyFile(path)
		}
		return nil, fmt.Errorf("writing key file: %w", err)
	}
	return key, nil
}

func encodeKeyPEM(key crypto.PrivKey) ([]byte, error) {
	std, err := crypto.PrivKeyToStdKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding key: %w", err)
	}
	// PrivKeyToStdKey gives a pointer for Ed25519; PKCS #8 wants the value.
	if p, ok := std.(*ed25519.PrivateKey); ok {
		std = *p
	}
	der, err := x509.MarshalPKCS8PrivateKey(std)
	if err != nil {
		return nil, fmt.Errorf("encoding key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: keyPEMType, Bytes: der}), nil
}

func decodeKeyPEM(data []byte) (crypto.PrivKey, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != keyPEMType {
		return nil, errors.New(`no PEM block of type "PRIVATE KEY"`)
	}
	std, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing PKCS #8 key: %w", err)
	}
	edKey, ok := std.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key is %T, want Ed25519", std)
	}
	priv, _, err := crypto.KeyPairFromStdKey(&edKey)
	if err != nil {
		return nil, fmt.Errorf("converting key: %w", err)
	}
	return priv, nil
}
