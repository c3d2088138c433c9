"""The cluster manager: builds cluster versions aside and swaps them in.

``apply(configs)`` builds a new ``Cluster`` for every new or changed config (keeping endpoint
state for addresses that stay), then swaps each ``ClusterState.current``; removed clusters
drain their pools. EDS assignments and DNS resolutions build a new version the same way. Route
stacks hold ``ClusterState`` references, bound once per config snapshot, so a swap needs no
rebuild of routes and a request never looks a cluster up by name.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.cluster.cluster import Cluster, ClusterState
from sidecar.config.cluster import Cluster as ClusterConfig
from sidecar.config.cluster import Endpoint
from sidecar.config.errors import ConfigError
from sidecar.config.tls import UpstreamTls
from sidecar.observability.stats import StatsCache
from sidecar.shared.api import SharedState
from sidecar.shared.host import TableFull
from sidecar.shared.local import LocalState
from sidecar.tls.context import client_context
from sidecar.tls.secrets import SecretStore

if TYPE_CHECKING:
    from sidecar.cluster.dns import DnsResolver  # aiodns/pycares: only for c-ares DNS clusters

log = logging.getLogger("sidecar.cluster")

ClusterHook = Callable[[ClusterState], None]


_FAMILY = {"V4_ONLY": socket.AF_INET, "V6_ONLY": socket.AF_INET6, "AUTO": socket.AF_UNSPEC,
           "V4_PREFERRED": socket.AF_UNSPEC, "ALL": socket.AF_UNSPEC}


def lookup_family_addresses(family: str, found: list[tuple[int, str]]) -> list[str]:
    """The addresses a DNS cluster uses, by ``dns_lookup_family`` (Envoy's semantics): AUTO
    takes the IPv6 ones if there are any, else IPv4; V4_PREFERRED the reverse; ALL both."""
    v4 = [a for fam, a in found if fam == socket.AF_INET]
    v6 = [a for fam, a in found if fam == socket.AF_INET6]
    if family == "AUTO":
        picked = v6 or v4
    elif family == "V4_PREFERRED":
        picked = v4 or v6
    elif family == "V4_ONLY":
        picked = v4
    elif family == "V6_ONLY":
        picked = v6
    else:
        picked = [a for _, a in found]
    out: list[str] = []
    for a in picked:
        if a not in out:
            out.append(a)
    return out


def make_ssl_context(tls: UpstreamTls | None, secrets: SecretStore | None = None,
                     alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext | None:
    """The TLS context of a cluster's connections of one protocol (the config's explicit ALPN
    list, else ``alpn``)."""
    return client_context(tls, secrets, tls.alpn or alpn) if tls is not None else None


def ssl_contexts(cfg: ClusterConfig, secrets: SecretStore | None
                 ) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(HTTP/1.1 context, HTTP/2 context) for the protocols the cluster speaks."""
    h1 = make_ssl_context(cfg.tls, secrets) if cfg.protocol != "http2" else None
    h2 = make_ssl_context(cfg.tls, secrets, ("h2",)) if speaks_h2(cfg) else None
    return h1, h2


def speaks_h2(cfg: ClusterConfig) -> bool:
    """The cluster opens HTTP/2 connections: its traffic, or gRPC health checks (which speak
    HTTP/2 whatever the cluster's protocol, as Envoy's)."""
    return cfg.protocol != "http1" or any(hc.grpc_service is not None for hc in cfg.health_checks)


class ClusterManager:
    def __init__(self, stats: StatsCache, secrets: SecretStore | None = None,
                 shared: SharedState | None = None):
        self.stats = stats
        self.secrets = secrets          # SDS certificates for clusters' TLS
        # breaker gauges, requests in flight and the health board: the sidecar's, across
        # workers (shared memory) or this process's alone (LocalState)
        self.shared: SharedState = shared if shared is not None else LocalState()
        self.states: dict[str, ClusterState] = {}
        self._dns_tasks: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # called with a ClusterState when a version is activated / when the cluster goes
        # (health checking and outlier detection follow the config this way)
        self._on_activated: list[ClusterHook] = []
        self._on_removed: list[ClusterHook] = []

    # ---- lookups (config time only: request paths hold ClusterState references) ---------------
    def state(self, name: str) -> ClusterState:
        """The (possibly not yet configured) state of cluster ``name``: route stacks bind it at
        build time; ``current`` is None until the cluster exists."""
        st = self.states.get(name)
        if st is None:
            try:
                st = ClusterState(name, self.stats.cluster(name), self.shared)
            except TableFull as e:
                raise ConfigError("shared_state.counter_rows", str(e)) from None
            self.states[name] = st
        return st

    def configured(self, name: str) -> bool:
        st = self.states.get(name)
        return st is not None and st.current is not None

    def get(self, name: str) -> Cluster | None:
        st = self.states.get(name)
        return st.current if st is not None else None

    def clusters(self) -> list[Cluster]:
        return [st.current for st in self.states.values() if st.current is not None]

    def subscribe(self, on_activated: ClusterHook, on_removed: ClusterHook) -> None:
        """``on_activated(state)`` now for every cluster and later on each new version;
        ``on_removed(state)`` when a cluster goes."""
        self._on_activated.append(on_activated)
        self._on_removed.append(on_removed)
        for st in list(self.states.values()):
            if st.current is not None:
                on_activated(st)

    # ---- config --------------------------------------------------------------------------------
    def apply(self, configs: tuple[ClusterConfig, ...]) -> None:
        """Build every new or changed cluster aside, then swap them all in."""
        built: list[Cluster] = []
        seen: set[str] = set()
        for cfg in configs:
            seen.add(cfg.name)
            st = self.state(cfg.name)
            old = st.current
            if old is not None and old.config == cfg:
                continue
            try:
                built.append(self._build(cfg, st, old))
            except TableFull as e:
                raise ConfigError("shared_state.counter_rows", str(e)) from None
        for c in built:
            self._activate(c)
        for name, st in list(self.states.items()):
            if name not in seen and st.current is not None:
                self._remove(st)

    def _build(self, cfg: ClusterConfig, st: ClusterState, old: Cluster | None) -> Cluster:
        if old is not None and old.config.tls == cfg.tls and \
                old.config.protocol == cfg.protocol and speaks_h2(old.config) == speaks_h2(cfg):
            ctx, ctx2 = old.ssl_context, old.ssl_context_h2
        else:
            ctx, ctx2 = ssl_contexts(cfg, self.secrets)
        if cfg.type in ("static",) or (cfg.type == "eds" and cfg.endpoints):
            return Cluster(cfg, st, cfg.endpoints, ctx, ssl_context_h2=ctx2)
        if old is not None:
            # DNS clusters keep their resolved addresses until the next resolution; EDS
            # clusters keep their endpoints until the next ClusterLoadAssignment
            return Cluster(cfg, st, tuple(h.endpoint for h in old.hosts), ctx, warm=old.warm,
                           ssl_context_h2=ctx2)
        if cfg.type == "eds":
            return Cluster(cfg, st, (), ctx, warm=False, ssl_context_h2=ctx2)
        return Cluster(cfg, st, (), ctx, ssl_context_h2=ctx2)   # DNS: resolved by its task, soon

    def _activate(self, c: Cluster) -> None:
        st = c.state
        if st.removed:                  # back after a removal: attach its counters again
            st.breakers.counters = self.shared.breaker(st.name)
        st.removed = False
        c.activate()
        for cb in self._on_activated:
            cb(st)
        self._ensure_dns(st)

    def _remove(self, st: ClusterState) -> None:
        old = st.current
        st.current = None
        st.removed = True
        for cb in self._on_removed:
            cb(st)
        t = self._dns_tasks.pop(st.name, None)
        if t is not None:
            t.cancel()
        if old is not None:
            # drain: idle connections close now, busy ones close when their request ends
            old.close()
        for h in st.endpoints.values():
            h.removed = True
        st.endpoints = {}
        self.shared.forget(st.name)

    def set_endpoints(self, name: str, endpoints: tuple[Endpoint, ...]) -> bool:
        """A new endpoint set (EDS, DNS) for a configured cluster: a new version, swapped in."""
        st = self.states.get(name)
        if st is None or st.current is None:
            return False
        old = st.current
        try:
            c = Cluster(old.config, st, endpoints, old.ssl_context, warm=True,
                        ssl_context_h2=old.ssl_context_h2)
        except TableFull as e:
            log.error("cluster %s: endpoint update refused: %s", name, e)
            return False
        self._activate(c)
        return True

    # ---- background work -----------------------------------------------------------------------
    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        for st in self.states.values():
            self._ensure_dns(st)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for c in self.clusters():
                for h in c.hosts:
                    h.pool.sweep(now)
                    if h.h2 is not None:
                        h.h2.sweep(now)
                c.open_connections()      # publish this worker's count (closes since)
                if c.original_dst:
                    c.sweep_original_dst(now)

    def _ensure_dns(self, st: ClusterState) -> None:
        c = st.current
        if c is None or c.config.type not in ("strict_dns", "logical_dns"):
            t = self._dns_tasks.pop(st.name, None)
            if t is not None:
                t.cancel()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                    # started by start(), once the loop runs
        t = self._dns_tasks.get(st.name)
        if t is None or t.done():
            self._dns_tasks[st.name] = loop.create_task(self._dns_loop(st))

    async def _dns_loop(self, st: ClusterState) -> None:
        """STRICT_DNS: every name resolves to all its addresses (LOGICAL_DNS: the first),
        re-resolved every ``dns_refresh`` (jittered), or when the records' TTL runs out
        (``respect_dns_ttl``)."""
        loop = asyncio.get_running_loop()
        resolver: DnsResolver | None = None
        while st.current is not None:
            cfg = st.current.config
            if cfg.respect_dns_ttl or cfg.dns_resolvers:
                # the system resolver reports no TTLs and cannot be pointed elsewhere: c-ares
                if resolver is None or resolver.servers != cfg.dns_resolvers:
                    # lazy: aiodns/pycares are loaded only by clusters that use c-ares
                    from sidecar.cluster.dns import DnsResolver
                    resolver = DnsResolver(cfg.dns_resolvers)
            else:
                resolver = None
            resolved: list[Endpoint] = []
            ok = True
            ttl: float | None = None
            for ep in cfg.endpoints:
                try:
                    if resolver is not None:
                        found, rec_ttl = await resolver.resolve(ep.host, cfg.dns_lookup_family)
                        ttl = rec_ttl if ttl is None else min(ttl, rec_ttl)
                    else:
                        infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM,
                                                       family=_FAMILY[cfg.dns_lookup_family])
                        found = [(info[0], str(info[4][0])) for info in infos]
                except OSError as e:
                    ok = False
                    log.warning("cluster %s: DNS resolution of %s failed: %s", st.name, ep.host, e)
                    continue
                addrs = lookup_family_addresses(cfg.dns_lookup_family, found)
                if cfg.type == "logical_dns":
                    addrs = addrs[:1]
                for a in addrs:
                    resolved.append(Endpoint(host=a, port=ep.port, weight=ep.weight,
                                             hostname=ep.host))
            current = st.current
            if current is not None and (resolved or ok) and \
                    tuple(h.endpoint for h in current.hosts) != tuple(resolved):
                self.set_endpoints(st.name, tuple(resolved))
            if cfg.respect_dns_ttl and ttl:
                await asyncio.sleep(ttl)
            else:
                await asyncio.sleep(cfg.dns_refresh_s * (0.9 + random.random() * 0.2))

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for t in self._dns_tasks.values():
            t.cancel()
        self._dns_tasks.clear()
        for st in self.states.values():
            if st.current is not None:
                st.current.close()
            if st.outlier is not None:
                st.outlier.close()
