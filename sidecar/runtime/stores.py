"""The sidecar's connections to what it shares with other replicas: the Redis stores named in
``stores:`` and the rate limit services that ``envoy.filters.http.ratelimit`` calls.

Each is made on first use (a store no filter uses is never connected), kept across config
reloads while its config is unchanged, and reports a ``DependencyStatus`` (up/down, last
error, calls, failures, fail-open/fail-closed decisions) for ``/ready``'s detail, the metrics
(``sidecar_dependency_*``) and the dashboard.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar.config.errors import ConfigError
from sidecar.config.stores import DEFAULT_BACKOFF, StoresConfig
from sidecar.core.filter import GrpcClient
from sidecar.core.grpc import EnvoyGrpcService
from sidecar.observability.metrics import Metrics
from sidecar.shared.health import DependencyStatus, HealthTracker, Unavailable

if TYPE_CHECKING:
    from sidecar.shared.redis_store import RedisStore
    from sidecar.shared.rls import GrpcRateLimitService

PROBE_EVERY_S = 0.5


def redis_module() -> ModuleType:
    """``sidecar.shared.redis_store``: it needs the optional ``redis`` client (``pysidecar
    [redis]``), imported when a config first names a store."""
    try:
        return importlib.import_module("sidecar.shared.redis_store")
    except ImportError as e:
        raise ConfigError("stores", f"a Redis store needs the redis client: pip install "
                                    f"'pysidecar[redis]' ({e})") from None


def _rls_module() -> ModuleType:
    """``sidecar.shared.rls``: it needs the optional envoy-data-plane (``pysidecar[redis]``),
    imported when a rate limit filter is first built."""
    try:
        return importlib.import_module("sidecar.shared.rls")
    except ImportError as e:
        raise ConfigError("envoy.filters.http.ratelimit", "the rate limit service client "
                          f"needs envoy-data-plane: pip install 'pysidecar[redis]' "
                          f"({e})") from None


class StoreRuntime:
    def __init__(self, config: StoresConfig, metrics: Metrics) -> None:
        self.config = config
        self._redis: dict[str, RedisStore] = {}
        self._rls: dict[EnvoyGrpcService, GrpcRateLimitService] = {}
        self._retired: list[RedisStore] = []
        self._prober: asyncio.Task[None] | None = None
        if metrics.enabled:
            metrics.add_collector("dependencies", DependencyCollector(self))

    def configure(self, config: StoresConfig) -> None:
        """A new config: stores whose settings changed are replaced on their next use."""
        self.config = config

    def redis(self, name: str) -> RedisStore:
        cfg = self.config.get(name)
        if cfg is None:
            raise KeyError(name)
        st = self._redis.get(name)
        if st is None or st.cfg != cfg:
            if st is not None:
                self._retired.append(st)
            st = self._redis[name] = redis_module().RedisStore(cfg)
            self._start_prober()
        return st

    def _start_prober(self) -> None:
        if self._prober is not None:
            return
        try:
            self._prober = asyncio.get_running_loop().create_task(self._probe_down_stores())
        except RuntimeError:
            pass                        # built outside a loop (tests): traffic probes alone

    async def _probe_down_stores(self) -> None:
        """A store that is down comes back on the next call after its backoff; a worker with
        no traffic would go on reporting it down, so ping it (one call per backoff step)."""
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            for st in list(self._redis.values()):
                if not st.up:
                    try:
                        await st.ping()
                    except Unavailable:
                        pass

    def rate_limit_service(self, client: GrpcClient) -> GrpcRateLimitService:
        """The rate limit service ``client`` calls (one per service config, kept across
        reloads: its health record with it)."""
        service = client.service
        svc = self._rls.get(service)
        if svc is None:
            health = HealthTracker(f"ratelimit_service:{service.cluster}",
                                   f"cluster {service.cluster}", 0.0, DEFAULT_BACKOFF)
            svc = self._rls[service] = _rls_module().GrpcRateLimitService(client, health)
        else:
            svc.client = client         # bound to the cluster as it is now (kept by name)
        return svc

    def statuses(self) -> list[DependencyStatus]:
        out = [s.status() for s in self._redis.values()]
        out += [s.status() for s in self._rls.values()]
        return out

    def ready_note(self) -> str | None:
        """Shown by a 200 ``/ready``: which remote is down and what the filters answer."""
        notes = []
        for s in self.statuses():
            if s.up and not s.warning:
                continue
            if not s.up:
                since = time.strftime("%H:%M:%S", time.localtime(s.since)) if s.since else "?"
                notes.append(f"{s.name} ({s.address}) down since {since}: {s.last_error}; "
                             f"answered by policy: {s.fail_open} fail_open, "
                             f"{s.fail_closed} fail_closed")
            if s.warning:
                notes.append(f"{s.name}: {s.warning}")
        return "; ".join(notes) or None

    async def close(self) -> None:
        for st in [*self._redis.values(), *self._retired]:
            try:
                await asyncio.wait_for(st.close(), 1.0)
            except (TimeoutError, OSError):
                pass
        self._redis.clear()
        self._retired.clear()
        if self._prober is not None:
            self._prober.cancel()
        self._rls.clear()


class DependencyCollector:
    """Scrape-time metrics of the stores and services (every worker has its own clients:
    counters add up; ``up`` is merged by min across workers)."""

    def __init__(self, stores: StoreRuntime) -> None:
        self.stores = stores

    def describe(self) -> list[object]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("sidecar_dependency_up",
                               "1 while the store or service answers (0: failure policy in force)",
                               labels=("name", "address"))
        calls = CounterMetricFamily("sidecar_dependency_calls_total",
                                    "Calls to a store or service by outcome",
                                    labels=("name", "outcome"))
        decisions = CounterMetricFamily("sidecar_dependency_policy_decisions_total",
                                        "Requests answered by the failure policy while the store "
                                        "or service could not answer", labels=("name", "policy"))
        for s in self.stores.statuses():
            up.add_metric((s.name, s.address), 1 if s.up else 0)
            calls.add_metric((s.name, "ok"), max(0, s.calls - s.failures))
            calls.add_metric((s.name, "failed"), s.failures - s.timeouts)
            calls.add_metric((s.name, "timeout"), s.timeouts)
            calls.add_metric((s.name, "skipped"), s.skipped)
            decisions.add_metric((s.name, "fail_open"), s.fail_open)
            decisions.add_metric((s.name, "fail_closed"), s.fail_closed)
        yield from (up, calls, decisions)
