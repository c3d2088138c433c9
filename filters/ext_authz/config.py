"""ext_authz config: Envoy's ``ExtAuthz`` / ``ExtAuthzPerRoute``, every field honoured or
refused by name. Native YAML takes the same fields (``docs/filters.md``)."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar import sdk
from sidecar.sdk import ConfigError, StringMatcher, wire

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"

DEFAULT_TIMEOUT_S = 0.2            # Envoy's ext_authz default when a gRPC service sets none
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}
# google.rpc / envoy.type.v3.StatusCode names -> HTTP status (for status_on_error)
_STATUS_CODES = {"Continue": 100, "OK": 200, "Created": 201, "Accepted": 202, "NoContent": 204,
                 "MovedPermanently": 301, "Found": 302, "SeeOther": 303, "NotModified": 304,
                 "TemporaryRedirect": 307, "PermanentRedirect": 308, "BadRequest": 400,
                 "Unauthorized": 401, "PaymentRequired": 402, "Forbidden": 403, "NotFound": 404,
                 "MethodNotAllowed": 405, "NotAcceptable": 406, "RequestTimeout": 408,
                 "Conflict": 409, "Gone": 410, "PayloadTooLarge": 413, "TooManyRequests": 429,
                 "InternalServerError": 500, "NotImplemented": 501, "BadGateway": 502,
                 "ServiceUnavailable": 503, "GatewayTimeout": 504}


@dataclass(frozen=True, slots=True)
class HttpServiceConfig:
    cluster: str
    uri: str
    timeout_s: float
    path_prefix: str = ""
    path_override: str = ""
    allowed_headers: tuple[StringMatcher, ...] | None = None     # None: Envoy's default set
    headers_to_add: tuple[tuple[str, str], ...] = ()
    allowed_upstream_headers: tuple[StringMatcher, ...] = ()
    allowed_upstream_headers_to_append: tuple[StringMatcher, ...] = ()
    allowed_client_headers: tuple[StringMatcher, ...] | None = None   # None: all
    allowed_client_headers_on_success: tuple[StringMatcher, ...] = ()
    dynamic_metadata_from_headers: tuple[StringMatcher, ...] = ()


@dataclass(frozen=True, slots=True)
class GrpcServiceConfig:
    target: str                         # google_grpc target_uri: host:port ("" : envoy_grpc)
    timeout_s: float
    initial_metadata: tuple[tuple[str, str], ...] = ()
    envoy: sdk.EnvoyGrpcService | None = None     # envoy_grpc: through a cluster


@dataclass(frozen=True, slots=True)
class BodySettings:
    max_bytes: int
    allow_partial: bool = False
    pack_as_bytes: bool = False


@dataclass(frozen=True, slots=True)
class ExtAuthzConfig:
    http: HttpServiceConfig | None
    grpc: GrpcServiceConfig | None
    failure_mode_allow: bool = False
    failure_mode_allow_header_add: bool = False
    status_on_error: int = 403
    with_request_body: BodySettings | None = None
    metadata_context_namespaces: tuple[str, ...] = ()
    enabled: float = 1.0                   # filter_enabled default_value
    deny_at_disable: bool = False
    allowed_headers: tuple[StringMatcher, ...] | None = None    # top-level (overrides http's)
    disallowed_headers: tuple[StringMatcher, ...] = ()
    encode_raw_headers: bool = False
    ingest_metadata: bool = True           # enable_dynamic_metadata_ingestion
    max_denied_body: int = 0               # 0: no limit
    stat_prefix: str = ""


@dataclass(frozen=True, slots=True)
class ExtAuthzPerRoute:
    context_extensions: tuple[tuple[str, str], ...] = ()
    disable_request_body_buffering: bool = False
    with_request_body: BodySettings | None = None
    http: HttpServiceConfig | None = None
    grpc: GrpcServiceConfig | None = None


def list_matcher(d: object, path: str) -> tuple[StringMatcher, ...]:
    """``envoy.type.matcher.v3.ListStringMatcher``."""
    m = wire.check_keys(d, ("patterns",), path)
    pp = wire.join(path, "patterns")
    return tuple(sdk.string_matcher_from_envoy(x, wire.join(pp, i))
                 for i, x in enumerate(wire.seq(m, "patterns", path)))


def _list_matcher_or(d: dict[str, object], key: str, path: str,
                     default: tuple[StringMatcher, ...] | None) -> tuple[StringMatcher, ...] | None:
    if d.get(key) is None:
        return default
    return list_matcher(d[key], wire.join(path, key))


def _header_values(items: list[object], path: str) -> tuple[tuple[str, str], ...]:
    out = []
    for i, h in enumerate(items):
        hp = wire.join(path, i)
        hv = wire.check_keys(h, ("key", "value", "raw_value"), hp)
        if hv.get("raw_value"):
            raise ConfigError(wire.join(hp, "raw_value"), "is not supported; use value")
        out.append((wire.string(hv, "key", hp, nonempty=True).lower(),
                    wire.string(hv, "value", hp, "")))
    return tuple(out)


def http_service(d: object, path: str) -> HttpServiceConfig:
    m = wire.check_keys(d, ("server_uri", "path_prefix", "path_override", "method_override",
                            "authorization_request", "authorization_response", "retry_policy"),
                        path)
    for k in ("retry_policy", "method_override"):
        if m.get(k):
            raise ConfigError(wire.join(path, k), "is not supported")
    sp = wire.join(path, "server_uri")
    su = wire.check_keys(wire.mapping(m, "server_uri", path), ("uri", "cluster", "timeout"), sp)
    prefix = wire.string(m, "path_prefix", path, "")
    override = wire.string(m, "path_override", path, "")
    if prefix and override:
        raise ConfigError(path, "only one of path_prefix, path_override may be set")
    for k, v in (("path_prefix", prefix), ("path_override", override)):
        if v and not v.startswith("/"):
            raise ConfigError(wire.join(path, k), "must start with /")
    rq: dict[str, object] = {}
    rqp = wire.join(path, "authorization_request")
    if m.get("authorization_request") is not None:
        rq = wire.check_keys(m["authorization_request"], ("allowed_headers", "headers_to_add"),
                             rqp)
    rs: dict[str, object] = {}
    rsp = wire.join(path, "authorization_response")
    if m.get("authorization_response") is not None:
        rs = wire.check_keys(m["authorization_response"], (
            "allowed_upstream_headers", "allowed_upstream_headers_to_append",
            "allowed_client_headers", "allowed_client_headers_on_success",
            "dynamic_metadata_from_headers"), rsp)
    return HttpServiceConfig(
        cluster=wire.string(su, "cluster", sp, nonempty=True),
        uri=wire.string(su, "uri", sp, ""),
        timeout_s=wire.duration(su, "timeout", sp),
        path_prefix=prefix, path_override=override,
        allowed_headers=_list_matcher_or(rq, "allowed_headers", rqp, None),
        headers_to_add=_header_values(wire.seq(rq, "headers_to_add", rqp, []),
                                      wire.join(rqp, "headers_to_add")),
        allowed_upstream_headers=_list_matcher_or(rs, "allowed_upstream_headers", rsp, ()) or (),
        allowed_upstream_headers_to_append=_list_matcher_or(
            rs, "allowed_upstream_headers_to_append", rsp, ()) or (),
        allowed_client_headers=_list_matcher_or(rs, "allowed_client_headers", rsp, None),
        allowed_client_headers_on_success=_list_matcher_or(
            rs, "allowed_client_headers_on_success", rsp, ()) or (),
        dynamic_metadata_from_headers=_list_matcher_or(
            rs, "dynamic_metadata_from_headers", rsp, ()) or ())


def grpc_service(d: object, path: str) -> GrpcServiceConfig:
    m = wire.check_keys(d, ("envoy_grpc", "google_grpc", "timeout", "initial_metadata",
                            "retry_policy"), path)
    if m.get("retry_policy"):
        raise ConfigError(wire.join(path, "retry_policy"), "is not supported")
    kind = wire.one_of(m, ("envoy_grpc", "google_grpc"), path)
    timeout = wire.duration(m, "timeout", path, DEFAULT_TIMEOUT_S)
    if timeout <= 0:
        raise ConfigError(wire.join(path, "timeout"),
                          "0 (no timeout) is not supported: every call to the service is bounded")
    if kind == "envoy_grpc":
        envoy = sdk.envoy_grpc_service(m, path)
        return GrpcServiceConfig(target="", timeout_s=timeout,
                                 initial_metadata=envoy.initial_metadata, envoy=envoy)
    gp = wire.join(path, "google_grpc")
    g = wire.check_keys(m["google_grpc"], ("target_uri", "stat_prefix", "channel_credentials",
                                           "channel_credentials_plugin", "call_credentials",
                                           "call_credentials_plugin", "credentials_factory_name",
                                           "config", "per_stream_buffer_limit_bytes",
                                           "channel_args"), gp)
    for k in ("channel_credentials", "channel_credentials_plugin", "call_credentials",
              "call_credentials_plugin", "credentials_factory_name", "config", "channel_args"):
        if g.get(k):
            raise ConfigError(wire.join(gp, k), "is not supported (plaintext gRPC only)")
    wire.integer(g, "per_stream_buffer_limit_bytes", gp, 0, lo=0)
    wire.string(g, "stat_prefix", gp, "")
    target = wire.string(g, "target_uri", gp, nonempty=True)
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(wire.join(gp, "target_uri"), "must be host:port")
    return GrpcServiceConfig(
        target=target, timeout_s=timeout,
        initial_metadata=_header_values(wire.seq(m, "initial_metadata", path, []),
                                        wire.join(path, "initial_metadata")))


def body_settings(d: object, path: str) -> BodySettings:
    m = wire.check_keys(d, ("max_request_bytes", "allow_partial_message", "pack_as_bytes"), path)
    return BodySettings(max_bytes=wire.integer(m, "max_request_bytes", path, lo=1),
                        allow_partial=wire.boolean(m, "allow_partial_message", path, False),
                        pack_as_bytes=wire.boolean(m, "pack_as_bytes", path, False))


def _runtime_percent(d: dict[str, object], key: str, path: str) -> float:
    if d.get(key) is None:
        return 1.0
    p = wire.join(path, key)
    r = wire.check_keys(d[key], ("default_value", "runtime_key"), p)
    if r.get("runtime_key"):
        raise ConfigError(wire.join(p, "runtime_key"), "runtime overrides are not supported")
    dp = wire.join(p, "default_value")
    fp = wire.check_keys(wire.mapping(r, "default_value", p), ("numerator", "denominator"), dp)
    den = _DENOMINATORS[wire.string(fp, "denominator", dp, "HUNDRED", choices=tuple(_DENOMINATORS))]
    return min(1.0, wire.integer(fp, "numerator", dp, 0, lo=0) / den)


_REFUSED_IF_SET = ("typed_metadata_context_namespaces", "route_metadata_context_namespaces",
                   "route_typed_metadata_context_namespaces", "filter_enabled_metadata",
                   "bootstrap_metadata_labels_key", "decoder_header_mutation_rules",
                   "filter_metadata")
_REFUSED_IF_TRUE = ("clear_route_cache", "include_peer_certificate", "include_tls_session",
                    "validate_mutations", "emit_filter_state_stats",
                    "enforce_response_header_limits", "shadow_mode")


def from_envoy(d: object, path: str) -> ExtAuthzConfig:
    m = wire.check_keys(d, (
        "grpc_service", "http_service", "transport_api_version", "failure_mode_allow",
        "failure_mode_allow_header_add", "with_request_body", "status_on_error",
        "metadata_context_namespaces", "filter_enabled", "deny_at_disable", "stat_prefix",
        "allowed_headers", "disallowed_headers", "charge_cluster_response_stats",
        "encode_raw_headers", "enable_dynamic_metadata_ingestion",
        "max_denied_response_body_bytes", *_REFUSED_IF_SET, *_REFUSED_IF_TRUE), path)
    for k in _REFUSED_IF_SET:
        if m.get(k):
            raise ConfigError(wire.join(path, k), "is not supported")
    for k in _REFUSED_IF_TRUE:
        if wire.boolean(m, k, path, False):
            raise ConfigError(wire.join(path, k), "is not supported")
    wire.string(m, "transport_api_version", path, "V3", choices=("AUTO", "V3"))
    if not wire.boolean(m, "charge_cluster_response_stats", path, True):
        raise ConfigError(wire.join(path, "charge_cluster_response_stats"),
                          "false is not supported (calls go through the cluster and count there)")
    kind = wire.one_of(m, ("grpc_service", "http_service"), path)
    http = grpc = None
    if kind == "http_service":
        http = http_service(m["http_service"], wire.join(path, "http_service"))
    else:
        grpc = grpc_service(m["grpc_service"], wire.join(path, "grpc_service"))
    status = 403
    if m.get("status_on_error") is not None:
        sp = wire.join(path, "status_on_error")
        s = wire.check_keys(m["status_on_error"], ("code",), sp)
        code = s.get("code")
        if isinstance(code, str) and code in _STATUS_CODES:
            status = _STATUS_CODES[code]
        else:
            status = wire.integer(s, "code", sp, lo=200, hi=599)
    deny_at_disable = False
    if m.get("deny_at_disable") is not None:
        dp = wire.join(path, "deny_at_disable")
        f = wire.check_keys(m["deny_at_disable"], ("default_value", "runtime_key"), dp)
        if f.get("runtime_key"):
            raise ConfigError(wire.join(dp, "runtime_key"), "runtime overrides are not supported")
        deny_at_disable = wire.boolean(f, "default_value", dp)
    namespaces = wire.seq(m, "metadata_context_namespaces", path, [])
    np_ = wire.join(path, "metadata_context_namespaces")
    for i, n in enumerate(namespaces):
        if not isinstance(n, str):
            raise ConfigError(wire.join(np_, i), "must be a string")
    if namespaces and http is not None:
        raise ConfigError(np_, "only the gRPC service receives metadata context")
    return ExtAuthzConfig(
        http=http, grpc=grpc,
        failure_mode_allow=wire.boolean(m, "failure_mode_allow", path, False),
        failure_mode_allow_header_add=wire.boolean(m, "failure_mode_allow_header_add", path,
                                                   False),
        status_on_error=status,
        with_request_body=body_settings(m["with_request_body"],
                                        wire.join(path, "with_request_body"))
        if m.get("with_request_body") is not None else None,
        metadata_context_namespaces=tuple(namespaces),
        enabled=_runtime_percent(m, "filter_enabled", path),
        deny_at_disable=deny_at_disable,
        allowed_headers=_list_matcher_or(m, "allowed_headers", path, None),
        disallowed_headers=_list_matcher_or(m, "disallowed_headers", path, ()) or (),
        encode_raw_headers=wire.boolean(m, "encode_raw_headers", path, False),
        ingest_metadata=wire.boolean(m, "enable_dynamic_metadata_ingestion", path, True),
        max_denied_body=wire.integer(m, "max_denied_response_body_bytes", path, 0, lo=0),
        stat_prefix=wire.string(m, "stat_prefix", path, ""))


def per_route_from_envoy(d: object, path: str) -> ExtAuthzPerRoute | None:
    """``disabled: true`` (None: the filter is off on the route) or ``check_settings``."""
    m = wire.check_keys(d, ("disabled", "check_settings"), path)
    kind = wire.one_of(m, ("disabled", "check_settings"), path)
    if kind == "disabled":
        if not wire.boolean(m, "disabled", path):
            raise ConfigError(wire.join(path, "disabled"), "must be true (or set check_settings)")
        return None
    cp = wire.join(path, "check_settings")
    c = wire.check_keys(m["check_settings"], ("context_extensions", "disable_request_body_buffering",
                                              "with_request_body", "grpc_service",
                                              "http_service"), cp)
    ext = wire.mapping(c, "context_extensions", cp, {})
    ep = wire.join(cp, "context_extensions")
    for k, v in ext.items():
        if not isinstance(v, str):
            raise ConfigError(wire.join(ep, str(k)), "must be a string")
    wire.one_of(c, ("grpc_service", "http_service"), cp, required=False)
    no_buffer = wire.boolean(c, "disable_request_body_buffering", cp, False)
    body = body_settings(c["with_request_body"], wire.join(cp, "with_request_body")) \
        if c.get("with_request_body") is not None else None
    if no_buffer and body is not None:
        raise ConfigError(cp, "only one of disable_request_body_buffering, with_request_body "
                          "may be set")
    return ExtAuthzPerRoute(
        context_extensions=tuple(sorted((str(k), v) for k, v in ext.items())),
        disable_request_body_buffering=no_buffer, with_request_body=body,
        http=http_service(c["http_service"], wire.join(cp, "http_service"))
        if c.get("http_service") is not None else None,
        grpc=grpc_service(c["grpc_service"], wire.join(cp, "grpc_service"))
        if c.get("grpc_service") is not None else None)
