"""Each route's stack, built once per config snapshot by ``build_route_stack``.

Reading the function tells the whole order a request goes through, outermost first::

    observe          server span, gRPC-shaped local replies, metrics + access log at the end
    peer exchange    Istio metadata exchange (only with istio_metrics)
    filters          the listener's HTTP filters in config order (jwt_authn, rbac, ...)
    route action     header mutations, rewrites, hash policy, the cluster choice
      -- then, for the chosen cluster --
    timeout          the route deadline for every attempt
    shadow           fire-and-forget copies through the shadow clusters' own send
    retry            retry_on, per-try timeout, backoff, the cluster's retry budget
    Cluster.send     admission (breakers) -> pick endpoint -> pooled send -> record outcome

Every layer is ``async (request) -> response`` with its ``next`` bound here, at build time;
layers that have nothing to do on a route (no retry policy, no mirrors) are left out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import FunctionType, MethodType
from typing import Protocol, TypeVar, cast

from sidecar.cluster.cluster import ClusterState
from sidecar.cluster.manager import ClusterManager
from sidecar.config.listener import Listener
from sidecar.config.route import DirectResponse, HeaderMutation, Redirect, RouteAction
from sidecar.core.errors import NoCluster
from sidecar.core.filter import FilterEnv, FilterLike, FilterSpec, Handler
from sidecar.core.message import Request, Response
from sidecar.observability.access_log import RequestLogger
from sidecar.observability.stats import StatsCache
from sidecar.observability.tracing import ListenerTracer
from sidecar.route.action import RouteActionLayer, merged_mutations
from sidecar.route.istio import IstioListener, PeerExchangeLayer
from sidecar.route.local import DirectResponder, Redirector
from sidecar.route.observe import ObserveLayer, RouteObserver
from sidecar.route.retry import RetryLayer
from sidecar.route.shadow import ShadowLayer, ShadowState
from sidecar.route.table import CompiledRoute
from sidecar.route.timeout import TimeoutLayer

S = TypeVar("S")


class FilterCatalog(Protocol):
    def lookup(self, name: str) -> FilterSpec[object, object, object] | None: ...


class FilterStates:
    """Each filter's state (made once per process by its spec, kept across reloads)."""

    def __init__(self, env: FilterEnv):
        self._env = env
        self._states: dict[str, object] = {}

    def state_for(self, spec: FilterSpec[object, object, S]) -> S:
        if spec.name not in self._states:
            self._states[spec.name] = spec.new_state(self._env)
        return cast(S, self._states[spec.name])

    def close(self, catalog: FilterCatalog) -> None:
        for name, state in self._states.items():
            spec = catalog.lookup(name)
            if spec is not None and spec.close_state is not None:
                spec.close_state(state)


class StackEnv:
    """What stacks are built from: process-wide services and one listener's observers."""

    __slots__ = ("clusters", "stats", "filters", "filter_env", "filter_states", "shadow",
                 "tracer", "access_logs", "built", "istio")

    def __init__(self, clusters: ClusterManager, stats: StatsCache, filters: FilterCatalog,
                 filter_env: FilterEnv, filter_states: FilterStates, shadow: ShadowState,
                 tracer: ListenerTracer | None, access_logs: tuple[RequestLogger, ...],
                 istio: IstioListener | None = None):
        self.clusters = clusters
        self.stats = stats
        self.filters = filters
        self.filter_env = filter_env
        self.filter_states = filter_states
        self.shadow = shadow
        self.tracer = tracer
        self.access_logs = access_logs
        self.built: list[FilterLike] = []     # closed when the snapshot is retired
        self.istio = istio                    # the listener's Istio metrics, when on


class BoundFilter:
    """A filter with its ``next`` bound at build time (no extra coroutine per request)."""

    __slots__ = ("filter", "next")

    def __init__(self, f: FilterLike, next: Handler):
        self.filter = f
        self.next = next

    def __call__(self, req: Request) -> Awaitable[Response]:
        return self.filter(req, self.next)


Layer = Callable[[Handler], Handler]


def compose(layers: list[Layer | None], innermost: Handler) -> Handler:
    """``layers`` outermost first; ``None`` entries (nothing to do on this route) are skipped.
    Each layer gets its next as a bound ``__call__``: calling a bound method is a fast call,
    calling an object with ``__call__`` goes through the type's slot (slower, every request)."""
    handler = _bound(innermost)
    for layer in reversed(layers):
        if layer is not None:
            handler = _bound(layer(handler))
    return handler


def _bound(handler: Handler) -> Handler:
    """A layer object's bound ``__call__``; functions and methods as they are."""
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - a __call__ written in Python?
    if isinstance(call, FunctionType):
        bound: Handler = MethodType(call, handler)
        return bound
    return handler


def build_route_stack(route: CompiledRoute, listener: Listener, env: StackEnv) -> Handler:
    cfg = route.config
    vh = route.vhost.config
    rc = listener.route_config
    mutation = merged_mutations(cfg.headers, vh.headers, rc.headers if rc else HeaderMutation())
    action = cfg.action
    if isinstance(action, DirectResponse):
        core: Handler = DirectResponder(action, mutation)
    elif isinstance(action, Redirect):
        core = Redirector(action, mutation, cfg.match.prefix)
    else:
        match_len = len(cfg.match.prefix or cfg.match.path or "")
        core = RouteActionLayer(action, match_len, mutation,
                                lambda cluster: upstream_stack(route, action, cluster, env,
                                                               listener.suppress_envoy_headers),
                                env.clusters.configured, listener.suppress_envoy_headers)
        route.choice = core.choice
    istio = env.istio
    observer = RouteObserver(
        lambda: env.stats.route(listener.name, route.vhost.name, route.stat_name),
        env.access_logs, also=(istio,) if istio is not None else ())
    return compose([
        lambda nxt: ObserveLayer(route, nxt, env.tracer, observer),
        (lambda nxt: PeerExchangeLayer(istio, route, nxt))
        if istio is not None and istio.headers is not None else None,
        *route_filters(route, listener, env),
    ], core)


def upstream_stack(route: CompiledRoute, action: RouteAction, cluster: str,
                   env: StackEnv, suppress_envoy_headers: bool = False) -> Handler:
    """The part of a route's stack after the cluster choice, for one cluster."""
    state = env.clusters.state(cluster)
    stats = env.stats.cluster(cluster)
    vh = route.vhost.config
    policy = action.retry_policy or vh.retry_policy
    mirrors = tuple((m, env.clusters.state(m.cluster)) for m in action.mirrors)
    return compose([
        lambda nxt: TimeoutLayer(action, nxt, set_expected_header=action.retry_policy is None
                                 and not suppress_envoy_headers),
        (lambda nxt: ShadowLayer(mirrors, nxt, env.shadow)) if mirrors else None,
        (lambda nxt: RetryLayer(policy, nxt, state, stats, vh.include_attempt_count,
                                expected_header=not suppress_envoy_headers))
        if policy is not None else None,
    ], ClusterSend(state, action.auto_host_rewrite))


class ClusterSend:
    """The innermost handler: the chosen cluster's current version's ``send``. Not a coroutine
    itself (it returns ``Cluster.send``'s), so it costs no extra frame per request."""

    __slots__ = ("state", "auto_host")

    def __init__(self, state: ClusterState, auto_host: bool):
        self.state = state
        self.auto_host = auto_host

    def __call__(self, req: Request) -> Awaitable[Response]:
        c = self.state.current
        if c is None:
            raise NoCluster(self.state.name)
        return c.send(req, self.auto_host)


def route_filters(route: CompiledRoute, listener: Listener, env: StackEnv) -> list[Layer | None]:
    """The listener's HTTP filters for this route, in config order (per-route overrides and
    disabled filters applied; a filter whose build says it has nothing to do is left out)."""
    vhost_per = dict(route.vhost.config.per_filter)
    route_per = dict(route.config.per_filter)
    out: list[Layer | None] = []
    for hf in listener.http_filters:
        spec = env.filters.lookup(hf.spec_name)
        if spec is None:
            continue                      # refused at parse time; cannot happen here
        name = hf.name
        override_present = name in route_per or name in vhost_per
        override = route_per[name] if name in route_per else vhost_per.get(name)
        outer = vhost_per.get(name)
        if (spec.merge_per_route is not None and name in route_per and override is not None
                and outer is not None):
            override = spec.merge_per_route(outer, override)
        if override_present and override is None:
            continue                      # disabled on this route
        if hf.disabled and not override_present:
            continue
        f = spec.build(hf.config, override, env.filter_states.state_for(spec), env.filter_env,
                       route)
        if f is None:
            continue
        env.built.append(f)
        out.append(lambda nxt, f=f: BoundFilter(f, nxt))  # type: ignore[misc]
    return out
