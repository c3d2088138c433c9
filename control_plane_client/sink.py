"""What the control-plane client needs of the process it configures.

The client sits below the runtime (it may not import ``sidecar.runtime``), so the runtime hands
it this small interface: ``sidecar.runtime.control_plane_sink.AppSnapshotSink`` implements it
over the App.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sidecar.config.cluster import Endpoint
from sidecar.config.snapshot import Snapshot
from sidecar.core.metrics import MetricFactory
from sidecar.tls.secrets import SecretStore

ReadinessCheck = Callable[[], str | None]
"""-> why the process is not ready (or, for a note, what a ready answer should say), or None."""


class SnapshotSink(Protocol):
    @property
    def metrics(self) -> MetricFactory:
        """Where the client's metric families are created."""
        ...

    @property
    def secrets(self) -> SecretStore:
        """Where secrets from SDS go (the TLS contexts read them by name)."""
        ...

    async def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Build ``snapshot`` aside and swap it in; ConfigError(s) or OSError (a listener that
        cannot bind) when it is refused, and then the running config is unchanged."""
        ...

    def cluster_endpoints(self, cluster: str) -> tuple[Endpoint, ...] | None:
        """The endpoints a serving cluster uses now; None when there is no such cluster."""
        ...

    def set_cluster_endpoints(self, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        """New endpoints for a serving cluster, in place (the state of kept endpoints stays)."""
        ...

    def count_update(self, source: str, ok: bool, error: str = "") -> None:
        """Count a config update (``source`` is ``xds_<type>``) and its outcome."""
        ...

    def add_readiness(self, not_ready: ReadinessCheck, note: ReadinessCheck) -> None:
        """Consult ``not_ready`` for ``/ready`` from now on; ``note`` is shown by a ready answer."""
        ...

    def remove_readiness(self, not_ready: ReadinessCheck, note: ReadinessCheck) -> None:
        ...
