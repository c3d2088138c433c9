"""Local rate limit from Envoy v3: ``envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit``
(also the per-route config).

Envoy semantics kept on purpose: ``filter_enabled`` and ``filter_enforced`` default to 0 % (the
filter only counts); set them to 100 % to limit. Descriptors come from the filter's own
``rate_limits`` (``vh_rate_limits: OVERRIDE``); route and virtual-host rate limits, stages
other than 0 and the cluster-wide mode are refused by name.
``local_rate_limit_per_downstream_connection`` gives each downstream connection its own
buckets.
"""

from __future__ import annotations

from filters.local_ratelimit.config import (
    DEFAULT_MAX_DYNAMIC,
    JWT_FILTER,
    SKIP,
    Action,
    DescriptorConfig,
    Entry,
    HeaderOption,
    LocalRateLimitConfig,
    TokenBucketConfig,
    client_ip,
    fingerprint,
    jwt_claim,
)
from filters.request_headers import request_header_test
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import header_matcher_from_envoy
from sidecar.core.message import Request


def _bucket_envoy(d: object, path: str) -> TokenBucketConfig:
    m = w.check_keys(d, ("max_tokens", "tokens_per_fill", "fill_interval"), path)
    mx = w.integer(m, "max_tokens", path, lo=1)
    per = w.integer(m, "tokens_per_fill", path, 1, lo=1)
    interval = w.duration(m, "fill_interval", path)
    if interval < 0.05:
        raise ConfigError(w.join(path, "fill_interval"), "must be at least 50ms (as Envoy)")
    return TokenBucketConfig(mx, per, interval)


_DENOMS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


def fraction(d: object, path: str) -> float:
    """RuntimeFractionalPercent -> percent. There is no runtime layer here, so a
    ``runtime_key`` always resolves to its ``default_value`` (Envoy's behaviour when the key
    is unset)."""
    m = w.check_keys(d, ("default_value", "runtime_key"), path)
    w.string(m, "runtime_key", path, "")
    dp = w.join(path, "default_value")
    dv = w.check_keys(w.mapping(m, "default_value", path), ("numerator", "denominator"), dp)
    num = w.integer(dv, "numerator", dp, 0, lo=0)
    den = _DENOMS[w.string(dv, "denominator", dp, "HUNDRED", choices=tuple(_DENOMS))]
    return min(100.0, num * 100.0 / den)


def _header_options(items: list[object], path: str) -> tuple[HeaderOption, ...]:
    out: list[HeaderOption] = []
    for i, item in enumerate(items):
        p = w.join(path, i)
        o = w.check_keys(item, ("header", "append", "append_action", "keep_empty_value"), p)
        hp = w.join(p, "header")
        h = w.check_keys(w.mapping(o, "header", p), ("key", "value", "raw_value"), hp)
        if h.get("raw_value") is not None:
            raise ConfigError(w.join(hp, "raw_value"), "is not supported; use value")
        name = w.string(h, "key", hp, nonempty=True).lower()
        value = w.string(h, "value", hp, "")
        if o.get("append") is not None and o.get("append_action") is not None:
            raise ConfigError(p, "only one of append, append_action may be set")
        append = w.boolean(o, "append", p, True)
        act = w.string(o, "append_action", p, None,
                       choices=("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD"))
        if act is not None:
            append = act == "APPEND_IF_EXISTS_OR_ADD"
        w.boolean(o, "keep_empty_value", p, False)
        out.append((name, value, append))
    return tuple(out)


def _descriptors(items: list[object], path: str) -> tuple[DescriptorConfig, ...]:
    out = []
    for i, item in enumerate(items):
        p = w.join(path, i)
        d = w.check_keys(item, ("entries", "token_bucket"), p)
        ep = w.join(p, "entries")
        entries = []
        for j, e in enumerate(w.seq(d, "entries", p)):
            q = w.join(ep, j)
            m = w.check_keys(e, ("key", "value"), q)
            entries.append((w.string(m, "key", q, nonempty=True), w.string(m, "value", q, "")))
        if not entries:
            raise ConfigError(ep, "needs at least one entry")
        out.append(DescriptorConfig(tuple(entries),
                                    _bucket_envoy(w.mapping(d, "token_bucket", p),
                                                  w.join(p, "token_bucket"))))
    return tuple(out)


def _action(raw: object, path: str) -> Action:
    kinds = ("request_headers", "remote_address", "generic_key", "header_value_match",
             "metadata", "source_cluster", "destination_cluster", "dynamic_metadata",
             "masked_remote_address", "query_parameters", "query_parameter_value_match",
             "extension")
    d = w.check_keys(raw, kinds, path)
    kind = w.one_of(d, kinds, path)
    assert kind is not None
    kp = w.join(path, kind)
    if kind == "request_headers":
        x = w.check_keys(w.mapping(d, kind, path), ("header_name", "descriptor_key",
                                                    "skip_if_absent"), kp)
        hname = w.string(x, "header_name", kp, nonempty=True).lower()
        key = w.string(x, "descriptor_key", kp, nonempty=True)
        skip = w.boolean(x, "skip_if_absent", kp, False)

        def request_headers(req: Request) -> Entry | None:
            v = req.headers.get(hname)
            if v is None:
                return SKIP if skip else None
            return (key, v)
        return request_headers
    if kind == "remote_address":
        w.check_keys(d[kind] or {}, (), kp)

        def remote_address(req: Request) -> Entry | None:
            ip = client_ip(req)
            return ("remote_address", ip) if ip else None
        return remote_address
    if kind == "generic_key":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_value", "descriptor_key"), kp)
        entry: Entry = (w.string(x, "descriptor_key", kp, "generic_key") or "generic_key",
                 w.string(x, "descriptor_value", kp, nonempty=True))
        return lambda req: entry
    if kind == "header_value_match":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_key", "descriptor_value",
                                                    "expect_match", "headers"), kp)
        hv: Entry = (w.string(x, "descriptor_key", kp, "header_match") or "header_match",
                 w.string(x, "descriptor_value", kp, nonempty=True))
        expect = w.boolean(x, "expect_match", kp, True)
        hp = w.join(kp, "headers")
        ms = [request_header_test(header_matcher_from_envoy(h, w.join(hp, i)))
              for i, h in enumerate(w.seq(x, "headers", kp))]
        if not ms:
            raise ConfigError(hp, "needs at least one header matcher")
        return lambda req: hv if all(m(req) for m in ms) == expect else None
    if kind == "metadata":
        x = w.check_keys(w.mapping(d, kind, path), ("descriptor_key", "metadata_key",
                                                    "default_value", "source",
                                                    "skip_if_absent"), kp)
        key = w.string(x, "descriptor_key", kp, nonempty=True)
        w.string(x, "source", kp, "DYNAMIC", choices=("DYNAMIC",))
        mp = w.join(kp, "metadata_key")
        mk = w.check_keys(w.mapping(x, "metadata_key", kp), ("key", "path"), mp)
        if w.string(mk, "key", mp) != JWT_FILTER:
            raise ConfigError(w.join(mp, "key"),
                              f"only {JWT_FILTER} metadata (verified JWT payloads) is available")
        segs = []
        for i, s in enumerate(w.seq(mk, "path", mp)):
            sp = w.join(w.join(mp, "path"), i)
            seg = w.check_keys(s, ("key",), sp)
            segs.append(w.string(seg, "key", sp, nonempty=True))
        if len(segs) < 2:
            raise ConfigError(w.join(mp, "path"), "needs [{key: <provider>}, {key: <claim>}, ...]")
        provider, claim = segs[0], tuple(segs[1:])
        default = w.string(x, "default_value", kp, "")
        skip = w.boolean(x, "skip_if_absent", kp, False)

        def metadata(req: Request) -> Entry | None:
            v = jwt_claim(req, provider, claim)
            if v is None:
                if default:
                    return (key, default)
                return SKIP if skip else None
            return (key, v)
        return metadata
    raise ConfigError(kp, f"rate limit action {kind} is not supported by this proxy")


def _producers(items: list[object], path: str) -> tuple[tuple[Action, ...], ...]:
    out = []
    for i, item in enumerate(items):
        p = w.join(path, i)
        r = w.check_keys(item, ("stage", "disable_key", "actions", "limit", "apply_on_stream_done"), p)
        if w.integer(r, "stage", p, 0) != 0:
            raise ConfigError(w.join(p, "stage"), "only stage 0 is supported")
        if r.get("limit") is not None:
            raise ConfigError(w.join(p, "limit"), "dynamic limit overrides are not supported")
        if w.boolean(r, "apply_on_stream_done", p, False):
            raise ConfigError(w.join(p, "apply_on_stream_done"), "is not supported")
        w.string(r, "disable_key", p, "")
        ap = w.join(p, "actions")
        acts = tuple(_action(a, w.join(ap, j)) for j, a in enumerate(w.seq(r, "actions", p)))
        if not acts:
            raise ConfigError(ap, "needs at least one action")
        out.append(acts)
    return tuple(out)


_ENVOY_KEYS = ("stat_prefix", "status", "token_bucket", "filter_enabled", "filter_enforced",
               "request_headers_to_add_when_not_enforced", "response_headers_to_add",
               "descriptors", "stage", "local_rate_limit_per_downstream_connection",
               "local_cluster_rate_limit", "enable_x_ratelimit_headers", "vh_rate_limits",
               "always_consume_default_token_bucket", "rate_limited_as_resource_exhausted",
               "rate_limits", "max_dynamic_descriptors")


def from_envoy(raw: object, path: str) -> LocalRateLimitConfig:
    d = w.check_keys(raw, _ENVOY_KEYS, path)
    if w.integer(d, "stage", path, 0) != 0:
        raise ConfigError(w.join(path, "stage"), "only stage 0 is supported")
    if w.boolean(d, "rate_limited_as_resource_exhausted", path, False):
        raise ConfigError(w.join(path, "rate_limited_as_resource_exhausted"), "is not supported")
    if d.get("local_cluster_rate_limit") is not None:
        raise ConfigError(w.join(path, "local_cluster_rate_limit"), "is not supported")
    if w.string(d, "vh_rate_limits", path, "OVERRIDE", choices=("OVERRIDE",
                                                                "INCLUDE", "IGNORE")) != "OVERRIDE":
        raise ConfigError(w.join(path, "vh_rate_limits"),
                          "route/virtual host rate_limits are not supported; use rate_limits here")
    status = 429
    if d.get("status") is not None:
        sp = w.join(path, "status")
        s = w.check_keys(w.mapping(d, "status", path), ("code",), sp)
        status = w.integer(s, "code", sp, lo=400, hi=599)
    bucket = None
    if d.get("token_bucket") is not None:
        bucket = _bucket_envoy(w.mapping(d, "token_bucket", path), w.join(path, "token_bucket"))
    enabled = (fraction(w.mapping(d, "filter_enabled", path), w.join(path, "filter_enabled"))
               if d.get("filter_enabled") is not None else 0.0)
    enforced = (fraction(w.mapping(d, "filter_enforced", path), w.join(path, "filter_enforced"))
                if d.get("filter_enforced") is not None else 0.0)
    descriptors = _descriptors(w.seq(d, "descriptors", path, []), w.join(path, "descriptors"))
    producers = _producers(w.seq(d, "rate_limits", path, []), w.join(path, "rate_limits"))
    xrl = w.string(d, "enable_x_ratelimit_headers", path, "OFF",
                   choices=("OFF", "DRAFT_VERSION_03")) == "DRAFT_VERSION_03"
    return LocalRateLimitConfig(
        stat_prefix=w.string(d, "stat_prefix", path, nonempty=True),
        bucket=bucket, descriptors=descriptors, producers=producers, status=status,
        enabled_pct=enabled, enforced_pct=enforced,
        response_headers=_header_options(w.seq(d, "response_headers_to_add", path, []),
                                         w.join(path, "response_headers_to_add")),
        request_headers_not_enforced=_header_options(
            w.seq(d, "request_headers_to_add_when_not_enforced", path, []),
            w.join(path, "request_headers_to_add_when_not_enforced")),
        x_ratelimit_headers=xrl,
        always_consume_default=w.boolean(d, "always_consume_default_token_bucket", path, True),
        max_dynamic=w.integer(d, "max_dynamic_descriptors", path, DEFAULT_MAX_DYNAMIC, lo=1),
        per_connection=w.boolean(d, "local_rate_limit_per_downstream_connection", path, False),
        fingerprint="envoy:" + fingerprint(d))


