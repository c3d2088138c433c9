"""Process wiring: metrics, cluster manager, config store, admin, lifecycle and reload."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from control_plane_client.client import ControlPlaneClient, start_control_plane
from filters import CATALOG
from sidecar.cluster import health, outlier
from sidecar.cluster.manager import ClusterManager
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.listener import Listener
from sidecar.config.snapshot import Snapshot
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.observability.tracing import ListenerTracer, Tracing
from sidecar.observability.workload import Workload
from sidecar.route.shadow import ShadowState
from sidecar.runtime.collector import install_state_collector
from sidecar.runtime.control_plane_sink import AppSnapshotSink
from sidecar.runtime.filter_env import ProxyFilterEnv
from sidecar.runtime.loader import filter_source_files, load_file
from sidecar.runtime.metrics_port import MetricsPort, Renderer
from sidecar.runtime.sidecar_mode import attach
from sidecar.runtime.store import ConfigStore
from sidecar.runtime.stores import StoreRuntime
from sidecar.runtime.watchdog import DEFAULT_THRESHOLD_S, LoopWatchdog
from sidecar.shared.api import SharedState
from sidecar.shared.local import LocalState
from sidecar.tls.secrets import SecretStore

log = logging.getLogger("sidecar")

LARGE_CONFIG_ROUTES = 1000
# The collector's young generation, in net container allocations (CPython's default 700). A
# request in flight holds ~100 containers, so with 100 HTTP/2 streams in flight a collection
# ran every few requests and walked them all, then again in the middle generation: 3.3 % of
# the CPU of a proxied HTTP/2 request (perf), under 0.3 % at 7000. Garbage cycles wait for at
# most that many allocations (a few hundred KB).
GC_YOUNG_THRESHOLD = 7000

class AdminServer(Protocol):
    """What an admin starter returns: something the App stops at exit (a LocalServer)."""

    async def cleanup(self) -> None: ...


AdminStarter = Callable[["App", str, int], Awaitable[tuple[AdminServer, int]]]
Companion = Callable[["App"], Awaitable[object]]
"""Starts the admin server for an app (``sidecar.admin.server.start_admin``): the admin sits
above the runtime, so whoever makes the App hands it in."""


class ParserError(RuntimeError):
    pass


def check_compiled_parsers() -> None:
    """Refuse to run on pure-Python HTTP parsing: strict, fast llhttp parsing is a requirement
    (httptools for proxied and admin traffic, aiohttp's C parser for control-plane traffic).
    aiohttp itself is not imported here: it is loaded only by the features that use it."""
    try:
        import httptools.parser.parser  # noqa: F401  (the compiled llhttp binding)
    except ImportError as e:  # pragma: no cover
        raise ParserError(f"httptools' compiled llhttp parser is not available: {e}") from None
    # aiohttp uses its compiled parser when the extension is there and not disabled (looked
    # for on disk: find_spec of a submodule would import aiohttp itself)
    spec = importlib.util.find_spec("aiohttp")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    if os.environ.get("AIOHTTP_NO_EXTENSIONS") or not any(
            f.startswith("_http_parser.") and f.endswith((".so", ".pyd"))
            for d in dirs for f in os.listdir(d)):
        raise ParserError("aiohttp's compiled (llhttp) parser is not active: the pure-Python "
                          "parser is in use (is AIOHTTP_NO_EXTENSIONS set, or was aiohttp "
                          "installed without its C extensions?)")


def install_uvloop() -> bool:
    try:
        import uvloop  # optional: the proxy runs on asyncio's loop without it
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class App:
    def __init__(self, snapshot: Snapshot, *, config_path: str | None = None,
                 metrics_enabled: bool = True, reuse_port: bool = False,
                 watch_config: bool = True, worker_id: int = 0, workers: int = 1,
                 cache_dir: str | None = None, admin: AdminStarter | None = None,
                 companions: tuple[Companion, ...] = (),
                 loop_lag_threshold_s: float = DEFAULT_THRESHOLD_S,
                 shared: SharedState | None = None):
        self.initial = snapshot
        self.config_path = config_path
        self.metrics = Metrics(enabled=metrics_enabled)
        self.stats = StatsCache(self.metrics)
        self.secrets = SecretStore()         # certificates from the control plane (SDS)
        # the sidecar's shared state: the segment of the worker group, or this process's own
        self.shared: SharedState = shared if shared is not None else \
            LocalState(snapshot.stores.shared_state)
        self.clusters = ClusterManager(self.stats, self.secrets, self.shared)
        # outlier detection in every worker (each sees its own outcomes); its interval work
        # and active health checking in one (worker 0): one prober per sidecar
        outlier.follow(self.clusters, self.metrics, main=worker_id == 0)
        if worker_id == 0:
            health.follow(self.clusters, self.metrics)
        self.stores = StoreRuntime(snapshot.stores, self.metrics)
        # the bootstrap's node.cluster: fixed for the process (rate limit source_cluster)
        node = snapshot.node or {}
        self.filter_env = ProxyFilterEnv(self.metrics, self.clusters, self.shared, self.stores,
                                         str(node.get("cluster", "") or ""))
        self.shadow = ShadowState(self.metrics)
        self.store = ConfigStore(self.metrics, self.stats, self.clusters, CATALOG,
                                 self.filter_env, self.shadow, self.make_tracer, reuse_port,
                                 workload=Workload.from_env(os.environ), secrets=self.secrets)
        self.store.on_applied.append(self.on_snapshot_applied)
        self.store.before_apply.append(self._check_shared_state)
        # user filter source files of the config in force -> filter name (reload, watchdog)
        self.filter_files: dict[str, str] = {}
        self._filter_mtimes: dict[str, float] = {}
        self.watchdog = LoopWatchdog(self.metrics, lambda: self.filter_files,
                                     loop_lag_threshold_s) if loop_lag_threshold_s > 0 else None
        install_state_collector(self)     # scrape-time gauges: connections, breakers, endpoints
        # what /stats/prometheus answers: this process's registry, or (worker 0 of several,
        # set by sidecar.runtime.workers) every worker's merged
        self.render_metrics: Renderer = self._render_local
        self.metrics_port = MetricsPort(lambda: self.render_metrics)   # worker 0 only
        self.admin_starter = admin
        # servers started beside the proxy on worker 0, by the entry point that made the App
        # (the kubelet prober of injected pods); each returns something with cleanup() or None
        self.companions = companions
        self.companion_servers: list[object] = []
        self.reuse_port = reuse_port
        self.watch_config = watch_config
        self.worker_id = worker_id
        self.workers = workers
        self.cache_dir = cache_dir
        self.admin: AdminServer | None = None
        self.admin_port: int | None = None
        self.healthy = True            # POST /healthcheck/fail flips this
        self.draining = False
        self.started_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_error = ""
        self.control_plane: ControlPlaneClient | None = None   # when resources come from xDS
        self.ready_checks: list[Callable[[], str | None]] = []   # -> reason not ready or None
        self.outbound_drain_gate = None   # async (deadline) -> None; set by sidecar mode
        # -> a note shown by a 200 /ready (e.g. "serving the last-known-good config") or None
        self.ready_notes: list[Callable[[], str | None]] = []
        self.snapshot_listeners: list[Callable[[Snapshot], None]] = []
        self.ready_notes.append(self.stores.ready_note)
        self._tasks: list[asyncio.Task] = []
        self._stop: asyncio.Event | None = None
        self._config_mtime = 0.0
        self._tracing: Tracing | None = None
        m = self.metrics
        if m.enabled:
            self._g_version = m.gauge("sidecar_config_info", "Config version in force (value 1)",
                                      ("version",))
            self._c_reload = m.counter("sidecar_config_updates_total", "Config updates by outcome",
                                       ("source", "outcome"))
            self._g_last = m.gauge("sidecar_config_last_update_timestamp_seconds",
                                   "When the config in force was applied")
        self._last_version_label: str | None = None

    async def _render_local(self, accept: str) -> tuple[bytes, str]:
        return self.metrics.render(accept)

    # ---- factories used by the config store ---------------------------------------------
    def make_tracer(self, listener_config: Listener) -> ListenerTracer | None:
        if self._tracing is None:
            return None
        return self._tracing.for_listener(listener_config)

    def on_snapshot_applied(self, snap: Snapshot) -> None:
        # A large compiled config (thousands of routes) is long-lived: move it out of the
        # collector's way so full collections do not scan it on every pass. Unfreeze first so
        # retired configs, once unreachable, are still collected. Small configs skip this:
        # the collection itself is a pause.
        if sum(len(vh.routes) for lc in snap.listeners if lc.route_config
               for vh in lc.route_config.virtual_hosts) >= LARGE_CONFIG_ROUTES:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        if self.metrics.enabled:
            if self._last_version_label is not None:
                try:
                    self._g_version.remove(self._last_version_label)
                except KeyError:
                    pass
            self._g_version.labels(snap.version).set(1)
            self._last_version_label = snap.version
            self._g_last.set(time.time())
        self.filter_files = filter_source_files(snap)
        self._filter_mtimes = {f: _mtime(f) for f in self.filter_files}
        for cb in self.snapshot_listeners:
            cb(snap)

    def _check_shared_state(self, snap: Snapshot) -> None:
        """The shared-memory segment is sized once, before the workers start: a reload may
        name new stores, not resize it."""
        if snap.stores.shared_state != self.initial.stores.shared_state:
            raise ConfigError("shared_state", "is sized at start; restart the sidecar to change it")
        self.stores.configure(snap.stores)

    def count_update(self, source: str, ok: bool, error: str = "") -> None:
        if ok:
            self.reloads_ok += 1
        else:
            self.reloads_failed += 1
            self.last_reload_error = error
        if self.metrics.enabled:
            self._c_reload.labels(source, "accepted" if ok else "rejected").inc()

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, *, admin: bool = True) -> None:
        snap = self.initial
        _, middle, old = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
        if self.watchdog is not None:
            self.watchdog.start()
        self._setup_tracing(snap)
        await self.store.apply(snap)
        if self.worker_id == 0:
            await (await self.metrics_port.prepare(snap.metrics))(True)
        self.count_update("initial", True)
        attach(self)        # sidecar mode (a no-op without a `sidecar:` section)
        self.clusters.start()
        if admin and self.worker_id == 0 and self.admin_starter is not None:
            self.admin, self.admin_port = await self.admin_starter(self, snap.admin.host,
                                                                   snap.admin.port)
        if self.worker_id == 0:
            for companion in self.companions:
                self.companion_servers.append(await companion(self))
        if snap.control_plane is not None:
            sink = AppSnapshotSink(metrics=self.metrics, store=self.store, clusters=self.clusters,
                                   count_update=self.count_update,
                                   ready_checks=self.ready_checks, ready_notes=self.ready_notes,
                                   secrets=self.secrets)
            self.control_plane = await start_control_plane(sink, snap, cache_dir=self.cache_dir)
        loop = asyncio.get_running_loop()
        if self.config_path and self.watch_config and snap.control_plane is None:
            try:
                self._config_mtime = os.stat(self.config_path).st_mtime
            except OSError:
                pass
            self._tasks.append(loop.create_task(self._watch_file()))

    def _setup_tracing(self, snap: Snapshot) -> None:
        self._tracing = None
        if snap.tracing.exporter == "none":
            return
        self._tracing = Tracing(snap.tracing, self.metrics)

    async def reload(self, source: str = "file") -> bool:
        """Re-read the config file; an invalid file is refused and the old config serves on."""
        if self.config_path is None:         # the embedded demo, or a snapshot handed in
            log.info("reload: no config file to re-read")
            return False
        try:
            snap = load_file(self.config_path)
        except ConfigErrors as e:
            msg = str(e)
            log.error("config reload refused, keeping version %s:\n%s",
                      self.store.snapshot.version if self.store.snapshot else "?", msg)
            self.count_update(source, False, msg)
            return False
        old_tracing = self._tracing
        tracing_changed = self.store.snapshot is None or snap.tracing != self.store.snapshot.tracing
        if tracing_changed:
            self._setup_tracing(snap)     # the new listener snapshots are built with it
        finish_metrics_port = None
        try:
            if self.worker_id == 0:
                finish_metrics_port = await self.metrics_port.prepare(snap.metrics)
            await self.store.apply(snap)
        except (ConfigError, ConfigErrors, OSError) as e:
            # ConfigError: found while building the route chains (e.g. a per-route filter
            # override naming an unknown provider); OSError: a new listener cannot bind.
            # Either way the file is refused like any invalid one.
            if finish_metrics_port is not None:
                await finish_metrics_port(False)
            if tracing_changed:
                if self._tracing is not None:
                    self._tracing.shutdown()
                self._tracing = old_tracing
            log.error("config reload refused, keeping the running config:\n%s", e)
            self.count_update(source, False, str(e))
            return False
        if finish_metrics_port is not None:
            await finish_metrics_port(True)
        if tracing_changed and old_tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, old_tracing.shutdown)
        log.info("config reloaded: version %s", snap.version)
        self.count_update(source, True)
        return True

    async def _watch_file(self) -> None:
        """Poll the config file's mtime (cheap, and works on every filesystem and in
        Kubernetes ConfigMap symlink swaps)."""
        path = self.config_path
        assert path is not None          # started only for a config file
        while True:
            await asyncio.sleep(1.0)
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            if mtime != self._config_mtime:
                self._config_mtime = mtime
                await self.reload("file")
                continue
            changed = [f for f, m in self._filter_mtimes.items() if _mtime(f) != m]
            if changed:
                for f in changed:
                    self._filter_mtimes[f] = _mtime(f)   # a refused version is not retried
                log.info("filter module changed (%s): reloading", ", ".join(changed))
                await self.reload("filter_module")

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.healthy:
            return "health check failed (POST /healthcheck/fail)"
        for check in self.ready_checks:
            r = check()
            if r:
                return r
        return None

    def ready_notes_text(self) -> str:
        """What a 200 /ready adds: one ``note:`` line per line of each ready note (the
        last-known-good config in force, certificate expiry...)."""
        lines = [line for f in self.ready_notes if (n := f()) for line in n.splitlines()]
        return "".join(f"note: {line}\n" for line in lines)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, answer /ready 503, let in-flight requests finish. With inbound
        listeners (sidecar mode) those drain first and outbound ones stay open until the
        ``outbound_drain_gate`` says the app has stopped, so the app can finish its own calls."""
        self.draining = True
        lrs = list(self.store.listeners.values())
        inbound = [lr for lr in lrs if lr.config.direction == "inbound"]
        others = [lr for lr in lrs if lr.config.direction != "inbound"]

        def limit(group):
            return max((lr.config.drain_timeout_s for lr in group), default=5.0) \
                if timeout is None else timeout

        if not inbound or not others or self.outbound_drain_gate is None:
            await asyncio.gather(*(lr.drain(limit(lrs)) for lr in lrs))
            return
        start = time.monotonic()
        log.info("draining: inbound listeners first (%s), outbound while the app runs",
                 ", ".join(lr.name for lr in inbound))
        await asyncio.gather(*(lr.drain(limit(inbound)) for lr in inbound))
        deadline = start + limit(others)
        await self.outbound_drain_gate(deadline)
        await asyncio.gather(*(lr.drain(max(0.5, deadline - time.monotonic())) for lr in others))

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain then stop; SIGHUP reloads. Installed before any port is bound
        so an early signal never hits the default (fatal) action."""
        if self._stop is None:
            self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_term():
            log.info("SIGTERM: draining")
            loop.create_task(self._drain_and_stop())

        def on_hup():
            if self.config_path:
                loop.create_task(self.reload("sighup"))

        for sig, cb in ((signal.SIGTERM, on_term), (signal.SIGINT, on_term), (signal.SIGHUP, on_hup)):
            try:
                loop.add_signal_handler(sig, cb)
            except (NotImplementedError, RuntimeError):
                pass

    async def run_until_stopped(self) -> None:
        if self._stop is None:
            self.install_signal_handlers()
        assert self._stop is not None
        await self._stop.wait()
        await self.close()

    async def _drain_and_stop(self) -> None:
        await self.drain()
        self.request_stop()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.control_plane is not None:
            await self.control_plane.close()
        self.store.close()
        self.clusters.close()
        await self.stores.close()
        if self.admin is not None:
            await self.admin.cleanup()
        await self.metrics_port.close()
        for server in self.companion_servers:
            cleanup = getattr(server, "cleanup", None)
            if cleanup is not None:
                await cleanup()
        if self._tracing is not None:
            # a dead collector must not block the loop while the exporter gives up
            await asyncio.get_running_loop().run_in_executor(None, self._tracing.shutdown)

    def listener_port(self, name: str) -> int:
        return self.store.listeners[name].bound_port


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
