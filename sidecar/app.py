"""Process wiring: metrics, cluster manager, config store, admin, lifecycle and reload."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from typing import Callable, Optional

from filters import FilterRuntime
from sidecar.cluster import ClusterManager
from sidecar.errors import ConfigError, ConfigErrors
from sidecar.metrics import Metrics
from sidecar.model import Snapshot
from sidecar.stats import StatsCache
from sidecar.store import ConfigStore

log = logging.getLogger("sidecar")

LARGE_CONFIG_ROUTES = 1000


class ParserError(RuntimeError):
    pass


def check_compiled_parsers() -> None:
    """Refuse to run on pure-Python HTTP parsing: strict, fast llhttp parsing is a requirement
    (httptools for proxied traffic, aiohttp's C parser for admin and control-plane traffic)."""
    try:
        import httptools.parser.parser  # noqa: F401  (the compiled llhttp binding)
    except ImportError as e:  # pragma: no cover
        raise ParserError(f"httptools' compiled llhttp parser is not available: {e}") from None
    from aiohttp import http_parser
    cls = http_parser.HttpRequestParser
    if getattr(cls, "__module__", "") != "aiohttp._http_parser":
        raise ParserError("aiohttp's compiled (llhttp) parser is not active: the pure-Python "
                          "parser is in use (is AIOHTTP_NO_EXTENSIONS set, or was aiohttp "
                          "installed without its C extensions?)")


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class App:
    def __init__(self, snapshot: Snapshot, *, config_path: Optional[str] = None,
                 metrics_enabled: bool = True, reuse_port: bool = False,
                 watch_config: bool = True, worker_id: int = 0, workers: int = 1,
                 cache_dir: Optional[str] = None):
        self.initial = snapshot
        self.config_path = config_path
        self.metrics = Metrics(enabled=metrics_enabled)
        self.stats = StatsCache(self.metrics)
        self.clusters = ClusterManager(self.metrics)
        self.runtime = FilterRuntime(metrics=self.metrics, clusters=self.clusters, state={},
                                     stats=self.stats)
        self.store = ConfigStore(self)
        from sidecar.stats import install_state_collector
        install_state_collector(self)     # scrape-time gauges: connections, breakers, endpoints
        from sidecar import health_checker, outlier_detector
        self.outlier_detection = outlier_detector.install(self)
        self.health_checks = health_checker.install(self)
        self.reuse_port = reuse_port
        self.watch_config = watch_config
        self.worker_id = worker_id
        self.workers = workers
        self.cache_dir = cache_dir
        self.admin = None
        self.admin_port: Optional[int] = None
        self.probe_port = None         # sidecar.k8s.probes server, in injected pods
        self.healthy = True            # POST /healthcheck/fail flips this
        self.draining = False
        self.started_at = time.time()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_error = ""
        self.control_plane = None      # control_plane_client runtime, when dynamic
        self.ready_checks: list[Callable[[], Optional[str]]] = []   # -> reason not ready or None
        self.outbound_drain_gate = None   # async (deadline) -> None; set by sidecar mode
        # -> a note shown by a 200 /ready (e.g. "serving the last-known-good config") or None
        self.ready_notes: list[Callable[[], Optional[str]]] = []
        self.snapshot_listeners: list[Callable[[Snapshot], None]] = []
        self._tasks: list[asyncio.Task] = []
        self._stop: Optional[asyncio.Event] = None
        self._config_mtime = 0.0
        self._tracing = None
        m = self.metrics
        if m.enabled:
            self._g_version = m.gauge("sidecar_config_info", "Config version in force (value 1)",
                                      ("version",))
            self._c_reload = m.counter("sidecar_config_updates_total", "Config updates by outcome",
                                       ("source", "outcome"))
            self._g_last = m.gauge("sidecar_config_last_update_timestamp_seconds",
                                   "When the config in force was applied")
        self._last_version_label: Optional[str] = None

    # ---- factories used by the config store ---------------------------------------------
    def observer_for(self, lr):
        from sidecar.observe import ListenerObserver
        return ListenerObserver(self.metrics, lr.name)

    def make_tracer(self, listener_config):
        if self._tracing is None:
            return None
        return self._tracing.for_listener(listener_config)

    def make_access_logs(self, listener_config):
        if not listener_config.access_log:
            return ()
        from sidecar.access_log import make_access_logger
        return tuple(make_access_logger(c, listener_config.name) for c in listener_config.access_log)

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
        for cb in self.snapshot_listeners:
            cb(snap)

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
        self._setup_tracing(snap)
        await self.store.apply(snap)
        self.count_update("initial", True)
        from sidecar.sidecar_mode import attach
        attach(self)        # sidecar mode (a no-op without a `sidecar:` section)
        self.clusters.start()
        if admin and self.worker_id == 0:
            from sidecar.admin import start_admin
            self.admin, self.admin_port = await start_admin(self, snap.admin.host, snap.admin.port)
        if self.worker_id == 0:   # the kubelet's probes in injected pods (SIDECAR_PROBE_PORT)
            from sidecar.k8s.probes import start_from_env
            self.probe_port = await start_from_env(self)
        if snap.control_plane is not None:
            from control_plane_client.runtime import start_control_plane
            self.control_plane = await start_control_plane(self, snap)
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
        from sidecar.tracing import Tracing
        self._tracing = Tracing(snap.tracing, self.metrics)

    async def reload(self, source: str = "file") -> bool:
        """Re-read the config file; an invalid file is refused and the old config serves on."""
        from sidecar.loader import load_file
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
        try:
            await self.store.apply(snap)
        except (ConfigError, ConfigErrors, OSError) as e:
            # ConfigError: found while building the route chains (e.g. a per-route filter
            # override naming an unknown provider); OSError: a new listener cannot bind.
            # Either way the file is refused like any invalid one.
            if tracing_changed:
                if self._tracing is not None:
                    self._tracing.shutdown()
                self._tracing = old_tracing
            log.error("config reload refused, keeping the running config:\n%s", e)
            self.count_update(source, False, str(e))
            return False
        if tracing_changed and old_tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, old_tracing.shutdown)
        log.info("config reloaded: version %s", snap.version)
        self.count_update(source, True)
        return True

    async def _watch_file(self) -> None:
        """Poll the config file's mtime (cheap, and works on every filesystem and in
        Kubernetes ConfigMap symlink swaps)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                mtime = os.stat(self.config_path).st_mtime
            except OSError:
                continue
            if mtime != self._config_mtime:
                self._config_mtime = mtime
                await self.reload("file")

    def not_ready_reason(self) -> Optional[str]:
        if self.draining:
            return "draining"
        if not self.healthy:
            return "health check failed (POST /healthcheck/fail)"
        for check in self.ready_checks:
            r = check()
            if r:
                return r
        return None

    async def drain(self, timeout: Optional[float] = None) -> None:
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
        await self._stop.wait()
        await self.close()

    async def _drain_and_stop(self) -> None:
        await self.drain()
        self.request_stop()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.control_plane is not None:
            await self.control_plane.close()
        for lr in self.store.listeners.values():
            lr.close()
        self.health_checks.close()
        self.outlier_detection.close()
        self.clusters.close()
        if "filters.jwt_authn" in sys.modules:
            sys.modules["filters.jwt_authn"].close_state(self.runtime.state)
        if "sidecar.shadow" in sys.modules:
            sys.modules["sidecar.shadow"].cancel_all(self.runtime)
        if self.admin is not None:
            await self.admin.cleanup()
        if self.probe_port is not None:
            await self.probe_port.cleanup()
        if self._tracing is not None:
            # a dead collector must not block the loop while the exporter gives up
            await asyncio.get_running_loop().run_in_executor(None, self._tracing.shutdown)

    def listener_port(self, name: str) -> int:
        return self.store.listeners[name].bound_port


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
