"""Envoy v3 ``transport_socket`` TLS contexts (DownstreamTlsContext, UpstreamTlsContext) and static
secrets (``static_resources.secrets``) -> the TLS model. One certificate from files or a secret,
a validation CA, URI SAN matchers, TLS 1.2 minimum."""

from __future__ import annotations

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.tls import DownstreamTls, UpstreamTls

T_TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


T_TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


_TLS_VERSIONS = ("TLS_AUTO", "TLSv1_2", "TLSv1_3")


Secrets = dict[str, dict]
"""Static secrets (``static_resources.secrets``) by name, each parsed to the keys ``_common``
produces (``cert_file``/``key_file`` or ``ca_file``/``match_san_uris``)."""


def _tls_certificate(c: dict, cp: str) -> dict:
    w.check_keys(c, ("certificate_chain", "private_key"), cp)
    return {"cert_file": w.string(w.check_keys(w.mapping(c, "certificate_chain", cp), ("filename",),
                                               w.join(cp, "certificate_chain")), "filename",
                                  w.join(cp, "certificate_chain")),
            "key_file": w.string(w.check_keys(w.mapping(c, "private_key", cp), ("filename",),
                                              w.join(cp, "private_key")), "filename",
                                 w.join(cp, "private_key"))}


def _validation_context(v: dict, vp: str) -> dict:
    w.check_keys(v, ("trusted_ca", "match_typed_subject_alt_names"), vp)
    out: dict = {}
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
    return out


def secrets_from_envoy(items: list, path: str) -> Secrets:
    """``static_resources.secrets``: named certificates and validation contexts that TLS
    contexts reference with an ``sds_config``-less ``*_sds_secret_config{s}`` (SDS from the
    bootstrap)."""
    out: Secrets = {}
    for i, d in enumerate(items):
        sp = w.join(path, i)
        w.check_keys(d, ("name", "tls_certificate", "validation_context"), sp)
        name = w.string(d, "name", sp, nonempty=True)
        if name in out:
            raise ConfigError(w.join(sp, "name"), f"duplicate secret name {name!r}")
        kind = w.one_of(d, ("tls_certificate", "validation_context"), sp)
        kp = w.join(sp, kind)
        if kind == "tls_certificate":
            out[name] = _tls_certificate(w.mapping(d, kind, sp), kp)
        else:
            out[name] = _validation_context(w.mapping(d, kind, sp), kp)
    return out


def _sds(ref: dict, path: str, secrets: Secrets | None, want: str) -> dict:
    """A ``SdsSecretConfig`` naming a static secret (no ``sds_config``: the bootstrap's)."""
    w.check_keys(ref, ("name",), path)      # sds_config (an SDS server): refused by name
    name = w.string(ref, "name", path, nonempty=True)
    secret = (secrets or {}).get(name)
    if secret is None:
        raise ConfigError(w.join(path, "name"), f"no static secret named {name!r} "
                          "(static_resources.secrets)")
    if (want == "cert") != ("cert_file" in secret):
        raise ConfigError(w.join(path, "name"), f"secret {name!r} is not a "
                          + ("tls_certificate" if want == "cert" else "validation_context"))
    return secret


def _common(ctx: dict, path: str, secrets: Secrets | None = None) -> dict:
    """CommonTlsContext subset: one cert from files (or a static secret), validation CA and
    SAN matchers (or a static secret), min version."""
    w.check_keys(ctx, ("tls_certificates", "validation_context", "tls_params", "alpn_protocols",
                       "tls_certificate_sds_secret_configs", "validation_context_sds_secret_config"),
                 path)
    out: dict = {}
    certs = w.seq(ctx, "tls_certificates", path, [])
    sds_certs = w.seq(ctx, "tls_certificate_sds_secret_configs", path, [])
    if len(certs) + len(sds_certs) > 1:
        raise ConfigError(w.join(path, "tls_certificates"), "at most one certificate is supported")
    if certs:
        out.update(_tls_certificate(certs[0], w.join(w.join(path, "tls_certificates"), 0)))
    if sds_certs:
        sp = w.join(w.join(path, "tls_certificate_sds_secret_configs"), 0)
        out.update(_sds(sds_certs[0], sp, secrets, "cert"))
    if "validation_context" in ctx and "validation_context_sds_secret_config" in ctx:
        raise ConfigError(path, "only one of validation_context, "
                          "validation_context_sds_secret_config may be set")
    if "validation_context" in ctx:
        out.update(_validation_context(ctx["validation_context"], w.join(path, "validation_context")))
    elif "validation_context_sds_secret_config" in ctx:
        vp = w.join(path, "validation_context_sds_secret_config")
        out.update(_sds(w.mapping(ctx, "validation_context_sds_secret_config", path), vp, secrets,
                        "validation"))
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
    w.check_keys(d, ("name", "typed_config"), path)
    tp = w.join(path, "typed_config")
    tc = w.mapping(d, "typed_config", path)
    if tc.get("@type") != type_url:
        raise ConfigError(w.join(tp, "@type"), f"must be {type_url}")
    return {k: v for k, v in tc.items() if k != "@type"}, tp


def downstream_tls_from_envoy(d: dict, path: str, secrets: Secrets | None = None) -> DownstreamTls:
    body, tp = _socket(d, path, T_TLS_DOWN)
    w.check_keys(body, ("common_tls_context", "require_client_certificate"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp), w.join(tp, "common_tls_context"), secrets)
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


def upstream_tls_from_envoy(d: dict, path: str, secrets: Secrets | None = None) -> UpstreamTls:
    body, tp = _socket(d, path, T_TLS_UP)
    w.check_keys(body, ("common_tls_context", "sni"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp, {}), w.join(tp, "common_tls_context"),
                secrets)
    if c.get("match_san_uris") and not c.get("ca_file"):
        raise ConfigError(w.join(tp, "common_tls_context.validation_context"),
                          "SAN-based verification of peer certificates without trusted_ca is "
                          "insecure and not allowed (as in Envoy)")
    return UpstreamTls(sni=w.string(body, "sni", tp, ""), ca_file=c.get("ca_file"),
                       cert_file=c.get("cert_file"), key_file=c.get("key_file"),
                       verify=c.get("ca_file") is not None, min_version=c.get("min_version", "TLSv1_2"),
                       match_san_uris=c.get("match_san_uris", ()))
