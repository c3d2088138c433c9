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
from sidecar.tls.secrets import MissingSecret, SecretStore, load_ca, load_chain

log = logging.getLogger("sidecar.tls")


RELOAD_CHECK_INTERVAL_S = 1.0
ALPN = ["http/1.1"]
_MIN_VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}


class TlsLoadError(OSError):
    """A certificate, key or CA file could not be loaded (an OSError so that a reload that
    hits it is refused like any other bind-time failure)."""


# ---- runtime ---------------------------------------------------------------------------------

def _stamp(files: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    out: list[tuple[int, int, int] | None] = []
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
        self.failed_stamp: tuple[tuple[int, int, int] | None, ...] | None = None
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


class _SecretReloader:
    """Holds the SSLContext built from SDS secrets; rebuilds it when one of them is rotated
    (a generation number per name, compared on each new connection: no lock, no stat)."""

    __slots__ = ("build", "store", "names", "what", "ctx", "seen", "protocol", "reloads")

    def __init__(self, build: Callable[[], ssl.SSLContext], store: SecretStore,
                 names: tuple[str, ...], protocol: int, what: str):
        self.build = build
        self.store = store
        self.names = names
        self.what = what
        self.protocol = protocol
        self.reloads = 0
        self.seen: tuple[int, ...] = (-1,)
        self.ctx = self._placeholder()
        self.current()

    def _placeholder(self) -> ssl.SSLContext:
        # no certificate / no trusted CA: every handshake fails until the secrets arrive
        ctx = ssl.SSLContext(self.protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def current(self) -> ssl.SSLContext:
        store = self.store
        seen = tuple(store.generation(n) for n in self.names)
        if seen == self.seen:
            return self.ctx
        try:
            ctx = self.build()
        except MissingSecret:
            return self.ctx            # the placeholder until every secret is there
        except (OSError, ssl.SSLError, ValueError) as e:
            # checked when accepted, so this is a file part (a CA file beside an SDS cert)
            log.error("%s: cannot build the context (%s); keeping the previous one", self.what, e)
            self.seen = seen
            return self.ctx
        if self.seen != (-1,):
            self.reloads += 1
            log.info("%s: rotated (generations %s)", self.what, seen)
        self.ctx = ctx
        self.seen = seen
        return ctx

    def force_check(self) -> ssl.SSLContext:
        return self.current()


class ReloadingContext(ssl.SSLContext):
    """An SSLContext accepted everywhere asyncio/uvloop want one, delegating each new
    connection to the current context built from the certificate files."""

    reloader: _Reloader | _SecretReloader

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return self.reloader.current().wrap_bio(incoming, outgoing, server_side=server_side,
                                                server_hostname=server_hostname, session=session)

    def wrap_socket(self, sock, *args, **kwargs):
        return self.reloader.current().wrap_socket(sock, *args, **kwargs)

    @property
    def current(self) -> ssl.SSLContext:
        return self.reloader.current()


def _shell(protocol, reloader: _Reloader | _SecretReloader) -> ReloadingContext:
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


def _build_server(cfg: DownstreamTls, secrets: SecretStore | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS.get(cfg.min_version, ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if cfg.cert_secret and secrets is not None:
        load_chain(ctx, secrets.tls_certificate(cfg.cert_secret))
    else:
        _load_chain(ctx, cfg.cert_file, cfg.key_file)
    if cfg.ca_secret and secrets is not None:
        load_ca(ctx, secrets.validation_context(cfg.ca_secret))
    elif cfg.ca_file:
        _load_ca(ctx, cfg.ca_file)
    if cfg.verifies_clients:
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    # the listener's alpn_protocols in its order of preference (the server's order wins)
    ctx.set_alpn_protocols(list(cfg.alpn) if cfg.alpn else ALPN)
    return ctx


def server_context(cfg: DownstreamTls, secrets: SecretStore | None = None) -> ReloadingContext:
    """The SSLContext for a TLS listener (raises TlsLoadError if the files cannot be loaded).
    With SDS secrets: rebuilt when one of them is rotated; until they arrive, handshakes fail."""
    if cfg.secrets and secrets is not None:
        return _shell(ssl.PROTOCOL_TLS_SERVER, _SecretReloader(
            lambda: _build_server(cfg, secrets), secrets, cfg.secrets, ssl.PROTOCOL_TLS_SERVER,
            f"listener TLS (secrets {', '.join(cfg.secrets)})"))
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


def _build_client(cfg: UpstreamTls, secrets: SecretStore | None = None,
                  alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _MIN_VERSIONS.get(cfg.min_version, ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cfg.verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = cfg.check_hostname
        if cfg.ca_secret and secrets is not None:
            load_ca(ctx, secrets.validation_context(cfg.ca_secret))
        elif cfg.ca_file:
            _load_ca(ctx, cfg.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_secret and secrets is not None:
        load_chain(ctx, secrets.tls_certificate(cfg.cert_secret))
    elif cfg.cert_file:
        _load_chain(ctx, cfg.cert_file, cfg.key_file)
    if cfg.match_san_uris:
        ctx.sslobject_class = type("SanCheckingSSLObject", (_SanCheckingSSLObject,),
                                   {"allowed_uris": frozenset(cfg.match_san_uris)})
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(cfg: UpstreamTls, secrets: SecretStore | None = None,
                   alpn: tuple[str, ...] = ("http/1.1",)) -> ReloadingContext:
    """The SSLContext for a cluster's upstream connections of one protocol (``alpn``: "h2" for
    HTTP/2 connections; SDS secrets: as server_context)."""
    if cfg.secrets and secrets is not None:
        return _shell(ssl.PROTOCOL_TLS_CLIENT, _SecretReloader(
            lambda: _build_client(cfg, secrets, alpn), secrets, cfg.secrets,
            ssl.PROTOCOL_TLS_CLIENT, f"cluster TLS (secrets {', '.join(cfg.secrets)})"))
    files = tuple(f for f in (cfg.ca_file, cfg.cert_file, cfg.key_file) if f)
    return _shell(ssl.PROTOCOL_TLS_CLIENT, _Reloader(lambda: _build_client(cfg, None, alpn), files,
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


