"""Cluster manager: every cluster's endpoints, pools, LB and health, across config updates.

Endpoint state (pool, EWMA, ejections, counters) is keyed by (cluster, address) and survives a
config update that keeps the address; removed clusters drain their pools, then close.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from typing import Callable, Optional

from sidecar.cluster.balancers.base import LoadBalancer, make_balancer
from sidecar.config.model import Cluster, Endpoint
from sidecar.upstream.http1 import ConnectionPool

log = logging.getLogger("sidecar.cluster")


class EndpointState:
    """One upstream host of one cluster."""

    __slots__ = ("endpoint", "address", "pool", "active_requests", "hc_healthy", "ejected_until",
                 "ejections", "rq_total", "rq_error", "rq_timeout", "cx_connect_fail",
                 "consecutive_5xx", "consecutive_gateway", "consecutive_local", "sr_success",
                 "sr_total", "ewma", "ewma_stamp", "last_hc", "removed", "__weakref__")

    def __init__(self, endpoint: Endpoint, pool: ConnectionPool, default_rtt: float = 0.030):
        self.endpoint = endpoint
        self.address = endpoint.address
        self.pool = pool
        self.active_requests = 0
        self.hc_healthy = True           # active health checking verdict
        self.ejected_until = 0.0         # outlier detection (monotonic time)
        self.ejections = 0
        self.rq_total = 0
        self.rq_error = 0
        self.rq_timeout = 0
        self.cx_connect_fail = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.sr_success = 0
        self.sr_total = 0
        self.ewma = default_rtt          # peak-EWMA latency estimate, seconds
        self.ewma_stamp = time.monotonic()
        self.last_hc = ""
        self.removed = False

    @property
    def ejected(self) -> bool:
        return self.ejected_until > time.monotonic()

    @property
    def available(self) -> bool:
        return self.hc_healthy and not self.ejected and not self.removed


def make_ssl_context(tls) -> Optional[ssl.SSLContext]:
    if tls is None:
        return None
    from sidecar.tls.context import client_context
    return client_context(tls)


class ClusterState:
    """Runtime of one cluster: endpoints, LB, breaker counters, and its hooks."""

    def __init__(self, config: Cluster, manager: "ClusterManager"):
        self.name = config.name
        self.manager = manager
        self.config = config
        self.endpoints: dict[str, EndpointState] = {}
        self.hosts: list[EndpointState] = []
        self.lb: LoadBalancer = make_balancer(config.lb)
        self.active_requests = 0
        self.pending_requests = 0
        self.active_retries = 0
        self.overflow = 0
        self.ssl_context = make_ssl_context(config.tls)
        self.outcome_hooks: list[Callable] = []   # called (host, status_or_None, latency, local_error)
        self.warm = config.type != "eds" or bool(config.endpoints)
        self.set_endpoints(config.endpoints)

    # ---- config ------------------------------------------------------------------------
    def update(self, config: Cluster) -> None:
        lb_changed = config.lb != self.config.lb
        tls_changed = config.tls != self.config.tls
        self.config = config
        if tls_changed:
            self.ssl_context = make_ssl_context(config.tls)
            for h in self.hosts:       # new TLS settings need new connections
                h.pool.close_all()
                h.pool.ssl = self.ssl_context
        if lb_changed:
            self.lb = make_balancer(config.lb)
        if config.type == "static" or (config.type == "eds" and config.endpoints):
            self.set_endpoints(config.endpoints)
        else:
            # DNS clusters keep their resolved addresses until the next resolution;
            # EDS clusters keep their endpoints until the next ClusterLoadAssignment
            self.rebuild()
        for h in self.hosts:
            p = h.pool
            p.connect_timeout = config.connect_timeout_s
            p.max_idle = config.max_idle_connections
            p.idle_timeout = config.idle_timeout_s

    def set_endpoints(self, endpoints) -> None:
        """Replace the endpoint set, keeping state for addresses that stay."""
        cfg = self.config
        new: dict[str, EndpointState] = {}
        for ep in endpoints:
            st = self.endpoints.get(ep.address)
            if st is None:
                pool = ConnectionPool(ep.host, ep.port, cfg.connect_timeout_s,
                                      cfg.max_idle_connections, cfg.idle_timeout_s,
                                      cfg.per_connection_buffer_limit, self.ssl_context,
                                      cfg.tls.sni if cfg.tls else "")
                st = EndpointState(ep, pool, cfg.lb.ewma_default_rtt_s)
            elif st.endpoint != ep:
                st.endpoint = ep   # weight changed
            new[ep.address] = st
        for addr, st in self.endpoints.items():
            if addr not in new:
                st.removed = True
                st.pool.close_all()
        self.endpoints = new
        self.hosts = list(new.values())
        if endpoints or self.config.type != "eds":
            self.warm = True
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute the LB's eligible set (after health/ejection/endpoint changes)."""
        hosts = self.hosts
        avail = [h for h in hosts if h.available]
        if hosts and len(avail) * 100.0 < len(hosts) * self.config.lb.panic_threshold:
            # panic: too few healthy hosts, so spread over all of them (Envoy's behaviour)
            avail = list(hosts)
        self.lb.rebuild(avail)

    def open_connections(self) -> int:
        return sum(h.pool.active + h.pool.connecting for h in self.hosts)

    def pick(self, ctx) -> Optional[EndpointState]:
        h = self.lb.pick(ctx, ctx.tried_hosts)
        if h is not None and h.ejected_until and not h.available:
            # an ejection expired or started since the last rebuild
            self.rebuild()
            h = self.lb.pick(ctx, ctx.tried_hosts)
        return h

    def record(self, host: EndpointState, status: Optional[int], latency: float,
               local_error: Optional[str]) -> None:
        """Outcome of one attempt: feeds outlier detection, EWMA, counters."""
        host.rq_total += 1
        if local_error is not None or (status is not None and status >= 500):
            host.rq_error += 1
        self.lb.record(host, status, latency, local_error)
        for hook in self.outcome_hooks:
            hook(host, status, latency, local_error)

    def close(self) -> None:
        for h in self.hosts:
            h.pool.close_all()


class ClusterManager:
    def __init__(self, metrics=None):
        self.clusters: dict[str, ClusterState] = {}
        self.metrics = metrics
        self._tasks: dict[str, asyncio.Task] = {}
        self._sweeper: Optional[asyncio.Task] = None
        # extension points: called with the ClusterState when it is created/updated/removed
        self.on_cluster_added: list[Callable] = []
        self.on_cluster_removed: list[Callable] = []

    def get(self, name: str) -> Optional[ClusterState]:
        return self.clusters.get(name)

    def subscribe(self, on_added: Callable, on_removed: Callable) -> None:
        """``on_added(cs)`` now for every cluster and later on each create/update;
        ``on_removed(cs)`` when a cluster goes (health checking, outlier detection use it)."""
        self.on_cluster_added.append(on_added)
        self.on_cluster_removed.append(on_removed)
        for cs in list(self.clusters.values()):
            on_added(cs)

    def unsubscribe(self, on_added: Callable, on_removed: Callable) -> None:
        for lst, cb in ((self.on_cluster_added, on_added), (self.on_cluster_removed, on_removed)):
            if cb in lst:
                lst.remove(cb)

    def apply(self, clusters: tuple[Cluster, ...]) -> None:
        seen = set()
        for c in clusters:
            seen.add(c.name)
            st = self.clusters.get(c.name)
            if st is None:
                st = ClusterState(c, self)
                self.clusters[c.name] = st
                for cb in self.on_cluster_added:
                    cb(st)
            elif st.config != c:
                st.update(c)
                for cb in self.on_cluster_added:
                    cb(st)
            self._ensure_dns(st)
        for name in list(self.clusters):
            if name not in seen:
                st = self.clusters.pop(name)
                for cb in self.on_cluster_removed:
                    cb(st)
                t = self._tasks.pop(name, None)
                if t is not None:
                    t.cancel()
                # drain: idle connections close now, busy ones close when their request ends
                st.close()

    def set_eds(self, name: str, endpoints: tuple[Endpoint, ...]) -> bool:
        st = self.clusters.get(name)
        if st is None:
            return False
        st.set_endpoints(endpoints)
        return True

    # ---- background work -----------------------------------------------------------------
    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        for st in self.clusters.values():
            self._ensure_dns(st)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for st in self.clusters.values():
                for h in st.hosts:
                    h.pool.sweep(now)

    def _ensure_dns(self, st: ClusterState) -> None:
        if st.config.type not in ("strict_dns", "logical_dns"):
            t = self._tasks.pop(st.name, None)
            if t is not None:
                t.cancel()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        t = self._tasks.get(st.name)
        if t is None or t.done():
            self._tasks[st.name] = loop.create_task(self._dns_loop(st))

    async def _dns_loop(self, st: ClusterState) -> None:
        """STRICT_DNS: every name resolves to all its addresses, re-resolved periodically."""
        loop = asyncio.get_running_loop()
        while self.clusters.get(st.name) is st:
            cfg = st.config
            resolved: list[Endpoint] = []
            ok = True
            for ep in cfg.endpoints:
                try:
                    infos = await loop.getaddrinfo(ep.host, ep.port, type=1)  # SOCK_STREAM
                except OSError as e:
                    ok = False
                    log.warning("cluster %s: DNS resolution of %s failed: %s", st.name, ep.host, e)
                    continue
                addrs = []
                for info in infos:
                    a = info[4][0]
                    if a not in addrs:
                        addrs.append(a)
                if cfg.type == "logical_dns":
                    addrs = addrs[:1]
                for a in addrs:
                    resolved.append(Endpoint(host=a, port=ep.port, weight=ep.weight, hostname=ep.host))
            if resolved or ok:
                st.set_endpoints(tuple(resolved))
            await asyncio.sleep(cfg.dns_refresh_s * (0.9 + random.random() * 0.2))

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for t in self._tasks.values():
            t.cancel()
        self._tasks.clear()
        for st in self.clusters.values():
            st.close()
