"""Envoy v3 ``transport_socket`` TLS contexts (DownstreamTlsContext, UpstreamTlsContext) -> the TLS
model. One certificate from files or from an SDS secret, a validation CA from a file or an SDS
secret (``validation_context_sds_secret_config``, or Istio's ``combined_validation_context``),
URI SAN matchers, TLS 1.2 minimum.

SDS references use ``sds_config: {ads: {}}`` (the secrets come over the ADS stream), or no
``sds_config`` at all: then they name a static secret of the bootstrap
(``static_resources.secrets``), resolved here; other config sources are refused by name."""

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
            v: dict = {}
            _validation(w.mapping(d, kind, sp), kp, v)
            out[name] = v
    return out


def _static_secret(ref: object, path: str, secrets: Secrets | None, want: str) -> dict:
    """An ``sds_config``-less SdsSecretConfig: a static secret of the bootstrap, by name."""
    c = w.check_keys(ref, ("name", "sds_config"), path)
    name = w.string(c, "name", path, nonempty=True)
    secret = (secrets or {}).get(name)
    if secret is None:
        raise ConfigError(w.join(path, "name"), f"no static secret named {name!r} "
                          "(static_resources.secrets; or give sds_config: {ads: {}})")
    if (want == "cert") != ("cert_file" in secret):
        raise ConfigError(w.join(path, "name"), f"secret {name!r} is not a "
                          + ("tls_certificate" if want == "cert" else "validation_context"))
    return secret


def _is_static(ref: object) -> bool:
    return isinstance(ref, dict) and "sds_config" not in ref


def sds_secret_config(d: object, path: str) -> str:
    """An SdsSecretConfig -> the secret's name (the secret comes over ADS)."""
    c = w.check_keys(d, ("name", "sds_config"), path)
    name = w.string(c, "name", path, nonempty=True)
    sp = w.join(path, "sds_config")
    if "sds_config" not in c:
        raise ConfigError(sp, "is required (static secrets by name are not supported here)")
    src = w.check_keys(w.mapping(c, "sds_config", path), ("ads", "resource_api_version",
                                                          "api_config_source",
                                                          "initial_fetch_timeout"), sp)
    if "ads" not in src:
        raise ConfigError(sp, "only {ads: {}} is supported (secrets come over the ADS stream of "
                          "dynamic_resources.ads_config)")
    for key in ("api_config_source", "initial_fetch_timeout"):
        if key in src:
            raise ConfigError(w.join(sp, key), "is not supported with SDS over ADS (until its "
                              "secret arrives a context fails its handshakes and /ready says so)")
    w.check_keys(w.mapping(src, "ads", sp, {}), (), w.join(sp, "ads"))
    if w.string(src, "resource_api_version", sp, "V3", choices=("AUTO", "V2", "V3")) == "V2":
        raise ConfigError(w.join(sp, "resource_api_version"), "only V3 is supported")
    return name


def _validation(v: dict, vp: str, out: dict) -> None:
    w.check_keys(v, ("trusted_ca", "match_typed_subject_alt_names"), vp)
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


def _common(ctx: dict, path: str, secrets: Secrets | None = None) -> dict:
    """CommonTlsContext subset: one cert from files or SDS, validation CA from a file or SDS,
    SAN matchers, min version."""
    w.check_keys(ctx, ("tls_certificates", "validation_context", "tls_params", "alpn_protocols",
                       "tls_certificate_sds_secret_configs", "validation_context_sds_secret_config",
                       "combined_validation_context"), path)
    out: dict = {}
    sds = w.seq(ctx, "tls_certificate_sds_secret_configs", path, [])
    sp = w.join(path, "tls_certificate_sds_secret_configs")
    if len(sds) > 1:
        raise ConfigError(sp, "at most one certificate is supported")
    if sds:
        if ctx.get("tls_certificates"):
            raise ConfigError(sp, "only one of tls_certificates, tls_certificate_sds_secret_configs "
                              "may be set")
        if _is_static(sds[0]):
            out.update(_static_secret(sds[0], w.join(sp, 0), secrets, "cert"))
        else:
            out["cert_secret"] = sds_secret_config(sds[0], w.join(sp, 0))
    kinds = [k for k in ("validation_context", "validation_context_sds_secret_config",
                         "combined_validation_context") if k in ctx]
    if len(kinds) > 1:
        raise ConfigError(path, f"only one of {', '.join(kinds)} may be set")
    if "validation_context_sds_secret_config" in ctx:
        ref = ctx["validation_context_sds_secret_config"]
        rp = w.join(path, "validation_context_sds_secret_config")
        if _is_static(ref):
            out.update(_static_secret(ref, rp, secrets, "validation"))
        else:
            out["ca_secret"] = sds_secret_config(ref, rp)
    if "combined_validation_context" in ctx:
        # Istio's shape: SAN matchers here, the trusted CA from SDS
        cp = w.join(path, "combined_validation_context")
        comb = w.check_keys(ctx["combined_validation_context"], (
            "default_validation_context", "validation_context_sds_secret_config"), cp)
        if "default_validation_context" in comb:
            dp = w.join(cp, "default_validation_context")
            _validation(w.mapping(comb, "default_validation_context", cp), dp, out)
            if "ca_file" in out:
                raise ConfigError(w.join(dp, "trusted_ca"), "the trusted CA comes from "
                                  "validation_context_sds_secret_config here")
        ref = w.mapping(comb, "validation_context_sds_secret_config", cp)
        rp = w.join(cp, "validation_context_sds_secret_config")
        if _is_static(ref):
            out.update({k: v for k, v in _static_secret(ref, rp, secrets, "validation").items()
                        if k == "ca_file" or v})
        else:
            out["ca_secret"] = sds_secret_config(ref, rp)
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
        _validation(w.mapping(ctx, "validation_context", path), w.join(path, "validation_context"), out)
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


def downstream_tls_from_envoy(d: dict, path: str, secrets: Secrets | None = None) -> DownstreamTls:
    body, tp = _socket(d, path, T_TLS_DOWN)
    w.check_keys(body, ("common_tls_context", "require_client_certificate"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp), w.join(tp, "common_tls_context"), secrets)
    if "cert_file" not in c and "cert_secret" not in c:
        raise ConfigError(w.join(tp, "common_tls_context.tls_certificates"), "a certificate is required")
    if c.get("match_san_uris"):
        raise ConfigError(w.join(tp, "common_tls_context.validation_context.match_typed_subject_alt_names"),
                          "is not supported on listeners: match the client identity with an RBAC "
                          "principal (authenticated.principal_name) instead")
    require = w.boolean(body, "require_client_certificate", tp, False)
    if require and not c.get("ca_file") and not c.get("ca_secret"):
        raise ConfigError(w.join(tp, "require_client_certificate"),
                          "needs common_tls_context.validation_context.trusted_ca")
    return DownstreamTls(cert_file=c.get("cert_file", ""), key_file=c.get("key_file", ""),
                         ca_file=c.get("ca_file"), require_client_cert=require,
                         min_version=c.get("min_version", "TLSv1_2"),
                         cert_secret=c.get("cert_secret", ""), ca_secret=c.get("ca_secret", ""),
                         alpn=c["alpn"])


def upstream_tls_from_envoy(d: dict, path: str, secrets: Secrets | None = None) -> UpstreamTls:
    body, tp = _socket(d, path, T_TLS_UP)
    w.check_keys(body, ("common_tls_context", "sni"), tp)
    c = _common(w.mapping(body, "common_tls_context", tp, {}), w.join(tp, "common_tls_context"),
                secrets)
    has_ca = c.get("ca_file") is not None or bool(c.get("ca_secret"))
    if c.get("match_san_uris") and not has_ca:
        raise ConfigError(w.join(tp, "common_tls_context.validation_context"),
                          "SAN-based verification of peer certificates without trusted_ca is "
                          "insecure and not allowed (as in Envoy)")
    return UpstreamTls(sni=w.string(body, "sni", tp, ""), ca_file=c.get("ca_file"),
                       cert_file=c.get("cert_file"), key_file=c.get("key_file"),
                       verify=has_ca, min_version=c.get("min_version", "TLSv1_2"),
                       match_san_uris=c.get("match_san_uris", ()),
                       cert_secret=c.get("cert_secret", ""), ca_secret=c.get("ca_secret", ""),
                       alpn=c["alpn"])
