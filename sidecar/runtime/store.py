"""The config store: apply a validated Snapshot without dropping a request.

Build everything aside (cluster reconciliation, compiled routes, per-route chains), then swap one
reference per listener. Requests in flight keep the ListenerSnapshot they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from sidecar.route.stack import build_route_chain
from sidecar.config.model import Listener, Snapshot
from sidecar.observability.observe import ListenerSnapshot
from sidecar.route.table import RouteTable
from sidecar.codec.http1 import ListenerRuntime

log = logging.getLogger("sidecar.store")

RETIRE_AFTER_S = 60.0   # old chains are closed once requests started on them are surely done


class ConfigStore:
    def __init__(self, app):
        self.app = app
        self.snapshot: Optional[Snapshot] = None
        self.listeners: dict[str, ListenerRuntime] = {}
        self.applied_at = 0.0
        self.history: list[tuple[str, float]] = []

    def compile_listener(self, lc: Listener, lr: ListenerRuntime) -> ListenerSnapshot:
        app = self.app
        built: list = []
        table = None
        if lc.route_config is not None:
            table = RouteTable(lc.route_config, lc.strip_host_port, lr.bound_port or lc.port)
            for route in table.all_routes():
                route.handler = build_route_chain(route, lc, app.runtime, app.clusters, built)
        return ListenerSnapshot(lc, table, app.stats, lr.observe,
                                tracer=app.make_tracer(lc), access_logs=app.make_access_logs(lc),
                                filters=built)

    async def apply(self, snap: Snapshot, *, bind: bool = True) -> None:
        """Swap to ``snap``. Raises (and changes nothing) if a new listener cannot bind."""
        app = self.app
        app.clusters.apply(snap.clusters)
        new_names = {l.name for l in snap.listeners}
        started: list[ListenerRuntime] = []
        swaps: list[tuple[ListenerRuntime, ListenerSnapshot]] = []
        try:
            for lc in snap.listeners:
                lr = self.listeners.get(lc.name)
                if lr is not None and (lr.config.host, lr.config.port, lr.config.tls) != (lc.host, lc.port, lc.tls):
                    # address or TLS changed: a new socket; the old one drains below
                    lr = None
                if lr is None:
                    lr = ListenerRuntime(lc, app)
                    lr.snapshot = self.compile_listener(lc, lr)
                    if bind:
                        await lr.start(reuse_port=app.reuse_port)
                    started.append(lr)
                else:
                    swaps.append((lr, self.compile_listener(lc, lr)))
        except Exception:
            for lr in started:
                lr.close()
            raise
        loop = asyncio.get_running_loop()
        for lr, ls in swaps:
            old = lr.snapshot
            lr.update_config(ls.config)
            lr.snapshot = ls
            if old is not None:
                loop.call_later(RETIRE_AFTER_S, old.retire)
        for lr in started:
            old_lr = self.listeners.get(lr.name)
            if old_lr is not None:
                loop.create_task(old_lr.drain(old_lr.config.drain_timeout_s))
            self.listeners[lr.name] = lr
        for name in list(self.listeners):
            if name not in new_names:
                lr = self.listeners.pop(name)
                loop.create_task(lr.drain(lr.config.drain_timeout_s))
        self.snapshot = snap
        self.applied_at = time.time()
        self.history.append((snap.version, self.applied_at))
        del self.history[:-20]
        app.on_snapshot_applied(snap)
