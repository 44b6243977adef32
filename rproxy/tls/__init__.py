"""Certificates: files on disk, ACME issuance and renewal, the TLS-ALPN-01 challenge."""
