"""The App's side of the control-plane client's contract (``control_plane_client.sink``)."""

from __future__ import annotations

from collections.abc import Callable

from control_plane_client.sink import ReadinessCheck
from sidecar.cluster.manager import ClusterManager
from sidecar.config.cluster import Endpoint
from sidecar.config.snapshot import Snapshot
from sidecar.core.metrics import MetricFactory
from sidecar.runtime.store import ConfigStore
from sidecar.tls.secrets import SecretStore


class AppSnapshotSink:
    """Applies what the control-plane client decided to the App's parts."""

    __slots__ = ("_metrics", "_store", "_clusters", "_count_update", "_ready_checks",
                 "_ready_notes", "_secrets")

    def __init__(self, *, metrics: MetricFactory, store: ConfigStore, clusters: ClusterManager,
                 count_update: Callable[[str, bool, str], None],
                 ready_checks: list[ReadinessCheck], ready_notes: list[ReadinessCheck],
                 secrets: SecretStore) -> None:
        self._metrics = metrics
        self._secrets = secrets
        self._store = store
        self._clusters = clusters
        self._count_update = count_update
        self._ready_checks = ready_checks
        self._ready_notes = ready_notes

    @property
    def metrics(self) -> MetricFactory:
        return self._metrics

    @property
    def secrets(self) -> SecretStore:
        return self._secrets

    async def apply_snapshot(self, snapshot: Snapshot) -> None:
        await self._store.apply(snapshot)

    def cluster_endpoints(self, cluster: str) -> tuple[Endpoint, ...] | None:
        c = self._clusters.get(cluster)
        return tuple(h.endpoint for h in c.hosts) if c is not None else None

    def set_cluster_endpoints(self, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        self._clusters.set_endpoints(cluster, endpoints)

    def count_update(self, source: str, ok: bool, error: str = "") -> None:
        self._count_update(source, ok, error)

    def add_readiness(self, not_ready: ReadinessCheck, note: ReadinessCheck) -> None:
        self._ready_checks.append(not_ready)
        self._ready_notes.append(note)

    def remove_readiness(self, not_ready: ReadinessCheck, note: ReadinessCheck) -> None:
        if not_ready in self._ready_checks:
            self._ready_checks.remove(not_ready)
        if note in self._ready_notes:
            self._ready_notes.remove(note)
