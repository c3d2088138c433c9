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
from dataclasses import dataclass
from typing import Callable, Optional

log = logging.getLogger("sidecar.tls")


@dataclass(frozen=True, slots=True)
class DownstreamTls:
    cert_file: str
    key_file: str
    ca_file: Optional[str] = None        # set: request and verify client certs (mTLS)
    require_client_cert: bool = False    # with ca_file: refuse clients without a valid cert
    min_version: str = "TLSv1_2"


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    sni: str = ""
    ca_file: Optional[str] = None        # None with verify: the system trust store
    cert_file: Optional[str] = None      # client cert for mTLS
    key_file: Optional[str] = None
    verify: bool = True
    min_version: str = "TLSv1_2"
    match_san_uris: tuple[str, ...] = ()
    check_hostname: bool = False         # verify the server's DNS name against SNI / host


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


def _load_chain(ctx: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
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
    ctx.set_alpn_protocols(ALPN)
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


def _build_client(cfg: UpstreamTls) -> ssl.SSLContext:
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
    ctx.set_alpn_protocols(ALPN)
    return ctx


def client_context(cfg: UpstreamTls) -> ReloadingContext:
    """The SSLContext for a cluster's upstream connections."""
    files = tuple(f for f in (cfg.ca_file, cfg.cert_file, cfg.key_file) if f)
    return _shell(ssl.PROTOCOL_TLS_CLIENT, _Reloader(lambda: _build_client(cfg), files,
                                                     f"cluster TLS ({cfg.sni or cfg.ca_file or 'system CAs'})"))


def uri_sans(cert: Optional[dict]) -> list[str]:
    return [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]


def peer_uri_san(sslobj) -> Optional[str]:
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

def _min_version(d: dict, path: str) -> str:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    v = d.get("min_version", "1.2")
    if isinstance(v, float):
        v = f"{v:.1f}"
    v = {"1.2": "TLSv1_2", "1.3": "TLSv1_3"}.get(str(v), str(v))
    if v in ("TLSv1_0", "TLSv1_1", "1.0", "1.1"):
        raise ConfigError(w.join(path, "min_version"), "must be 1.2 or 1.3 (TLS 1.2 is the floor)")
    if v not in _MIN_VERSIONS:
        raise ConfigError(w.join(path, "min_version"), f"must be 1.2 or 1.3, got {d.get('min_version')!r}")
    return v


def _file(d: dict, key: str, path: str, required: bool = False) -> Optional[str]:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    v = w.string(d, key, path, None if not required else w._MISSING, nonempty=True)
    if v is not None and not os.path.isfile(v):
        raise ConfigError(w.join(path, key), f"cannot read file {v!r}")
    return v


def downstream_tls_from_native(d: dict, path: str) -> DownstreamTls:
    """Listener ``tls: {cert, key, ca, require_client_cert, min_version}``.

    ``ca`` turns on client-certificate verification (mTLS); with it, ``require_client_cert``
    defaults to true (set false to accept clients without a certificate too)."""
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(d, ("cert", "key", "ca", "require_client_cert", "min_version"), path)
    cert = _file(d, "cert", path, required=True)
    key = _file(d, "key", path, required=True)
    ca = _file(d, "ca", path)
    require = w.boolean(d, "require_client_cert", path, ca is not None)
    if require and ca is None:
        raise ConfigError(w.join(path, "require_client_cert"), "needs ca (the CA that signs client certificates)")
    return DownstreamTls(cert_file=cert, key_file=key, ca_file=ca, require_client_cert=require,
                         min_version=_min_version(d, path))


def upstream_tls_from_native(d, path: str) -> UpstreamTls:
    """Cluster ``tls: true`` (system CAs, hostname checked) or
    ``tls: {sni, ca, cert, key, san: [uri...], verify, check_hostname, min_version}``.

    With ``ca`` (a private mesh CA) the hostname is not checked by default (mesh certificates
    name workloads by SPIFFE URI, not by DNS): pin identities with ``san`` instead."""
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    if d is True:
        return UpstreamTls(check_hostname=True)
    w.check_keys(d, ("sni", "ca", "cert", "key", "san", "verify", "check_hostname", "min_version"), path)
    ca = _file(d, "ca", path)
    cert = _file(d, "cert", path)
    key = _file(d, "key", path)
    if (cert is None) != (key is None):
        raise ConfigError(w.join(path, "key" if key is None else "cert"), "cert and key go together")
    sans = d.get("san", [])
    if isinstance(sans, str):
        sans = [sans]
    if not isinstance(sans, list) or not all(isinstance(s, str) and s for s in sans):
        raise ConfigError(w.join(path, "san"), "must be a URI or a list of URIs")
    verify = w.boolean(d, "verify", path, True)
    if not verify and (ca or sans):
        raise ConfigError(w.join(path, "verify"), "verify: false cannot be combined with ca or san")
    return UpstreamTls(sni=w.string(d, "sni", path, ""), ca_file=ca, cert_file=cert, key_file=key,
                       verify=verify, min_version=_min_version(d, path), match_san_uris=tuple(sans),
                       check_hostname=w.boolean(d, "check_hostname", path, verify and ca is None))


# ---- Envoy v3 (transport_socket) -------------------------------------------------------------

T_TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
T_TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_TLS_VERSIONS = ("TLS_AUTO", "TLSv1_2", "TLSv1_3")


def _common(ctx: dict, path: str) -> dict:
    """CommonTlsContext subset: one cert from files, validation CA, SAN matchers, min version."""
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(ctx, ("tls_certificates", "validation_context", "tls_params", "alpn_protocols"), path)
    out: dict = {}
    certs = w.seq(ctx, "tls_certificates", path, [])
    if len(certs) > 1:
        raise ConfigError(w.join(path, "tls_certificates"), "at most one certificate is supported")
    if certs:
        cp = w.join(w.join(path, "tls_certificates"), 0)
        c = w.check_keys(certs[0], ("certificate_chain", "private_key"), cp)
        out["cert_file"] = w.string(w.check_keys(w.mapping(c, "certificate_chain", cp), ("filename",),
                                                 w.join(cp, "certificate_chain")), "filename", w.join(cp, "certificate_chain"))
        out["key_file"] = w.string(w.check_keys(w.mapping(c, "private_key", cp), ("filename",),
                                                w.join(cp, "private_key")), "filename", w.join(cp, "private_key"))
    if "validation_context" in ctx:
        vp = w.join(path, "validation_context")
        v = w.check_keys(ctx["validation_context"], ("trusted_ca", "match_typed_subject_alt_names"), vp)
        if "trusted_ca" in v:
            out["ca_file"] = w.string(w.check_keys(v["trusted_ca"], ("filename",), w.join(vp, "trusted_ca")),
                                      "filename", w.join(vp, "trusted_ca"))
        uris = []
        for i, m in enumerate(w.seq(v, "match_typed_subject_alt_names", vp, [])):
            mp = w.join(w.join(vp, "match_typed_subject_alt_names"), i)
            w.check_keys(m, ("san_type", "matcher"), mp)
            if m.get("san_type") != "URI":
                raise ConfigError(w.join(mp, "san_type"), "only URI SANs are supported")
            mm = w.check_keys(w.mapping(m, "matcher", mp), ("exact",), w.join(mp, "matcher"))
            uris.append(w.string(mm, "exact", w.join(mp, "matcher")))
        out["match_san_uris"] = tuple(uris)
    if "tls_params" in ctx:
        tp = w.join(path, "tls_params")
        t = w.check_keys(ctx["tls_params"], ("tls_minimum_protocol_version", "tls_maximum_protocol_version"), tp)
        mv = w.string(t, "tls_minimum_protocol_version", tp, "TLSv1_2", choices=_TLS_VERSIONS + ("TLSv1_0", "TLSv1_1"))
        if mv in ("TLSv1_0", "TLSv1_1"):
            raise ConfigError(w.join(tp, "tls_minimum_protocol_version"), "must be TLSv1_2 or newer")
        out["min_version"] = "TLSv1_2" if mv == "TLS_AUTO" else mv
        xv = w.string(t, "tls_maximum_protocol_version", tp, "TLS_AUTO",
                      choices=_TLS_VERSIONS + ("TLSv1_0", "TLSv1_1"))
        if xv not in ("TLS_AUTO", "TLSv1_3"):
            raise ConfigError(w.join(tp, "tls_maximum_protocol_version"),
                              "only TLS_AUTO or TLSv1_3 is supported (no maximum below TLS 1.3)")
    alpn = w.seq(ctx, "alpn_protocols", path, [])
    if any(p != "http/1.1" for p in alpn):
        raise ConfigError(w.join(path, "alpn_protocols"),
                          "only http/1.1 is supported (the sidecar speaks HTTP/1.1)")
    return out


def _socket(d: dict, path: str, type_url: str) -> tuple[dict, str]:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(d, ("name", "typed_config"), path)
    tp = w.join(path, "typed_config")
    tc = w.mapping(d, "typed_config", path)
    if tc.get("@type") != type_url:
        raise ConfigError(w.join(tp, "@type"), f"must be {type_url}")
    return {k: v for k, v in tc.items() if k != "@type"}, tp


def downstream_tls_from_envoy(d: dict, path: str) -> DownstreamTls:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    body, tp = _socket(d, path, T_TLS_DOWN)
    w.check_keys(body, ("common_tls_context", "require_client_certificate"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp), w.join(tp, "common_tls_context"))
    if "cert_file" not in c:
        raise ConfigError(w.join(tp, "common_tls_context.tls_certificates"), "a certificate is required")
    if c.get("match_san_uris"):
        raise ConfigError(w.join(tp, "common_tls_context.validation_context.match_typed_subject_alt_names"),
                          "is not supported on listeners: match the client identity with an RBAC "
                          "principal (authenticated.principal_name) instead")
    require = w.boolean(body, "require_client_certificate", tp, False)
    if require and not c.get("ca_file"):
        raise ConfigError(w.join(tp, "require_client_certificate"),
                          "needs common_tls_context.validation_context.trusted_ca")
    return DownstreamTls(cert_file=c["cert_file"], key_file=c["key_file"], ca_file=c.get("ca_file"),
                         require_client_cert=require, min_version=c.get("min_version", "TLSv1_2"))


def upstream_tls_from_envoy(d: dict, path: str) -> UpstreamTls:
    from sidecar.config import wire as w
    body, tp = _socket(d, path, T_TLS_UP)
    w.check_keys(body, ("common_tls_context", "sni"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp, {}), w.join(tp, "common_tls_context"))
    if c.get("match_san_uris") and not c.get("ca_file"):
        from sidecar.config.errors import ConfigError
        raise ConfigError(w.join(tp, "common_tls_context.validation_context"),
                          "SAN-based verification of peer certificates without trusted_ca is "
                          "insecure and not allowed (as in Envoy)")
    return UpstreamTls(sni=w.string(body, "sni", tp, ""), ca_file=c.get("ca_file"),
                       cert_file=c.get("cert_file"), key_file=c.get("key_file"),
                       verify=c.get("ca_file") is not None, min_version=c.get("min_version", "TLSv1_2"),
                       match_san_uris=c.get("match_san_uris", ()))
