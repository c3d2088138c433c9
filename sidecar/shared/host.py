"""Entry points: the supervisor makes a ``SharedHost`` before forking; each worker takes its
``SharedState`` from it; one process alone uses ``LocalState``.

::

    host = SharedHost.create(stores.shared_state, workers=n)     # supervisor, before fork
    ...                                                           # fork worker i
    state = host.worker(i)                                        # in worker i
    ...                                                           # worker i died
    host.reclaim(i)                                               # supervisor, then re-fork
"""

from __future__ import annotations

from sidecar.config.stores import SharedStateConfig
from sidecar.shared.api import SharedState
from sidecar.shared.buckets import ShmBuckets
from sidecar.shared.counters import ShmBreaker, ShmEndpoint
from sidecar.shared.local import LocalState
from sidecar.shared.replay import ShmReplay
from sidecar.shared.segment import H_EPOCH, SharedSegment


class TableFull(RuntimeError):
    """More clusters or endpoints than ``shared_state.counter_rows``."""


class WorkerShared:
    """``SharedState`` of one worker process over the segment. Handles are cached by name:
    asking twice for the same cluster or endpoint gives the same handle."""

    def __init__(self, seg: SharedSegment, worker: int) -> None:
        self.segment = seg
        self.worker = worker
        self._breakers: dict[str, ShmBreaker] = {}
        self._endpoints: dict[tuple[str, str], ShmEndpoint] = {}
        self._buckets = ShmBuckets(seg, worker)
        self._replay = ShmReplay(seg)

    def breaker(self, cluster: str) -> ShmBreaker:
        b = self._breakers.get(cluster)
        if b is None:
            seg = self.segment
            row = seg.attach(seg.layout.breaker_dir, seg.digest("cluster", cluster), self.worker)
            if row < 0:
                raise TableFull(f"shared_state.counter_rows ({seg.layout.counter_rows}) "
                                f"is too small: no row for cluster {cluster!r}")
            b = self._breakers[cluster] = ShmBreaker(seg, row, self.worker)
        return b

    def endpoint(self, cluster: str, address: str) -> ShmEndpoint:
        e = self._endpoints.get((cluster, address))
        if e is None:
            seg = self.segment
            row = seg.attach(seg.layout.endpoint_dir, seg.digest(cluster, address), self.worker)
            if row < 0:
                raise TableFull(f"shared_state.counter_rows ({seg.layout.counter_rows}) "
                                f"is too small: no row for {cluster}/{address}")
            e = self._endpoints[(cluster, address)] = ShmEndpoint(seg, row, self.worker)
        return e

    def forget(self, cluster: str, address: str | None = None) -> None:
        """A cluster (or one endpoint) left this worker's config: close its handles. Rows
        are reused once no worker has them attached; a config that brings the name back
        before that finds the same counts (re-attach by name)."""
        if address is None:
            b = self._breakers.pop(cluster, None)
            if b is not None:
                b.close()
            for key in [k for k in self._endpoints if k[0] == cluster]:
                self._endpoints.pop(key).close()
        else:
            e = self._endpoints.pop((cluster, address), None)
            if e is not None:
                e.close()

    def buckets(self) -> ShmBuckets:
        return self._buckets

    def replay(self) -> ShmReplay:
        return self._replay

    def health_epoch(self) -> int:
        return self.segment.words[H_EPOCH]

    @property
    def workers(self) -> int:
        return self.segment.layout.workers


class SharedHost:
    """The supervisor's handle on the segment."""

    def __init__(self, segment: SharedSegment) -> None:
        self.segment = segment

    @classmethod
    def create(cls, config: SharedStateConfig, workers: int) -> "SharedHost":
        return cls(SharedSegment.create(config, workers))

    def worker(self, worker: int) -> WorkerShared:
        """Call in the worker, after fork."""
        if not 0 <= worker < self.segment.layout.workers:
            raise ValueError(f"worker {worker} is not in 0..{self.segment.layout.workers - 1}")
        return WorkerShared(self.segment, worker)

    def reclaim(self, worker: int) -> None:
        self.segment.reclaim(worker)

    def close(self) -> None:
        self.segment.close()


def state_for(config: SharedStateConfig, host: SharedHost | None, worker: int) -> SharedState:
    """The process's shared state: the segment's when there are workers, else local."""
    if host is None:
        return LocalState(config)
    return host.worker(worker)
