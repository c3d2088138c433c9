"""Cluster manager: endpoint state across updates, DNS clusters, LB policies."""

import asyncio
import collections

import aiohttp

from sidecar.cluster.balancers.least_request import LeastRequest
from sidecar.cluster.balancers.random_pick import Random
from sidecar.cluster.balancers.round_robin import RoundRobin
from sidecar.cluster.endpoint import EndpointState
from sidecar.cluster.manager import ClusterManager
from sidecar.config.cluster import Cluster, Endpoint, LbConfig
from sidecar.core.context import RequestContext
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.shared.local import LocalState
from sidecar.testing import Upstream, native_config, running_proxy
from sidecar.upstream.http1 import ConnectionPool


def hosts(weights):
    state = LocalState()
    return [EndpointState(Endpoint("127.0.0.1", 1000 + i, w), ConnectionPool("127.0.0.1", 1000 + i, 1.0),
                          state.endpoint("c", f"127.0.0.1:{1000 + i}"))
            for i, w in enumerate(weights)]


def ctx():
    return RequestContext("test", None, 0.0)


def test_weighted_round_robin_follows_weights():
    lb = RoundRobin(LbConfig())
    hs = hosts([1, 2, 5])
    lb.rebuild(hs)
    counts = collections.Counter(lb.pick(ctx()).endpoint.port for _ in range(800))
    assert counts == {1000: 100, 1001: 200, 1002: 500}


def test_round_robin_avoids_tried_hosts():
    lb = RoundRobin(LbConfig())
    hs = hosts([1, 1, 1])
    lb.rebuild(hs)
    c = ctx()
    c.tried_hosts = [hs[0], hs[1]]
    assert all(lb.pick(c, c.tried_hosts) is hs[2] for _ in range(10))


def test_random_is_roughly_uniform():
    lb = Random(LbConfig(policy="random"))
    hs = hosts([1, 1])
    lb.rebuild(hs)
    counts = collections.Counter(lb.pick(ctx()).endpoint.port for _ in range(4000))
    assert 1700 < counts[1000] < 2300


def test_least_request_prefers_idle_hosts():
    lb = LeastRequest(LbConfig(policy="least_request"))
    hs = hosts([1, 1, 1])
    for _ in range(50):
        hs[0].begin()
        hs[1].begin()
    lb.rebuild(hs)
    counts = collections.Counter(lb.pick(ctx()).endpoint.port for _ in range(3000))
    # power of two choices: the idle host wins every pair it is in (5/9 of draws)
    assert counts[1002] > 1400


def manager() -> ClusterManager:
    return ClusterManager(StatsCache(Metrics(enabled=False)))


def test_endpoint_state_survives_config_update():
    cm = manager()
    c1 = Cluster(name="a", endpoints=(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)))
    cm.apply((c1,))
    st = cm.state("a")
    v1 = cm.get("a")
    kept = st.endpoints["127.0.0.1:1"]
    kept.ejections = 3
    c2 = Cluster(name="a", endpoints=(Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 3)),
                 connect_timeout_s=2.0)
    cm.apply((c2,))
    # a new version is built aside and swapped in; what the name keeps stays
    assert cm.state("a") is st and cm.get("a") is not v1 and st.current is cm.get("a")
    assert st.endpoints["127.0.0.1:1"] is kept and kept.ejections == 3
    assert "127.0.0.1:2" not in st.endpoints and "127.0.0.1:3" in st.endpoints
    assert kept.pool.connect_timeout == 2.0
    cm.apply(())
    assert cm.get("a") is None


def test_panic_threshold_uses_all_hosts_when_too_few_are_healthy():
    cm = manager()
    cm.apply((Cluster(name="a", endpoints=tuple(Endpoint("127.0.0.1", p) for p in (1, 2, 3))),))
    st = cm.get("a")
    for h in st.hosts[:2]:
        h.hc_healthy = False
    st.rebuild()   # 1 of 3 healthy (33% < 50%): panic, all three used
    assert len(st.lb.hosts) == 3
    st.hosts[0].hc_healthy = True
    st.rebuild()   # 2 of 3 healthy: only those
    assert len(st.lb.hosts) == 2


async def test_strict_dns_cluster_resolves_names():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": {"type": "strict_dns", "dns_refresh": "0.2s",
                                              "endpoints": [f"localhost:{up.port}"]}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            await asyncio.sleep(0.5)
            st = p.app.clusters.get("svc")
            assert any(h.endpoint.host in ("127.0.0.1", "::1") and h.endpoint.hostname == "localhost"
                       for h in st.hosts)
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/")) as r:
                    assert r.status in (200, 503)   # ::1 may be refused; 127.0.0.1 answers
                    if r.status == 503:
                        async with s.get(p.url("/")) as r2:
                            assert r2.status == 200
