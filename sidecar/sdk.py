"""The public filter SDK: the one module a filter imports (``from sidecar import sdk``).

A filter is ``async (request, next) -> response``. A user filter is a class that subclasses
``UserFilter`` and is named by config (``docs/filters.md``); the proxy loads it, validates its
config, builds one instance per route and wraps it so that an exception answers 500 for that
request only. Built-in filters (``filters/ext_authz.py``, ``cors``, ``compressor``, ``buffer``,
``header_to_metadata``) are written against this module alone, through ``FilterSpec``.

This module is a thin layer: it re-exports the proxy's own types (``sidecar.core``,
``sidecar.config``) and adds helpers on top; nothing here is a copy.

Stability
---------
**Stable** (kept compatible within a major version; a change is announced and versioned):
``Request``, ``Response``, ``Headers``, ``Body``, ``BodySource``, ``BodyTooLarge``,
``local_reply``, ``Handler``, ``Filter``, ``UserFilter``, ``FilterSetup``, ``ConfigError``,
``from_mapping``, ``Duration``, ``Range``, ``http_call``, ``CallResult``, ``UpstreamError``
and its subclasses, ``route_name``, ``cluster_name``, ``peer_identity``, ``jwt_claims``,
``metadata``, ``counter``, ``gauge``, ``histogram``, ``logger``, and the request/response
attributes documented in ``docs/filters.md``.

**Provisional** (may change in a minor version, noted in the changelog): ``FilterSpec`` and its
``build`` signature (the built-in filter contract), ``FilterEnv``, ``UpstreamClient``,
``GrpcClient``, ``GrpcReply``, ``EnvoyGrpcService``, ``envoy_grpc_service``,
``RequestContext`` fields not exposed by a helper, ``wire``, the matchers,
``TransformedBody``, ``PrefixedStream``, ``RouteInfo``.

Anything imported from another ``sidecar`` module is not part of the SDK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from multidict import MultiDict

from sidecar.config import wire
from sidecar.config.errors import ConfigError
from sidecar.config.grpc_service import envoy_grpc_service
from sidecar.config.matchers import (
    HeaderMatcher,
    StringMatcher,
    header_matcher_from_envoy,
    header_matcher_from_native,
    header_matchers_from_native,
    joined_header,
    string_matcher_from_envoy,
    string_matcher_from_native,
)
from sidecar.config.schema import Duration, Range, from_mapping, parser_for
from sidecar.core.body import (
    Body,
    BodySource,
    BodyTooLarge,
    Headers,
    PrefixedStream,
    TransformedBody,
)
from sidecar.core.context import JsonValue, RequestContext, RouteInfo
from sidecar.core.errors import (
    ConnectFailure,
    NoCluster,
    NoHealthyUpstream,
    Overflow,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.filter import (
    Filter,
    FilterEnv,
    FilterLike,
    FilterSpec,
    GrpcClient,
    Handler,
    RawConfig,
    UpstreamClient,
    no_state,
)
from sidecar.core.grpc import EnvoyGrpcService, GrpcReply
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import (
    NULL,
    CounterFamily,
    GaugeFamily,
    HistogramFamily,
    MetricFactory,
)

__all__ = [
    # messages
    "Request", "Response", "Headers", "Body", "BodySource", "BodyTooLarge", "TransformedBody",
    "PrefixedStream",
    "local_reply", "RequestContext", "RouteInfo", "JsonValue",
    # the contract
    "Filter", "Handler", "FilterLike", "UserFilter", "FilterSetup", "FilterSpec", "FilterEnv",
    "UpstreamClient", "RawConfig", "no_state",
    "GrpcClient", "GrpcReply", "EnvoyGrpcService", "envoy_grpc_service",
    # config
    "ConfigError", "from_mapping", "parser_for", "Duration", "Range", "wire", "StringMatcher",
    "HeaderMatcher", "string_matcher_from_envoy", "string_matcher_from_native",
    "header_matcher_from_envoy", "header_matcher_from_native", "header_matchers_from_native",
    "joined_header",
    # calling a cluster
    "http_call", "CallResult", "UpstreamError", "UpstreamTimeout", "UpstreamReset",
    "ConnectFailure", "NoHealthyUpstream", "Overflow", "NoCluster",
    # request facts
    "route_name", "cluster_name", "peer_identity", "jwt_claims", "metadata",
    # observability
    "counter", "gauge", "histogram", "logger", "NULL", "MetricFactory",
]

ConfigT = TypeVar("ConfigT")
PerRouteT = TypeVar("PerRouteT")
StateT = TypeVar("StateT")


# ---- request facts ----------------------------------------------------------------------------

def route_name(req: Request) -> str:
    """The name of the route that matched ("" before routing, which filters never see)."""
    r = req.ctx.route
    return r.name if r is not None else ""


def cluster_name(req: Request) -> str:
    """The cluster this request goes to. Filters run before the route action: for a weighted
    route this is the same stable draw the route will make."""
    ctx = req.ctx
    if ctx.cluster:
        return ctx.cluster
    r = ctx.route
    return r.pick_cluster(req) if r is not None else ""


def peer_identity(req: Request) -> str | None:
    """The downstream peer's verified identity (the URI SAN of its mTLS client certificate,
    e.g. a SPIFFE ID), or None without a verified client certificate."""
    return req.ctx.peer_identity


def jwt_claims(req: Request, provider: str | None = None) -> Mapping[str, JsonValue] | None:
    """The claims of the JWT that ``jwt_authn`` verified for this request: of ``provider`` (or
    the name its ``payload_in_metadata`` gives), or of the first one verified; None when none."""
    payloads = req.ctx.jwt_payloads
    if provider is not None:
        return payloads.get(provider)
    for claims in payloads.values():
        return claims
    return None


def metadata(req: Request, namespace: str) -> dict[str, JsonValue]:
    """This request's dynamic metadata under ``namespace`` (Envoy's ``filter_metadata``),
    created empty on first use: later filters and the access log read what you put here."""
    md = req.ctx.metadata
    ns = md.get(namespace)
    if ns is None:
        ns = md[namespace] = {}
    return ns


# ---- observability ----------------------------------------------------------------------------

def counter(metrics: MetricFactory, name: str, doc: str,
            labels: tuple[str, ...] = ()) -> CounterFamily:
    """A counter family (``NULL``, a no-op, when metrics are off). Make it when the filter is
    built and bind ``.labels(...)`` children then: never per request. Label values must be
    bounded (config names, status classes), never raw request values."""
    return metrics.counter(name, doc, labels) if metrics.enabled else NULL


def gauge(metrics: MetricFactory, name: str, doc: str,
          labels: tuple[str, ...] = ()) -> GaugeFamily:
    return metrics.gauge(name, doc, labels) if metrics.enabled else NULL


def histogram(metrics: MetricFactory, name: str, doc: str, labels: tuple[str, ...] = (),
              buckets: tuple[float, ...] | None = None) -> HistogramFamily:
    if not metrics.enabled:
        return NULL
    if buckets is None:
        return metrics.histogram(name, doc, labels)
    return metrics.histogram(name, doc, labels, buckets)


def logger(name: str) -> logging.Logger:
    """The logger of a filter: ``sidecar.filter.<name>``. Guard debug formatting on the hot
    path with ``log.isEnabledFor(logging.DEBUG)``; never log credentials."""
    return logging.getLogger(f"sidecar.filter.{name}")


# ---- calling another cluster ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CallResult:
    status: int
    headers: Headers
    body: bytes


async def http_call(client: UpstreamClient, method: str, path: str, *,
                    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
                    body: bytes = b"", authority: str = "", timeout: float = 5.0,
                    max_response_bytes: int = 1024 * 1024) -> CallResult:
    """One HTTP request through a cluster (``setup.upstream("auth")``): its load balancer,
    circuit breakers, connection pools and upstream TLS apply, as to routed traffic (Envoy
    Lua's ``httpCall``). The response body is read whole, up to ``max_response_bytes``.

    ``path`` may carry a query (``/check?x=1``). ``authority`` is the Host sent (default: the
    cluster's name). ``timeout`` bounds the whole exchange. Raises ``UpstreamError`` (its
    ``flag`` says why: ``UF`` connect failure, ``UT`` timeout, ``UO`` breaker overflow, ``UH``
    no healthy endpoint, ``UC`` reset, ``NC`` no such cluster) or ``BodyTooLarge``."""
    h: Headers = MultiDict(headers)
    name = client.name
    if "host" not in h:
        h["host"] = authority or name or "localhost"
    p, _, q = path.partition("?")
    loop = asyncio.get_running_loop()
    ctx = RequestContext(f"filter-call:{name}", None, 0.0)
    ctx.deadline = ctx.attempt_deadline = loop.time() + timeout
    req = Request(method.upper(), p, q, h, body, ctx)
    resp = await client.send(req)
    try:
        data = await resp.read_body(max_response_bytes)
    except BaseException:
        resp.discard()
        raise
    return CallResult(resp.status, resp.headers, data)


# ---- user filters -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FilterSetup(Generic[PerRouteT, StateT]):
    """What a user filter is built with, once per route per config version."""

    name: str                     # the instance name in config (metric label, logger name)
    per_route: PerRouteT | None   # this route's override (``parse_per_route``), or None
    state: StateT                 # ``new_state``'s object: made once, kept across reloads
    env: FilterEnv
    route: RouteInfo              # the route this instance serves
    log: logging.Logger

    @property
    def metrics(self) -> MetricFactory:
        return self.env.metrics

    def upstream(self, cluster: str) -> UpstreamClient:
        """A client for ``cluster`` (use with ``http_call``); ``ConfigError`` when no such
        cluster is configured, which refuses the config."""
        try:
            return self.env.upstream(cluster)
        except KeyError:
            raise ConfigError(self.name, f"no cluster named {cluster!r}") from None

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterFamily:
        return counter(self.env.metrics, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeFamily:
        return gauge(self.env.metrics, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] | None = None) -> HistogramFamily:
        return histogram(self.env.metrics, name, doc, labels, buckets)


class UserFilter(Filter, Generic[ConfigT, PerRouteT, StateT]):
    """Base class of a filter named by config (``module`` + ``class``).

    Declare the config as a dataclass in ``config_type`` (parsed with ``from_mapping``: unknown
    keys and bad values are refused with their path) or override ``parse_config``; the same for
    per-route overrides with ``per_route_type`` / ``parse_per_route``. ``new_state`` makes an
    object kept across config reloads (counters, caches), once per filter name. Override
    ``__call__``; keep ``__init__`` cheap (it runs once per route on every config change).
    """

    config_type: ClassVar[type | None] = None
    per_route_type: ClassVar[type | None] = None

    def __init__(self, config: ConfigT, setup: FilterSetup[PerRouteT, StateT]) -> None:
        self.config = config
        self.setup = setup

    @classmethod
    def parse_config(cls, raw: object, path: str) -> Any:
        """The filter's config from its raw mapping (``None`` when the config gave none)."""
        if cls.config_type is None:
            if raw not in (None, {}):
                raise ConfigError(path, f"{cls.__name__} takes no config")
            return None
        return from_mapping(cls.config_type, raw, path)

    @classmethod
    def parse_per_route(cls, raw: object, path: str) -> Any:
        if cls.per_route_type is None:
            raise ConfigError(path, f"{cls.__name__} has no per-route config")
        return from_mapping(cls.per_route_type, raw, path)

    @classmethod
    def new_state(cls, env: FilterEnv) -> Any:
        return None

    async def __call__(self, req: Request, next: Handler) -> Response:
        return await next(req)
