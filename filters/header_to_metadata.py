"""Header (or cookie) values into dynamic metadata: Envoy's ``envoy.filters.http.header_to_metadata``.

Each rule reads a request header (``request_rules``, before the request goes on) or a
response header (``response_rules``) and writes ``metadata[namespace][key]`` for later filters
and the access log: the header's value (optionally rewritten by a regex, decoded from base64,
or parsed as a number) when it is present (``on_header_present``), a fixed value when it is
missing (``on_header_missing``); ``remove`` then deletes the header. ``cookie`` reads a
cookie of the request instead of a header. Values over 8 KiB are ignored, as in Envoy.

Envoy: ``Config {request_rules, response_rules}`` (also per route, replacing the listener's).
Native takes the same fields::

    filters:
      - header_to_metadata:
          request_rules:
            - header: x-tenant
              on_header_present: {metadata_namespace: tenancy, key: tenant}
              on_header_missing: {metadata_namespace: tenancy, key: tenant, value: none}
              remove: true

Refused: ``type: PROTOBUF_VALUE`` (a serialised protobuf Value), ``stat_prefix`` (Envoy's
stats are not reproduced).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from sidecar import sdk
from sidecar.sdk import ConfigError, wire

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config"
DEFAULT_NAMESPACE = "envoy.filters.http.header_to_metadata"
MAX_VALUE_LEN = 8 * 1024


@dataclass(frozen=True, slots=True)
class KeyValue:
    namespace: str
    key: str
    value: str                                  # "" : the header's value
    rewrite: tuple[re.Pattern[str], str] | None
    number: bool                                # type NUMBER
    base64: bool                                # encode BASE64: decode the value first


@dataclass(frozen=True, slots=True)
class Rule:
    header: str                                 # "" with a cookie rule
    cookie: str
    on_present: KeyValue | None
    on_missing: KeyValue | None
    remove: bool


@dataclass(frozen=True, slots=True)
class HeaderToMetadataConfig:
    request_rules: tuple[Rule, ...]
    response_rules: tuple[Rule, ...]


def _key_value(d: object, path: str, missing: bool) -> KeyValue:
    m = wire.check_keys(d, ("metadata_namespace", "key", "value", "regex_value_rewrite", "type",
                            "encode"), path)
    kind = wire.string(m, "type", path, "STRING", choices=("STRING", "NUMBER", "PROTOBUF_VALUE"))
    if kind == "PROTOBUF_VALUE":
        raise ConfigError(wire.join(path, "type"), "PROTOBUF_VALUE is not supported")
    value = wire.string(m, "value", path, "")
    if missing and not value:
        raise ConfigError(wire.join(path, "value"), "is required for on_header_missing")
    rewrite = None
    if m.get("regex_value_rewrite") is not None:
        rp = wire.join(path, "regex_value_rewrite")
        r = wire.check_keys(m["regex_value_rewrite"], ("pattern", "substitution"), rp)
        pp = wire.join(rp, "pattern")
        pat = wire.check_keys(wire.mapping(r, "pattern", rp), ("regex", "google_re2"), pp)
        wire.google_re2(pat, pp)
        rewrite = (wire.compile_regex(pat.get("regex"), wire.join(pp, "regex")),
                   wire.string(r, "substitution", rp, ""))
        if value:
            raise ConfigError(rp, "cannot be combined with value")
    return KeyValue(namespace=wire.string(m, "metadata_namespace", path, "") or DEFAULT_NAMESPACE,
                    key=wire.string(m, "key", path, nonempty=True), value=value,
                    rewrite=rewrite, number=kind == "NUMBER",
                    base64=wire.string(m, "encode", path, "NONE", choices=("NONE", "BASE64"))
                    == "BASE64")


def _rule(d: object, path: str, request: bool) -> Rule:
    m = wire.check_keys(d, ("header", "cookie", "on_header_present", "on_header_missing",
                            "remove"), path)
    kind = wire.one_of(m, ("header", "cookie"), path)
    if kind == "cookie" and not request:
        raise ConfigError(wire.join(path, "cookie"), "cookies are only read from requests")
    remove = wire.boolean(m, "remove", path, False)
    if kind == "cookie" and remove:
        raise ConfigError(wire.join(path, "remove"), "cannot remove a cookie")
    present = missing = None
    if m.get("on_header_present") is not None:
        present = _key_value(m["on_header_present"], wire.join(path, "on_header_present"), False)
    if m.get("on_header_missing") is not None:
        missing = _key_value(m["on_header_missing"], wire.join(path, "on_header_missing"), True)
    if present is None and missing is None and not remove:
        raise ConfigError(path, "needs on_header_present, on_header_missing or remove")
    name = wire.string(m, kind or "header", path, nonempty=True)
    return Rule(header=name.lower() if kind == "header" else "",
                cookie=name if kind == "cookie" else "", on_present=present, on_missing=missing,
                remove=remove)


def _config(d: object, path: str) -> HeaderToMetadataConfig:
    m = wire.check_keys(d, ("request_rules", "response_rules", "stat_prefix"), path)
    if m.get("stat_prefix"):
        raise ConfigError(wire.join(path, "stat_prefix"), "is not supported")
    rq = wire.join(path, "request_rules")
    rs = wire.join(path, "response_rules")
    return HeaderToMetadataConfig(
        request_rules=tuple(_rule(r, wire.join(rq, i), True)
                            for i, r in enumerate(wire.seq(m, "request_rules", path, []))),
        response_rules=tuple(_rule(r, wire.join(rs, i), False)
                             for i, r in enumerate(wire.seq(m, "response_rules", path, []))))


def from_envoy(d: object, path: str) -> HeaderToMetadataConfig:
    return _config(d, path)


def from_native(d: object, path: str) -> HeaderToMetadataConfig:
    return _config(d, path)


# ---- the filter -------------------------------------------------------------------------------

def _cookie(headers: sdk.Headers, name: str) -> str | None:
    for line in headers.getall("cookie", ()):
        for part in line.split(";"):
            k, sep, v = part.strip().partition("=")
            if sep and k == name:
                return v
    return None


def _value(kv: KeyValue, raw: str) -> sdk.JsonValue | None:
    value = kv.value or raw
    if kv.rewrite is not None:
        pattern, substitution = kv.rewrite
        value = pattern.sub(substitution, value)
    if not value or len(value) > MAX_VALUE_LEN:
        return None
    if kv.base64:
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    if kv.number:
        try:
            return float(value)
        except ValueError:
            return None
    return value


def _apply(rules: tuple[Rule, ...], headers: sdk.Headers, req: sdk.Request) -> None:
    for rule in rules:
        raw = _cookie(headers, rule.cookie) if rule.cookie else sdk.joined_header(headers,
                                                                                  rule.header)
        if raw is not None and rule.on_present is not None:
            kv = rule.on_present
            value = _value(kv, raw)
            if value is not None:
                sdk.metadata(req, kv.namespace)[kv.key] = value
        elif raw is None and rule.on_missing is not None:
            kv = rule.on_missing
            sdk.metadata(req, kv.namespace)[kv.key] = _value(kv, "")
        if rule.remove and raw is not None:
            headers.popall(rule.header, None)


class HeaderToMetadataFilter(sdk.Filter):
    __slots__ = ("request_rules", "response_rules")

    def __init__(self, config: HeaderToMetadataConfig):
        self.request_rules = config.request_rules
        self.response_rules = config.response_rules

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        if self.request_rules:
            _apply(self.request_rules, req.headers, req)
        resp = await next(req)
        if self.response_rules:
            _apply(self.response_rules, resp.headers, req)
        return resp


def build(config: HeaderToMetadataConfig, per_route: HeaderToMetadataConfig | None,
          state: None, env: sdk.FilterEnv, route: sdk.RouteInfo) -> HeaderToMetadataFilter | None:
    cfg = per_route or config
    if not cfg.request_rules and not cfg.response_rules:
        return None
    return HeaderToMetadataFilter(cfg)


SPEC = sdk.FilterSpec(
    name="envoy.filters.http.header_to_metadata",
    short="header_to_metadata",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=sdk.no_state,
    build=build,
    per_route_type_url=TYPE_URL,
    per_route_from_envoy=from_envoy,
    per_route_from_native=from_native,
)
