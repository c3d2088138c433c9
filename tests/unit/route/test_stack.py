"""``build_route_stack`` puts the layers in the documented order (no sockets)."""

from __future__ import annotations

from filters import CATALOG
from sidecar.cluster.manager import ClusterManager
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.route.action import RouteActionLayer
from sidecar.route.observe import ObserveLayer
from sidecar.route.retry import RetryLayer
from sidecar.route.shadow import ShadowLayer, ShadowState
from sidecar.route.stack import BoundFilter, FilterStates, StackEnv, build_route_stack
from sidecar.route.table import RouteTable
from sidecar.route.timeout import TimeoutLayer
from sidecar.runtime.filter_env import ProxyFilterEnv
from sidecar.runtime.loader import snapshot_from_doc

CONFIG = {
    "listeners": [{
        "name": "l", "port": 0,
        "filters": [{"fault": {"abort": {"status": 503, "percent": 1}}},
                    {"rbac": {"action": "DENY", "policies": {"p": {"permissions": [{"path": {"exact": "/x"}}],
                                                                    "principals": [{"any": True}]}}}}],
        "routes": [
            {"match": {"prefix": "/"}, "cluster": "svc", "timeout": "2s",
             "retry": {"retries": 1}, "mirror": [{"cluster": "shadow"}]},
            {"match": {"prefix": "/plain"}, "cluster": "svc"},
        ]}],
    "clusters": [{"name": "svc", "endpoints": ["127.0.0.1:1"]},
                 {"name": "shadow", "endpoints": ["127.0.0.1:2"]}],
}


def build():
    snap = snapshot_from_doc(CONFIG)
    metrics = Metrics(enabled=False)
    stats = StatsCache(metrics)
    clusters = ClusterManager(stats)
    clusters.apply(snap.clusters)
    env_f = ProxyFilterEnv(metrics, clusters)
    env = StackEnv(clusters, stats, CATALOG, env_f, FilterStates(env_f), ShadowState(metrics),
                   None, ())
    lc = snap.listeners[0]
    table = RouteTable(lc.route_config, lc.strip_host_port, 0)
    routes = list(table.all_routes())
    return [build_route_stack(r, lc, env) for r in routes], clusters


def chain(handler):
    """The layer objects of a stack, outermost first (each holds its next as a bound
    ``__call__``)."""
    handler = getattr(handler, "__self__", handler)
    out = [handler]
    while True:
        nxt = getattr(handler, "next", None)
        if nxt is None:
            return out
        nxt = getattr(nxt, "__self__", nxt)
        out.append(nxt)
        handler = nxt


def test_the_order_is_observe_filters_action_then_timeout_shadow_retry_send():
    (full, plain), clusters = build()
    outer = chain(full)
    assert [type(x) for x in outer] == [ObserveLayer, BoundFilter, BoundFilter, RouteActionLayer]
    assert [type(f.filter).__name__ for f in outer[1:3]] == ["FaultFilter", "RbacFilter"]
    inner = chain(outer[-1].stacks["svc"])
    assert [type(x) for x in inner[:3]] == [TimeoutLayer, ShadowLayer, RetryLayer]
    assert type(inner[-1]).__name__ == "ClusterSend"       # Cluster.send of the chosen cluster
    assert inner[2].cluster is clusters.state("svc") and inner[-1].state is clusters.state("svc")


def test_layers_with_nothing_to_do_are_left_out():
    (_, plain), _ = build()
    inner = chain(chain(plain)[-1].stacks["svc"])
    assert [type(x) for x in inner[:1]] == [TimeoutLayer] and len(inner) == 2
