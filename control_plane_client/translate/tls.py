"""Envoy v3 ``transport_socket`` TLS contexts (DownstreamTlsContext, UpstreamTlsContext) -> the TLS
model. One certificate from files, a validation CA, URI SAN matchers, TLS 1.2 minimum."""

from __future__ import annotations

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.tls import DownstreamTls, UpstreamTls

T_TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


T_TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


_TLS_VERSIONS = ("TLS_AUTO", "TLSv1_2", "TLSv1_3")


def _common(ctx: dict, path: str) -> dict:
    """CommonTlsContext subset: one cert from files, validation CA, SAN matchers, min version."""
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
    for i, p in enumerate(alpn):
        if p not in ("h2", "http/1.1"):
            raise ConfigError(w.join(w.join(path, "alpn_protocols"), i),
                              f"unsupported ALPN protocol {p!r} (supported: h2, http/1.1)")
    if len(set(alpn)) != len(alpn):
        raise ConfigError(w.join(path, "alpn_protocols"), "lists a protocol twice")
    out["alpn"] = tuple(alpn)
    return out


def _socket(d: dict, path: str, type_url: str) -> tuple[dict, str]:
    w.check_keys(d, ("name", "typed_config"), path)
    tp = w.join(path, "typed_config")
    tc = w.mapping(d, "typed_config", path)
    if tc.get("@type") != type_url:
        raise ConfigError(w.join(tp, "@type"), f"must be {type_url}")
    return {k: v for k, v in tc.items() if k != "@type"}, tp


def downstream_tls_from_envoy(d: dict, path: str) -> DownstreamTls:
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
                         require_client_cert=require, min_version=c.get("min_version", "TLSv1_2"),
                         alpn=c["alpn"])


def upstream_tls_from_envoy(d: dict, path: str) -> UpstreamTls:
    body, tp = _socket(d, path, T_TLS_UP)
    w.check_keys(body, ("common_tls_context", "sni"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp, {}), w.join(tp, "common_tls_context"))
    if c.get("match_san_uris") and not c.get("ca_file"):
        raise ConfigError(w.join(tp, "common_tls_context.validation_context"),
                          "SAN-based verification of peer certificates without trusted_ca is "
                          "insecure and not allowed (as in Envoy)")
    return UpstreamTls(sni=w.string(body, "sni", tp, ""), ca_file=c.get("ca_file"),
                       cert_file=c.get("cert_file"), key_file=c.get("key_file"),
                       verify=c.get("ca_file") is not None, min_version=c.get("min_version", "TLSv1_2"),
                       match_san_uris=c.get("match_san_uris", ()), alpn=c["alpn"])
