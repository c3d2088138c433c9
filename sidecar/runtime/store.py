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

from sidecar.cluster.manager import ClusterManager
from sidecar.config.listener import Listener
from sidecar.config.snapshot import Snapshot
from sidecar.core.filter import FilterEnv
from sidecar.listener.http import HttpConnectionManager
from sidecar.listener.listener import ListenerRuntime
from sidecar.observability.access_log import RequestLogger, make_access_logger
from sidecar.observability.istio import IstioFamilies
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.observability.tracing import ListenerTracer
from sidecar.observability.workload import Workload
from sidecar.route.istio import IstioListener
from sidecar.route.observe import RouteObserver
from sidecar.route.shadow import ShadowState
from sidecar.route.stack import FilterCatalog, FilterStates, StackEnv, build_route_stack
from sidecar.route.table import RouteTable
from sidecar.tls.secrets import SecretStore

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

    def compile_listener(self, lc: Listener, bound_port: int) -> HttpConnectionManager:
        """Routes and stacks of one listener, built aside (nothing is bound or swapped)."""
        access_logs: tuple[RequestLogger, ...] = tuple(
            make_access_logger(c, lc.name) for c in lc.access_log)
        istio = None
        if lc.istio_metrics is not None and self.metrics.enabled:
            if self._istio is None:
                self._istio = IstioFamilies(self.metrics)
            istio = IstioListener(self._istio, self.workload, lc, self.clusters)
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

    async def apply(self, snap: Snapshot, *, bind: bool = True) -> None:
        """Swap to ``snap``. Raises (and changes nothing) if a new listener cannot bind."""
        new_names = {lc.name for lc in snap.listeners}
        started: list[ListenerRuntime] = []
        swaps: list[tuple[ListenerRuntime, Listener, HttpConnectionManager]] = []
        for cb in self.before_apply:
            cb(snap)
        self.clusters.apply(snap.clusters)
        try:
            for lc in snap.listeners:
                lr = self.listeners.get(lc.name)
                if lr is not None and (lr.config.host, lr.config.port, lr.config.tls) != \
                        (lc.host, lc.port, lc.tls):
                    lr = None   # address or TLS changed: a new socket; the old one drains below
                if lr is None:
                    lr = ListenerRuntime(lc, self.metrics, self.secrets)
                    lr.swap(lc, self.compile_listener(lc, lc.port))
                    if bind:
                        await lr.start(reuse_port=self.reuse_port)
                        lr.port_bound()
                    started.append(lr)
                else:
                    swaps.append((lr, lc, self.compile_listener(lc, lr.bound_port)))
        except Exception:
            for lr in started:
                lr.close()
            raise
        loop = asyncio.get_running_loop()
        for lr, lc, hcm in swaps:
            old = lr.swap(lc, hcm)
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
