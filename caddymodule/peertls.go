package caddymodule

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
)

// PeerTLS makes node-to-node requests use HTTPS with a client
// certificate. Each node's peer listener is a Caddy site with its own
// tls and client_auth (require_and_verify, trusting the same CA), and the
// dht's mirror_port names that listener: a node then serves only other
// nodes there, and trusts only peers whose certificate the CA signed.
// Node addresses change, so a peer's certificate is checked against the
// CA, not against its address.
type PeerTLS struct {
	// CAFile is the PEM file of the CA that signs node certificates.
	CAFile string `json:"ca_file"`
	// CertFile and KeyFile are this node's certificate (with the
	// clientAuth extended key usage) and key, in PEM.
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
}

// clientConfig loads the files into a TLS configuration for requests to
// other nodes.
func (p *PeerTLS) clientConfig() (*tls.Config, error) {
	if p.CAFile == "" || p.CertFile == "" || p.KeyFile == "" {
		return nil, errors.New("peer_tls needs ca, cert and key")
	}
	caPEM, err := os.ReadFile(p.CAFile)
	if err != nil {
		return nil, fmt.Errorf("peer_tls: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("peer_tls: no certificate in %s", p.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(p.CertFile, p.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("peer_tls: %w", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		// the chain is checked in VerifyConnection, without the host
		// name: peers are reached by address
		InsecureSkipVerify: true, //nolint:gosec // verified below against the CA
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("peer sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			if err != nil {
				return fmt.Errorf("peer certificate: %w", err)
			}
			return nil
		},
	}, nil
}

// peerURL returns a peer's mirror URL with the scheme this node uses for
// peers.
func (a *App) peerURL(u string) string {
	if a.PeerTLS != nil {
		if rest, ok := strings.CutPrefix(u, "http://"); ok {
			return "https://" + rest
		}
	}
	return u
}
