"""Walks Envoy messages from the real API definitions (envoy-data-plane's betterproto2 types)
and asks the translator what it does with each field (used by test_field_coverage)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import enum
import importlib
import re
import typing
from functools import cache

from control_plane_client.translate.bootstrap import bootstrap
from sidecar.config.errors import ConfigError, ConfigErrors

_WKT_SAMPLES = {
    "Duration": "1s", "Struct": {"k": "v"}, "Value": "v", "ListValue": ["v"], "Empty": {},
    "Timestamp": "2020-01-01T00:00:00Z",
}


@cache
def message_class(name: str) -> type:
    """``envoy.config.cluster.v3.Cluster`` -> the betterproto2 class."""
    mod, _, cls = name.rpartition(".")
    return getattr(importlib.import_module("envoy_data_plane." + mod), cls)


def class_name(cls: type) -> str:
    return cls.__module__.removeprefix("envoy_data_plane.") + "." + cls.__name__


@cache
def fields_of(name: str) -> dict[str, tuple[object, object]]:
    """proto field name -> (betterproto2 metadata, python type)."""
    cls = message_class(name)
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name.rstrip("_")] = (f.metadata["betterproto"], hints[f.name])
    return out


def _inner(tp: object) -> object:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, dict) and args:
        return args[-1]
    if args and typing.get_origin(tp) is not None:
        return _inner(args[0]) if len(args) == 1 else args[0]
    return tp


def submessage(name: str, field: str) -> str | None:
    """The message type of a field ("" for well-known types), None for scalars."""
    meta, tp = fields_of(name)[field]
    if meta.proto_type == "map":
        if meta.map_meta[1].proto_type != "message":
            return None
    elif meta.proto_type != "message" or meta.unwrap is not None:
        return None
    inner = _inner(tp)
    if not isinstance(inner, type):
        return None
    mod = inner.__module__
    if mod.startswith("envoy_data_plane.google") or inner.__name__ in _WKT_SAMPLES:
        return ""
    return class_name(inner)


def sample(name: str, field: str) -> object:
    """A non-default value of the field's type."""
    meta, tp = fields_of(name)[field]
    inner = _inner(tp)
    if meta.proto_type == "map":
        return {"k": {} if meta.map_meta[1].proto_type == "message" else "x"}
    if meta.unwrap is not None or inner in (datetime.timedelta, datetime.datetime):
        v = _scalar_sample(inner)
    elif meta.proto_type == "message":
        v = _WKT_SAMPLES.get(getattr(inner, "__name__", ""), {})
        if getattr(inner, "__name__", "") == "Any":
            v = {"@type": "type.googleapis.com/google.protobuf.Empty"}
    elif meta.proto_type == "enum":
        members = [m for m in inner if int(m.value) != 0] if isinstance(inner, type) and issubclass(inner, enum.Enum) else []
        v = _enum_name(members[0]) if members else "X"
    else:
        v = _scalar_sample(inner)
    return [v] if meta.repeated else v


def _enum_name(member: enum.Enum) -> str:
    n = member.name
    return getattr(member, "proto_name", None) or n


def _scalar_sample(tp: object) -> object:
    if tp is datetime.timedelta:
        return "1s"
    if tp is datetime.datetime:
        return "2020-01-01T00:00:00Z"
    if tp is bool:
        return True
    if tp is int:
        return 7
    if tp is float:
        return 1.5
    if tp is bytes:
        return "eA=="
    return "x"


# a path step: a name, [index], or {a.dotted.key} (a map key that contains dots)
_STEP = re.compile(r"\{([^}]*)\}|([^.\[\]{}]+)|\[(\d+)\]")


def _steps(path: str) -> list[str | int]:
    out: list[str | int] = []
    for m in _STEP.finditer(path):
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(m.group(2))
        else:
            out.append(int(m.group(3)))
    return out


def shown(path: str) -> str:
    """The path as the translator's errors spell it."""
    return path.replace("{", "").replace("}", "")


def put(doc: dict, path: str, value: object) -> None:
    steps = _steps(path)
    cur: typing.Any = doc
    for s in steps[:-1]:
        cur = cur[s]
    cur[steps[-1]] = value


def get(doc: dict, path: str) -> object:
    cur: typing.Any = doc
    for s in _steps(path):
        cur = cur[s]
    return cur


def errors(doc: dict) -> list[ConfigError]:
    try:
        bootstrap(copy.deepcopy(doc))
    except ConfigErrors as e:
        return list(e.errors)
    except ConfigError as e:
        return [e]
    return []


def refused_at(doc: dict, path: str) -> list[ConfigError]:
    """Errors of ``doc`` that name ``path`` itself (refused by name, with its path)."""
    p = shown(path)
    return [e for e in errors(doc) if e.path == p or e.path.startswith(p + "[")]


def oneof_siblings(name: str, field: str) -> list[str]:
    group = fields_of(name)[field][0].group
    if group is None:
        return []
    return [f for f, (m, _) in fields_of(name).items() if m.group == group and f != field]


def set_field(doc: dict, at: str, name: str, field: str, value: object) -> str:
    """Set ``field`` of the ``name`` message at ``at`` (its oneof siblings removed); returns
    the field's path."""
    inst = get(doc, at) if at else doc
    assert isinstance(inst, dict), (at, inst)
    for sib in oneof_siblings(name, field):
        inst.pop(sib, None)
    inst[field] = value
    return f"{at}.{field}" if at else field


def child_at(name: str, field: str, fp: str, value: object) -> str:
    meta = fields_of(name)[field][0]
    if meta.proto_type == "map":
        key = next(iter(value)) if isinstance(value, dict) and value else "k"
        return f"{fp}.{{{key}}}" if "." in key else f"{fp}.{key}"
    return f"{fp}[0]" if meta.repeated else fp


HCM_AT = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ROUTE_AT = HCM_AT + ".route_config.virtual_hosts[0].routes[0]"
CLUSTER_AT = "static_resources.clusters[0]"


def _sa(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def probe_bootstrap() -> dict:
    """A bootstrap using every message the translator accepts, each in a valid minimal form:
    field probes are made by adding one field to one of its messages."""
    t = "type.googleapis.com/"
    return {
        "node": {"id": "n", "cluster": "c"},
        "admin": {"address": _sa(9901)},
        "static_resources": {
            "secrets": [{"name": "v", "validation_context": {"trusted_ca": {"filename": "/certs/ca.pem"}}}],
            "listeners": [{
                "name": "l", "address": _sa(10000),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": t + "envoy.extensions.filters.network.http_connection_manager.v3."
                                     "HttpConnectionManager",
                        "stat_prefix": "in",
                        "route_config": {"name": "r", "virtual_hosts": [{
                            "name": "v", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "route": {"cluster": "c0"}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.jwt_authn", "typed_config": {
                                "@type": t + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                                "providers": {"p": {"issuer": "i", "remote_jwks": {
                                    "http_uri": {"uri": "http://127.0.0.1:10001/jwks",
                                                 "cluster": "c0", "timeout": "1s"}}}},
                                "rules": [{"match": {"prefix": "/"},
                                           "requires": {"provider_name": "p"}}]}},
                            {"name": "envoy.filters.http.rbac", "typed_config": {
                                "@type": t + "envoy.extensions.filters.http.rbac.v3.RBAC",
                                "rules": {"action": "ALLOW", "policies": {"p": {
                                    "permissions": [{"any": True}],
                                    "principals": [{"any": True}]}}}}},
                            {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
                                "@type": t + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                                "stat_prefix": "rl", "token_bucket": {
                                    "max_tokens": 10, "tokens_per_fill": 10,
                                    "fill_interval": "1s"}}},
                            {"name": "envoy.filters.http.fault", "typed_config": {
                                "@type": t + "envoy.extensions.filters.http.fault.v3.HTTPFault",
                                "abort": {"http_status": 503, "percentage": {"numerator": 0}}}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": t + "envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                            "@type": t + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                            "path": "/dev/null"}}],
                    }}]}],
            }],
            "clusters": [{
                "name": "c0", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "c0", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": _sa(10001)}}]}]},
            }],
        },
    }


def alternative_samples(name: str, field: str) -> list[object]:
    """Other values of the field's type (a field whose default sample is refused for its value,
    not its name, accepts one of these)."""
    meta, tp = fields_of(name)[field]
    inner = _inner(tp)
    out: list[object] = []
    if inner is bool or (meta.unwrap is not None and inner is bool):
        out = [False]
    elif inner is int:
        out = [0, 1, 100]
    elif inner is str and meta.proto_type == "string":
        out = ["", "/", "a.test"]
    elif meta.proto_type == "enum" and isinstance(inner, type) and issubclass(inner, enum.Enum):
        out = [_enum_name(m) for m in inner]
    return [[v] if meta.repeated else v for v in out]
