"""Pieces every Envoy v3 translator uses: typed ``Any`` bodies, socket addresses, header
mutations, fractional percents, and the type URLs."""

from __future__ import annotations

from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.route import HeaderMutation, HeaderValueOption

T_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"


T_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


T_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


T_ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")


T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


T_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


T_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"


T_PEAK_EWMA = ("type.googleapis.com/envoy.extensions.load_balancing_policies.peak_ewma.v3alpha."
               "PeakEwma")


T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def typed(d: Any, path: str, expected: str | tuple[str, ...]) -> dict:
    """A typed_config/Any: check its @type and return the rest."""
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping with an @type")
    t = d.get("@type")
    exp = (expected,) if isinstance(expected, str) else expected
    if t not in exp:
        raise ConfigError(w.join(path, "@type"), f"unsupported type {t!r}; expected {' or '.join(exp)}")
    return {k: v for k, v in d.items() if k != "@type"}


def socket_address(d: dict, path: str) -> tuple[str, int]:
    w.check_keys(d, ("socket_address",), path)
    sp = w.join(path, "socket_address")
    sa = w.check_keys(w.mapping(d, "socket_address", path),
                      ("address", "port_value", "protocol"), sp)
    if sa.get("protocol", "TCP") != "TCP":
        raise ConfigError(w.join(sp, "protocol"), "only TCP is supported")
    return w.string(sa, "address", sp, nonempty=True), w.integer(sa, "port_value", sp, lo=0, hi=65535)


def header_options(items: list, path: str) -> tuple[HeaderValueOption, ...]:
    out = []
    for i, item in enumerate(items):
        ip = w.join(path, i)
        w.check_keys(item, ("header", "append", "append_action", "keep_empty_value"), ip)
        hp = w.join(ip, "header")
        h = w.check_keys(w.mapping(item, "header", ip), ("key", "value"), hp)
        value = w.string(h, "value", hp, "")
        if "%" in value.replace("%%", ""):
            raise ConfigError(w.join(hp, "value"), "header value formatters (%...%) are not supported")
        value = value.replace("%%", "%")
        action = w.string(item, "append_action", ip, "APPEND_IF_EXISTS_OR_ADD",
                          choices=("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD",
                                   "ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS"))
        append = action == "APPEND_IF_EXISTS_OR_ADD"
        if "append" in item:
            append = w.boolean(item, "append", ip)
        elif action not in ("APPEND_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS_OR_ADD"):
            raise ConfigError(w.join(ip, "append_action"), f"{action} is not supported")
        out.append(HeaderValueOption(name=w.string(h, "key", hp, nonempty=True).lower(),
                                     value=value, append=append))
    return tuple(out)


def header_mutation(d: dict, path: str) -> HeaderMutation:
    return HeaderMutation(
        request_add=header_options(w.seq(d, "request_headers_to_add", path, []),
                                   w.join(path, "request_headers_to_add")),
        request_remove=tuple(h.lower() for h in w.seq(d, "request_headers_to_remove", path, [])),
        response_add=header_options(w.seq(d, "response_headers_to_add", path, []),
                                    w.join(path, "response_headers_to_add")),
        response_remove=tuple(h.lower() for h in w.seq(d, "response_headers_to_remove", path, [])),
    )


def fractional_percent(d: dict, path: str) -> float:
    """Envoy FractionalPercent {numerator, denominator} -> percent (0..100)."""
    w.check_keys(d, ("numerator", "denominator"), path)
    num = w.integer(d, "numerator", path, 0, lo=0)
    den = w.string(d, "denominator", path, "HUNDRED",
                   choices=("HUNDRED", "TEN_THOUSAND", "MILLION"))
    return min(100.0, num * 100.0 / {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}[den])


def runtime_fraction(d: dict, path: str) -> float:
    w.check_keys(d, ("default_value", "runtime_key"), path)
    return fractional_percent(w.mapping(d, "default_value", path), w.join(path, "default_value"))


_MUTATION_KEYS = ("request_headers_to_add", "request_headers_to_remove",
                  "response_headers_to_add", "response_headers_to_remove")
