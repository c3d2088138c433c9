"""TLS: config types, the native and Envoy parsers, and the runtime.

Listeners terminate TLS (optionally requiring client certificates: mTLS), clusters originate it
(SNI, CA verification, client certificates, expected SPIFFE URI SANs). TLS 1.2 is the floor.

Certificates, keys and CAs are read from files and re-read when the files change: the
``SSLContext`` handed to asyncio is a thin shell whose ``wrap_bio`` delegates to a context built
from the files; at most once a second (on a new connection) the files' stat is compared and, if
anything changed, a new inner context is built. A half-rotated pair (new cert, old key) fails to
load and the previous context keeps serving until the pair is consistent. Connections already
open keep the certificate they were set up with.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable

from sidecar.config.tls import DownstreamTls, UpstreamTls

log = logging.getLogger("sidecar.tls")


RELOAD_CHECK_INTERVAL_S = 1.0
ALPN = ["http/1.1"]
_MIN_VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}


class TlsLoadError(OSError):
    """A certificate, key or CA file could not be loaded (an OSError so that a reload that
    hits it is refused like any other bind-time failure)."""


# ---- runtime ---------------------------------------------------------------------------------

def _stamp(files: tuple[str, ...]) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(f)      # follows symlinks: Kubernetes secret ..data swaps are seen
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class _Reloader:
    """Holds the SSLContext built from files; rebuilds it when the files' stat changes."""

    __slots__ = ("build", "files", "what", "ctx", "stamp", "next_check", "failed_stamp", "lock",
                 "reloads")

    def __init__(self, build: Callable[[], ssl.SSLContext], files: tuple[str, ...], what: str):
        self.build = build
        self.files = files
        self.what = what
        self.stamp = _stamp(files)
        self.ctx = build()          # errors at start are the caller's to report
        self.next_check = time.monotonic() + RELOAD_CHECK_INTERVAL_S
        self.failed_stamp = None
        self.lock = threading.Lock()
        self.reloads = 0

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now < self.next_check:
            return self.ctx
        with self.lock:
            self.next_check = now + RELOAD_CHECK_INTERVAL_S
            stamp = _stamp(self.files)
            if stamp == self.stamp or stamp == self.failed_stamp:
                return self.ctx
            try:
                ctx = self.build()
            except (OSError, ssl.SSLError, ValueError) as e:
                self.failed_stamp = stamp
                log.error("%s: certificate files changed but cannot be loaded (%s); "
                          "keeping the previous certificates", self.what, e)
                return self.ctx
            self.ctx = ctx
            self.stamp = stamp
            self.failed_stamp = None
            self.reloads += 1
            log.info("%s: certificates reloaded from %s", self.what, ", ".join(self.files))
            return ctx

    def force_check(self) -> ssl.SSLContext:
        self.next_check = 0.0
        return self.current()


class ReloadingContext(ssl.SSLContext):
    """An SSLContext accepted everywhere asyncio/uvloop want one, delegating each new
    connection to the current context built from the certificate files."""

    reloader: _Reloader

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return self.reloader.current().wrap_bio(incoming, outgoing, server_side=server_side,
                                                server_hostname=server_hostname, session=session)

    def wrap_socket(self, sock, *args, **kwargs):
        return self.reloader.current().wrap_socket(sock, *args, **kwargs)

    @property
    def current(self) -> ssl.SSLContext:
        return self.reloader.current()


def _shell(protocol, reloader: _Reloader) -> ReloadingContext:
    ctx = ReloadingContext(protocol)
    ctx.reloader = reloader
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise TlsLoadError(f"cannot read certificate {e.filename or cert}: {e.strerror}") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsLoadError(f"cannot load certificate {cert} with key {key}: {e}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError as e:
        raise TlsLoadError(f"cannot read CA file {ca}: {e.strerror}") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsLoadError(f"cannot load CA file {ca}: {e}") from None


def _build_server(cfg: DownstreamTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS.get(cfg.min_version, ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    _load_chain(ctx, cfg.cert_file, cfg.key_file)
    if cfg.ca_file:
        _load_ca(ctx, cfg.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    # the listener's alpn_protocols in its order of preference (the server's order wins)
    ctx.set_alpn_protocols(list(cfg.alpn) if cfg.alpn else ALPN)
    return ctx


def server_context(cfg: DownstreamTls) -> ReloadingContext:
    """The SSLContext for a TLS listener (raises TlsLoadError if the files cannot be loaded)."""
    files = tuple(f for f in (cfg.cert_file, cfg.key_file, cfg.ca_file) if f)
    return _shell(ssl.PROTOCOL_TLS_SERVER, _Reloader(lambda: _build_server(cfg), files,
                                                     f"listener TLS ({cfg.cert_file})"))


class _SanCheckingSSLObject(ssl.SSLObject):
    """After the handshake, refuse a server whose certificate has none of the expected URI
    SANs (Envoy's ``match_typed_subject_alt_names`` with ``san_type: URI``)."""

    allowed_uris: frozenset = frozenset()

    def do_handshake(self):
        super().do_handshake()
        cert = self.getpeercert()
        uris = {v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"}
        if not uris & self.allowed_uris:
            err = ssl.SSLCertVerificationError(
                1, f"peer certificate URI SANs {sorted(uris) or '(none)'} match none of "
                   f"{sorted(self.allowed_uris)}")
            err.reason = "SAN_MISMATCH"
            err.verify_code = 0
            err.verify_message = str(err.args[1])
            raise err


def _build_client(cfg: UpstreamTls, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _MIN_VERSIONS.get(cfg.min_version, ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cfg.verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = cfg.check_hostname
        if cfg.ca_file:
            _load_ca(ctx, cfg.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file:
        _load_chain(ctx, cfg.cert_file, cfg.key_file)
    if cfg.match_san_uris:
        ctx.sslobject_class = type("SanCheckingSSLObject", (_SanCheckingSSLObject,),
                                   {"allowed_uris": frozenset(cfg.match_san_uris)})
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(cfg: UpstreamTls, alpn: tuple[str, ...] = ("http/1.1",)) -> ReloadingContext:
    """The SSLContext for a cluster's upstream connections of one protocol (``alpn``: "h2" for
    HTTP/2 connections)."""
    files = tuple(f for f in (cfg.ca_file, cfg.cert_file, cfg.key_file) if f)
    return _shell(ssl.PROTOCOL_TLS_CLIENT, _Reloader(lambda: _build_client(cfg, alpn), files,
                                                     f"cluster TLS ({cfg.sni or cfg.ca_file or 'system CAs'})"))


def uri_sans(cert: dict | None) -> list[str]:
    return [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]


def peer_uri_san(sslobj) -> str | None:
    """The verified client certificate's identity: its first spiffe:// URI SAN (else its first
    URI SAN), or None without a verified client certificate."""
    try:
        cert = sslobj.getpeercert()
    except (ValueError, AttributeError):
        return None
    uris = uri_sans(cert)
    if not uris:
        return None
    for u in uris:
        if u.startswith("spiffe://"):
            return u
    return uris[0]


# ---- native config ---------------------------------------------------------------------------


# ---- Envoy v3 (transport_socket) -------------------------------------------------------------


