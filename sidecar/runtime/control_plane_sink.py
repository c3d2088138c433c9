"""The App's side of the control-plane client's contract (``control_plane_client.sink``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane_client.sink import ReadinessCheck
from sidecar.config.cluster import Endpoint
from sidecar.config.snapshot import Snapshot
from sidecar.core.metrics import MetricFactory

if TYPE_CHECKING:   # the App imports this module
    from sidecar.runtime.app import App


class AppSnapshotSink:
    """Applies what the control-plane client decided to one App."""

    __slots__ = ("app",)

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def metrics(self) -> MetricFactory:
        return self.app.metrics

    async def apply_snapshot(self, snapshot: Snapshot) -> None:
        await self.app.store.apply(snapshot)

    def cluster_endpoints(self, cluster: str) -> tuple[Endpoint, ...] | None:
        c = self.app.clusters.get(cluster)
        return tuple(h.endpoint for h in c.hosts) if c is not None else None

    def set_cluster_endpoints(self, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        self.app.clusters.set_endpoints(cluster, endpoints)

    def count_update(self, source: str, ok: bool, error: str = "") -> None:
        self.app.count_update(source, ok, error)

    def add_readiness(self, not_ready: ReadinessCheck, note: ReadinessCheck) -> None:
        self.app.ready_checks.append(not_ready)
        self.app.ready_notes.append(note)

    def remove_readiness(self, not_ready: ReadinessCheck, note: ReadinessCheck) -> None:
        if not_ready in self.app.ready_checks:
            self.app.ready_checks.remove(not_ready)
        if note in self.app.ready_notes:
            self.app.ready_notes.remove(note)
