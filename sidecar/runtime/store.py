"""The config store: apply a validated Snapshot without dropping a request.

Build everything aside (cluster versions, compiled routes, each route's stack), then swap one
reference per listener (and per cluster). Requests in flight finish on what they started with;
old stacks are retired a minute later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.cluster.manager import ClusterManager
from sidecar.config.kafka import KafkaBrokerConfig
from sidecar.config.listener import FilterChain, Listener
from sidecar.config.snapshot import Snapshot
from sidecar.config.tls import DownstreamTls
from sidecar.core.filter import FilterEnv
from sidecar.l4.tcp_proxy import TcpProxyFilter
from sidecar.listener.http import HttpConnectionManager
from sidecar.listener.listener import ListenerRuntime, socket_key
from sidecar.listener.network import ChainRuntime, HttpChain, ListenerChains
from sidecar.observability.access_log import ConnectionLogger, RequestLogger, make_access_logger
from sidecar.observability.istio import IstioFamilies, TcpReporter
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.observability.tracing import ListenerTracer
from sidecar.observability.workload import Workload
from sidecar.route.istio import IstioListener
from sidecar.route.observe import RouteObserver
from sidecar.route.shadow import ShadowState
from sidecar.route.stack import FilterCatalog, FilterStates, StackEnv, build_route_stack
from sidecar.route.table import RouteTable
from sidecar.tls.context import ReloadingContext, server_context
from sidecar.tls.secrets import SecretStore

if TYPE_CHECKING:
    from sidecar.l4.kafka_broker import KafkaBrokerFilter

log = logging.getLogger("sidecar.store")

RETIRE_AFTER_S = 60.0   # old stacks are closed once requests started on them are surely done

TracerFactory = Callable[[Listener], ListenerTracer | None]


class ConfigStore:
    def __init__(self, metrics: Metrics, stats: StatsCache, clusters: ClusterManager,
                 filters: FilterCatalog, filter_env: FilterEnv, shadow: ShadowState,
                 tracer_for: TracerFactory, reuse_port: bool = False,
                 workload: Workload | None = None, secrets: SecretStore | None = None):
        self.metrics = metrics
        self.stats = stats
        self.clusters = clusters
        self.filters = filters
        self.filter_env = filter_env
        self.filter_states = FilterStates(filter_env)
        self.shadow = shadow
        self.tracer_for = tracer_for
        self.reuse_port = reuse_port
        self.snapshot: Snapshot | None = None
        self.listeners: dict[str, ListenerRuntime] = {}
        self.applied_at = 0.0
        self.history: list[tuple[str, float]] = []
        self.on_applied: list[Callable[[Snapshot], None]] = []
        self.before_apply: list[Callable[[Snapshot], None]] = []   # before anything is built
        self.workload = workload or Workload()   # this pod, for Istio metrics' labels
        self.secrets = secrets                     # SDS certificates for TLS listeners
        self._istio: IstioFamilies | None = None   # made when a listener first asks for them
        # kept across snapshots while their config stays: TLS contexts (they watch their
        # files) and Kafka filters (they learn topic ids)
        self._server_tls: dict[DownstreamTls, ReloadingContext] = {}
        self._kafka: dict[tuple[str, str], tuple[KafkaBrokerConfig, KafkaBrokerFilter]] = {}

    def compile_listener(self, lc: Listener, bound_port: int) -> HttpConnectionManager:
        """Routes and stacks of one listener, built aside (nothing is bound or swapped)."""
        access_logs: tuple[RequestLogger, ...] = tuple(
            make_access_logger(c, lc.name) for c in lc.access_log)
        istio = None
        if lc.istio_metrics is not None and self.metrics.enabled:
            istio = IstioListener(self._istio_families(), self.workload, lc, self.clusters)
        env = StackEnv(self.clusters, self.stats, self.filters, self.filter_env,
                       self.filter_states, self.shadow, self.tracer_for(lc), access_logs, istio)
        table = None
        if lc.route_config is not None:
            table = RouteTable(lc.route_config, lc.strip_host_port, bound_port or lc.port)
            for route in table.all_routes():
                route.handler = build_route_stack(route, lc, env)
        stats = self.stats
        unmatched = RouteObserver(lambda: stats.unmatched(lc.name), access_logs,
                                  no_route=stats.no_route(lc.name),
                                  also=(istio,) if istio is not None else ())
        return HttpConnectionManager(lc, table, unmatched, env.tracer, env.built, bound_port,
                                     access_logs)

    def _istio_families(self) -> IstioFamilies:
        if self._istio is None:
            self._istio = IstioFamilies(self.metrics)
        return self._istio

    def compile_chains(self, lc: Listener, lr: ListenerRuntime,
                       bound_port: int) -> ListenerChains:
        """The filter chains of an L4 listener, built aside."""
        listener_logs = tuple(ConnectionLogger(c) for c in lc.connection_log)
        tls_used: dict[DownstreamTls, ReloadingContext] = {}

        def build(i: int, chain: FilterChain) -> ChainRuntime:
            ssl_ctx = None
            if chain.tls is not None:
                ssl_ctx = self._server_tls.get(chain.tls) or server_context(chain.tls, self.secrets)
                tls_used[chain.tls] = ssl_ctx
            rt = ChainRuntime(name=chain.name, match=chain.match, ssl=ssl_ctx)
            if chain.http is not None:
                rt.http = HttpChain(lr, chain.http, self.compile_listener(chain.http, bound_port))
                return rt
            tcp = chain.tcp
            assert tcp is not None
            kafka = None
            if tcp.kafka is not None:
                key = (lc.name, chain.name or str(i))
                old = self._kafka.get(key)
                if old is not None and old[0] == tcp.kafka:
                    kafka = old[1]
                else:
                    # Lazy: kafka_broker loads kio (+ hypothesis), ~11 MB, only for configs using it.
                    from sidecar.l4.kafka_broker import KafkaBrokerFilter
                    kafka = KafkaBrokerFilter(tcp.kafka, self.metrics)
                    self._kafka[key] = (tcp.kafka, kafka)
            istio = None
            if tcp.istio_metrics is not None and self.metrics.enabled:
                istio = TcpReporter(self._istio_families(), self.workload,
                                    lc.direction == "inbound", tcp.istio_metrics)
            rt.tcp = TcpProxyFilter(
                tcp, [self.clusters.state(n) for n in tcp.cluster_names],
                self.stats.tcp(tcp.stat_prefix), kafka,
                tuple(ConnectionLogger(c) for c in tcp.access_log), listener_logs,
                lc.buffer_limit_bytes, istio)
            return rt

        chains = [build(i, c) for i, c in enumerate(lc.filter_chains)]
        default = build(-1, lc.default_filter_chain) \
            if lc.default_filter_chain is not None else None
        self._server_tls.update(tls_used)
        return ListenerChains(chains, default, listener_logs)

    def validate_listener(self, lc: Listener) -> None:
        """Build what ``apply`` would for ``lc``, binding nothing (``sidecar validate``)."""
        if lc.l4:
            self.compile_chains(lc, ListenerRuntime(lc, self.metrics, self.secrets), lc.port)
        else:
            self.compile_listener(lc, lc.port)

    def _install(self, lr: ListenerRuntime, lc: Listener, bound_port: int) -> None:
        """Give a new listener runtime its routes or chains."""
        if lc.l4:
            lr.swap_chains(lc, self.compile_chains(lc, lr, bound_port))
        else:
            lr.swap(lc, self.compile_listener(lc, bound_port))

    async def apply(self, snap: Snapshot, *, bind: bool = True) -> None:
        """Swap to ``snap``. Raises (and changes nothing) if a new listener cannot bind."""
        new_names = {lc.name for lc in snap.listeners}
        started: list[ListenerRuntime] = []
        swaps: list[tuple[ListenerRuntime, Listener,
                          HttpConnectionManager | ListenerChains]] = []
        for cb in self.before_apply:
            cb(snap)
        self.clusters.apply(snap.clusters)
        try:
            for lc in snap.listeners:
                lr = self.listeners.get(lc.name)
                if lr is not None and socket_key(lr.config) != socket_key(lc):
                    lr = None   # address or TLS changed: a new socket; the old one drains below
                if lr is None:
                    lr = ListenerRuntime(lc, self.metrics, self.secrets,
                                         self.stats.listener_l4(lc.name))
                    self._install(lr, lc, lc.port)
                    if bind:
                        await lr.start(reuse_port=self.reuse_port)
                        lr.port_bound()
                    started.append(lr)
                elif lc.l4:
                    swaps.append((lr, lc, self.compile_chains(lc, lr, lr.bound_port)))
                else:
                    swaps.append((lr, lc, self.compile_listener(lc, lr.bound_port)))
        except Exception:
            for lr in started:
                lr.close()
            raise
        loop = asyncio.get_running_loop()
        for lr, lc, built in swaps:
            old: HttpConnectionManager | ListenerChains | None
            if isinstance(built, ListenerChains):
                old = lr.swap_chains(lc, built)
            else:
                old = lr.swap(lc, built)
            if old is not None:
                loop.call_later(RETIRE_AFTER_S, old.retire)
        for lr in started:
            old_lr = self.listeners.get(lr.name)
            if old_lr is not None:
                loop.create_task(old_lr.drain(old_lr.config.drain_timeout_s))
            self.listeners[lr.name] = lr
        for name in list(self.listeners):
            if name not in new_names:
                gone = self.listeners.pop(name)
                loop.create_task(gone.drain(gone.config.drain_timeout_s))
        self.snapshot = snap
        self.applied_at = time.time()
        self.history.append((snap.version, self.applied_at))
        del self.history[:-20]
        for cb in self.on_applied:
            cb(snap)

    def close(self) -> None:
        for lr in self.listeners.values():
            lr.close()
        self.filter_states.close(self.filters)
        self.shadow.cancel_all()
