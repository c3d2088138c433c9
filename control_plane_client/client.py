"""The control-plane client at run time: sources -> resource state -> snapshot -> swap.

``start_control_plane(sink, snap)`` is called by ``App.start`` when the config has
``dynamic_resources`` (bootstrap) or ``control_plane:`` (native); ``sink`` is the App's side of
the contract (``sink.py``). It returns a :class:`ControlPlaneClient` (``close()``, ``dump()``).

Flow of one response (REST poll, gRPC message or file change)::

    transport (sources/) -> on_response -> ResourceState.receive (state.py: translate, decide)
        refused -> NACK with the reason; the running config is untouched
    -> EDS only, for clusters already serving: set their endpoints (endpoint state kept)
    -> otherwise ResourceState.build a whole Snapshot aside (static + dynamic; warming applied)
       and the sink applies it (one swap; in-flight requests finish on the old one)
        applying fails -> the previous resources and snapshot are put back, and it is a NACK
    -> commit: the version is ACKed; the accepted resources go to the last-known-good cache

Warming deadlines are kept by a timer: when the earliest one passes, the snapshot is rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from control_plane_client.cache import CacheError
from control_plane_client.lkg import LastKnownGood, open_cache
from control_plane_client.metrics import XdsMetrics
from control_plane_client.resources import CDS, LDS, SDS, SOTW, SourceKey, error_text, short
from control_plane_client.sink import SnapshotSink
from control_plane_client.sources.factory import open_transport
from control_plane_client.sources.transport import Transport
from control_plane_client.state import ResourceState
from sidecar import __version__
from sidecar.config.control_plane import SourceSpec
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.snapshot import Snapshot

if TYPE_CHECKING:
    from control_plane_client.sds import SdsClient

log = logging.getLogger("sidecar.xds")


def node_identity(node: object) -> dict[str, object]:
    """The Envoy ``Node`` this client sends: the configured one, with defaults and our agent."""
    n: dict[str, object] = dict(node) if isinstance(node, dict) else {}
    n.setdefault("id", "sidecar")
    n.setdefault("cluster", "sidecar")
    n["user_agent_name"] = "pysidecar"
    n["user_agent_version"] = __version__
    return n


class ControlPlaneClient:
    def __init__(self, sink: SnapshotSink, snap: Snapshot, *, cache_dir: str | None = None):
        if snap.control_plane is None:
            raise ValueError("the snapshot has no control_plane section")
        self.sink = sink
        self.cfg = snap.control_plane
        self.base = snap                      # the static part (bootstrap / native file)
        self.node = node_identity(snap.node)
        self.state = ResourceState(self.cfg, snap)
        self.metrics = XdsMetrics(sink.metrics)
        self.lkg = LastKnownGood(open_cache(self.cfg, str(self.node["id"]), cache_dir),
                                 self.metrics)
        self.transports: dict[SourceKey, Transport] = {}
        self.lock = asyncio.Lock()            # one response (or rebuild) at a time
        self.started_at = time.time()
        self.initialized_at: float | None = None
        self.builds = 0
        self.contacted = False                # any source answered at least once
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._fallback: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self.sds: SdsClient | None = None     # the secrets, once a TLS context names one

    # ---- setup -------------------------------------------------------------------------------
    def transport(self, spec: SourceSpec) -> Transport:
        t = self.transports.get(spec.key)
        if t is not None:
            return t
        t = open_transport(spec, self, self.cfg, self.base)
        self.transports[spec.key] = t
        if not self._closed and self._started:
            t.start()
        return t

    async def start(self) -> None:
        cfg = self.cfg
        for type_url in (CDS, LDS):
            spec = self.state.top_source(type_url)
            if spec is not None:
                self.transport(spec).subscribe(type_url, None)
        self._subscribe_dependencies()
        self._follow_secrets(self.base)
        self._started = True
        for t in list(self.transports.values()):
            t.start()
        self.sink.add_readiness(self.not_ready_reason, self.ready_note)
        # if nothing answers within the initial fetch timeout, fall back to the cache anyway
        self._fallback = asyncio.get_running_loop().call_later(
            cfg.initial_fetch_timeout_s, self._spawn,
            lambda: self._fallback_to_lkg("initial fetch timeout"))
        log.info("control plane: %s (%s); node id=%s cluster=%s", cfg.api_type,
                 ", ".join(t.name for t in self.transports.values()), self.node.get("id"),
                 self.node.get("cluster"))

    async def close(self) -> None:
        self._closed = True
        for handle in (self._timer, self._fallback):
            if handle is not None:
                handle.cancel()
        for t in list(self.transports.values()):
            await t.close()
        for task in list(self._tasks):
            task.cancel()
        await self.lkg.close()
        self.sink.remove_readiness(self.not_ready_reason, self.ready_note)
        if self.sds is not None:
            self.sink.remove_readiness(self.sds.not_ready_reason, self.sds.expiry_note)

    def _spawn(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(make())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _subscribe_dependencies(self) -> None:
        """Ask each source for the RDS/EDS names the held listeners/clusters need."""
        for type_url, wanted in self.state.subscriptions().items():
            keys = set()
            for spec, names in wanted:
                self.transport(spec).subscribe(type_url, names)
                keys.add(spec.key)
            for t in list(self.transports.values()):
                if type_url in t.subscriptions and t.key not in keys:
                    t.subscribe(type_url, frozenset())
        self.state.forget_unwanted()

    # ---- readiness -------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.initialized_at is not None

    def _check_initialized(self) -> None:
        if self.initialized or self.state.unsynced():
            return
        self.initialized_at = time.time()
        self.metrics.initialized.set(1)
        if self.lkg.active:
            self.lkg.replaced()
            self._save_cache()
            log.warning("control plane reachable again: the last-known-good config is replaced "
                        "by the control plane's")
        log.info("control plane: initial config received (%.2fs after start)",
                 self.initialized_at - self.started_at)

    def not_ready_reason(self) -> str | None:
        if self.initialized:
            warming = self.state.warming
            if warming and time.time() - self.started_at < self.cfg.initial_fetch_timeout_s:
                return "control plane: warming " + ", ".join(
                    f"{k} {v}" for k, v in warming.as_dict().items() if v)
            return None
        if self.lkg.active:
            return None      # serving: ready, with a note (see ready_note)
        return self._not_ready_detail()

    def ready_note(self) -> str | None:
        """Ready, but say so: the config in force came from the last-known-good cache."""
        if not self.initialized and self.lkg.active and self.lkg.cache is not None:
            return (f"serving the last-known-good config from {self.lkg.cache.path} (saved "
                    f"{self.lkg.saved_ago():.0f}s ago; versions {self.state.version_text()}): "
                    f"control plane unreachable: {self.last_error() or 'no answer yet'}")
        return None

    def _not_ready_detail(self) -> str | None:
        if time.time() - self.started_at < self.cfg.initial_fetch_timeout_s and not self.lkg.tried:
            return ("control plane: waiting for the initial config ("
                    + ", ".join(self.state.unsynced()) + ")")
        why = self.last_error() or "no answer"
        if self.lkg.cache is None:
            return f"control plane unreachable ({why}); no last-known-good cache (disabled)"
        if self.lkg.error:
            return (f"control plane unreachable ({why}); last-known-good cache refused: "
                    f"{self.lkg.error}")
        return f"control plane unreachable ({why}); no last-known-good cache at {self.lkg.cache.path}"

    def last_error(self) -> str:
        """The most recent failure of any source ("" if none)."""
        errs = [(t.last_error_at, t.last_error) for t in self.transports.values() if t.last_error]
        return max(errs)[1] if errs else ""

    # ---- transport callbacks (DiscoveryHandler) -----------------------------------------------
    def on_contact(self, transport: Transport, type_url: str | None) -> None:
        self.contacted = True
        self.metrics.connected.labels(transport.name).set(1)
        for t in ((type_url,) if type_url else SOTW):
            if t in SOTW and t in transport.subscriptions:
                self.state.synced(t, transport.key)
        self._check_initialized()

    def on_failure(self, transport: Transport, type_url: str | None, error: str) -> None:
        self.metrics.failures.labels(transport.name).inc()
        self.metrics.connected.labels(transport.name).set(0)
        if self._closed:
            return
        log.warning("control plane %s%s: %s", transport.name,
                    f" ({short(type_url)})" if type_url else "", error)
        if not self.initialized and not self.lkg.tried and not self.contacted:
            self._spawn(lambda: self._fallback_to_lkg(error))

    async def on_response(self, transport: Transport, type_url: str, version: str,
                          resources: list[object], error: str | None = None) -> str | None:
        if self._closed:
            return "shutting down"
        self.contacted = True
        self.metrics.connected.labels(transport.name).set(1)
        if type_url == SDS:
            # secrets go to the TLS contexts' store, not into the config snapshot
            err = self.sds.on_response(version, resources, error) if self.sds is not None \
                else "no secrets were asked for"
            self.sink.count_update("xds_sds", err is None, err or "")
            self._check_initialized()
            return err
        async with self.lock:
            self.state.synced(type_url, transport.key)
            err = error
            if err is None:
                err = await self._accept(transport, type_url, version, resources)
            if err is not None:
                self._reject(transport, type_url, version, err)
            self._check_initialized()
            return err

    # ---- accepting and rejecting ------------------------------------------------------------
    async def _accept(self, transport: Transport, type_url: str, version: str,
                      resources: list[object]) -> str | None:
        now = time.time()
        s = short(type_url)
        try:
            update = self.state.receive(type_url, transport.spec, version, resources, now)
        except (ConfigError, ConfigErrors) as e:
            return error_text(e)
        if update.changed:
            try:
                if update.endpoints is not None:
                    for cluster, endpoints in update.endpoints:
                        self.sink.set_cluster_endpoints(cluster, endpoints)
                else:
                    await self._rebuild(now)
            except (ConfigError, ConfigErrors, OSError) as e:
                self.state.revert(update)
                await self._restore()
                return f"cannot apply: {e}" if isinstance(e, OSError) else error_text(e)
            except Exception as e:  # noqa: BLE001 - building routes/filters failed
                log.exception("control plane: applying %s failed", s)
                self.state.revert(update)
                await self._restore()
                return f"cannot apply: {e.__class__.__name__}: {e}"
        self.state.commit(update, now)
        self.metrics.updates.labels(s, "accepted").inc()
        self.sink.count_update(f"xds_{s}", True)
        if update.changed:
            self.metrics.last_update.labels(s).set(now)
            log.info("control plane: %s version %s accepted (%d resource(s), changed: %s)",
                     s, version or "-", update.count, ", ".join(sorted(update.changed)[:10]))
            self._subscribe_dependencies()
            self._save_cache()
        self._gauges()
        return None

    def _reject(self, transport: Transport, type_url: str, version: str, err: str) -> None:
        s = short(type_url)
        held = self.state.type_state(type_url).version
        self.state.reject(type_url, transport.name, version, err, time.time())
        self.metrics.updates.labels(s, "rejected").inc()
        self.sink.count_update(f"xds_{s}", False, err)
        log.error("control plane: %s version %s rejected, keeping version %s: %s",
                  s, version or "-", held or "-", err)

    # ---- secrets (SDS over ADS) ------------------------------------------------------------
    def _follow_secrets(self, snap: Snapshot) -> None:
        """Ask the ADS stream for the secrets the snapshot's TLS contexts name."""
        if self.sds is None:
            # imported when first needed: checking certificates loads cryptography, which a
            # proxy without SDS does not carry in memory
            from control_plane_client.sds import SdsClient, secret_names  # noqa: PLC0415
            names = secret_names(snap)
            if not names:
                return
            if self.cfg.ads is None:
                # refused in a bootstrap; a listener from LDS can still name one
                log.error("control plane: TLS contexts name SDS secrets (%s) but there is no "
                          "ADS stream (dynamic_resources.ads_config)", ", ".join(sorted(names)))
                return
            self.sds = SdsClient(self.sink.secrets, self.transport(self.cfg.ads),
                                 self.sink.metrics)
            self.sink.add_readiness(self.sds.not_ready_reason, self.sds.expiry_note)
        self.sds.follow(snap)

    # ---- building and applying -------------------------------------------------------------
    async def _rebuild(self, now: float | None = None) -> None:
        build = self.state.build(time.time() if now is None else now)
        snap = build.snapshot
        cur = self.state.applied or self.base
        if cur.listeners == snap.listeners and cur.clusters == snap.clusters:
            self._arm(build.next_at)
            return
        await self.sink.apply_snapshot(snap)
        self.builds += 1
        self.state.serving(snap)
        self._follow_secrets(snap)
        for cluster, endpoints in self.state.assignments(snap):
            live = self.sink.cluster_endpoints(cluster)
            if live is not None and live != endpoints:
                self.sink.set_cluster_endpoints(cluster, endpoints)
        self._arm(build.next_at)
        self._gauges()

    async def _restore(self) -> None:
        """After a failed apply: put the last good snapshot back (clusters may have moved)."""
        try:
            await self.sink.apply_snapshot(self.state.applied or self.base)
        except Exception:  # noqa: BLE001
            log.exception("control plane: restoring the previous config failed")

    def _arm(self, at: float) -> None:
        """Rebuild when the earliest warming deadline passes."""
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at < math.inf and not self._closed:
            delay = max(0.0, at - time.time()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self._spawn,
                                                                self._on_timer)

    async def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        async with self.lock:
            try:
                await self._rebuild()
            except Exception as e:  # noqa: BLE001
                log.error("control plane: warming timeout rebuild failed: %s", e)

    def _gauges(self) -> None:
        for s, active, warming in self.state.counts():
            self.metrics.resources.labels(s, "warming").set(warming)
            self.metrics.resources.labels(s, "active").set(active)

    # ---- last-known-good cache -------------------------------------------------------------
    def _save_cache(self) -> None:
        if self.lkg.cache is not None and not self.lkg.active:
            self.lkg.save(*self.state.cache_document())

    async def _fallback_to_lkg(self, why: str) -> None:
        """No source answered: serve the last-known-good cache, if there is a good one."""
        if self.lkg.tried or self.initialized or self._closed or self.contacted:
            return
        self.lkg.tried = True
        cache = self.lkg.cache
        if cache is None:
            log.warning("control plane unreachable (%s); the last-known-good cache is disabled", why)
            return
        async with self.lock:
            if self.initialized:
                return
            try:
                doc = cache.load()
                if doc is None:
                    self.lkg.missing()
                    log.warning("control plane unreachable (%s); no last-known-good cache at %s",
                                why, cache.path)
                    return
                snap = self.state.load_cached(doc, time.time())
                await self.sink.apply_snapshot(snap)
            except (CacheError, ConfigError, ConfigErrors, OSError) as e:
                err = error_text(e)
                self.lkg.refused(err)
                log.error("control plane unreachable (%s); last-known-good cache REFUSED: %s",
                          why, err)
                self.state.clear()
                await self._restore()
                return
            self.state.serving(snap)
            self._subscribe_dependencies()
            self._follow_secrets(snap)
            self._gauges()
            saved_at = doc.get("saved_at")
            self.lkg.loaded(float(saved_at) if isinstance(saved_at, (int, float)) else 0.0,
                            doc.get("generation"))
            log.warning("control plane unreachable (%s): serving the last-known-good config from "
                        "%s (saved %s, versions %s)", why, cache.path,
                        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(cache.last_saved_at)),
                        self.state.version_text())

    # ---- visibility --------------------------------------------------------------------------
    @property
    def last_nack(self) -> dict[str, object] | None:
        nack = self.state.last_nack
        return nack.as_dict(with_type=True) if nack is not None else None

    def status(self) -> str:
        if self.initialized:
            return "synced"
        if self.lkg.active:
            return "serving_last_known_good"
        return "initializing"

    def dump(self) -> dict[str, object]:
        return {
            "api_type": self.cfg.api_type,
            "state": self.status(),
            "ready": self.not_ready_reason() or "ready",
            "node": self.node,
            "started_at": self.started_at,
            "initialized_at": self.initialized_at,
            "snapshot_builds": self.builds,
            "warming": self.state.warming.as_dict(),
            "last_nack": self.last_nack,
            "types": self.state.describe(),
            "sources": [t.dump() for t in self.transports.values()],
            "sds": self.sds.dump() if self.sds is not None else None,
            "cache": self.lkg.describe(),
        }


async def start_control_plane(sink: SnapshotSink, snap: Snapshot, *,
                              cache_dir: str | None = None) -> ControlPlaneClient:
    cp = ControlPlaneClient(sink, snap, cache_dir=cache_dir)
    await cp.start()
    return cp
