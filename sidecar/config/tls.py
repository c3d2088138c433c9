"""TLS settings of listeners (termination, mTLS) and clusters (origination); the contexts are
built from them by ``sidecar.tls.context``. Certificates and CAs come from files or, by name,
from secrets (SDS from the control plane; ``sidecar.tls.secrets``)."""

from __future__ import annotations

from dataclasses import dataclass

TLS_VERSIONS = ("TLSv1_2", "TLSv1_3")     # the floor is TLS 1.2


@dataclass(frozen=True, slots=True)
class DownstreamTls:
    cert_file: str                    # "" when the certificate is the secret cert_secret
    key_file: str
    ca_file: str | None = None        # set: request and verify client certs (mTLS)
    require_client_cert: bool = False    # with a CA: refuse clients without a valid cert
    min_version: str = "TLSv1_2"
    # ALPN protocols offered, in preference order ("h2", "http/1.1"); empty: http/1.1 only
    alpn: tuple[str, ...] = ()
    cert_secret: str = ""             # SDS: the tls_certificate secret's name
    ca_secret: str = ""               # SDS: the validation_context secret's name (mTLS)

    @property
    def verifies_clients(self) -> bool:
        return self.ca_file is not None or bool(self.ca_secret)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(n for n in (self.cert_secret, self.ca_secret) if n)


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    sni: str = ""
    ca_file: str | None = None        # None with verify: the system trust store
    cert_file: str | None = None      # client cert for mTLS
    key_file: str | None = None
    verify: bool = True
    min_version: str = "TLSv1_2"
    match_san_uris: tuple[str, ...] = ()
    check_hostname: bool = False         # verify the server's DNS name against SNI / host
    # ALPN offered; empty: the cluster's protocol decides (h2 for HTTP/2, http/1.1 otherwise)
    alpn: tuple[str, ...] = ()
    cert_secret: str = ""             # SDS: the client certificate's secret
    ca_secret: str = ""               # SDS: the validation_context secret (trusted CA)

    @property
    def presents_cert(self) -> bool:
        return self.cert_file is not None or bool(self.cert_secret)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(n for n in (self.cert_secret, self.ca_secret) if n)


@dataclass(frozen=True, slots=True)
class TlsCertificateSecret:
    """An SDS ``Secret`` holding a certificate chain and its key (PEM)."""
    name: str
    certificate_chain: bytes
    private_key: bytes


@dataclass(frozen=True, slots=True)
class ValidationSecret:
    """An SDS ``Secret`` holding a validation context: trusted CA certificates (PEM)."""
    name: str
    trusted_ca: bytes


Secret = TlsCertificateSecret | ValidationSecret
