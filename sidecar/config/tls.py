"""TLS settings of listeners (termination, mTLS) and clusters (origination); the contexts are
built from them by ``sidecar.tls.context``."""

from __future__ import annotations

from dataclasses import dataclass

TLS_VERSIONS = ("TLSv1_2", "TLSv1_3")     # the floor is TLS 1.2


@dataclass(frozen=True, slots=True)
class DownstreamTls:
    cert_file: str
    key_file: str
    ca_file: str | None = None        # set: request and verify client certs (mTLS)
    require_client_cert: bool = False    # with ca_file: refuse clients without a valid cert
    min_version: str = "TLSv1_2"
    # ALPN protocols offered, in preference order ("h2", "http/1.1"); empty: http/1.1 only
    alpn: tuple[str, ...] = ()


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
