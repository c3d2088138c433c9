"""The control-plane client at run time: sources -> validated resources -> snapshot -> swap.

``start_control_plane(app, snap)`` is called by ``App.start`` when the config has
``dynamic_resources`` (bootstrap) or ``control_plane:`` (native). It returns a
:class:`ControlPlane` (``close()``, ``dump()``).

Flow of one response (REST poll, gRPC message or file change)::

    resources (Envoy JSON) -> translate (same code as a bootstrap file)
        invalid -> rejected (NACK with the reason); the running config is untouched
    -> resource state (state of the world for LDS/CDS, by name for RDS/EDS)
    -> EDS only, for clusters already serving: ClusterManager.set_eds (endpoint state kept)
    -> otherwise build a whole Snapshot aside (static + dynamic; warming applied) and
       ConfigStore.apply it (one swap; in-flight requests finish on the old one)
    -> persist the accepted resources to the last-known-good cache

Warming, as Envoy: a new EDS cluster joins once its ClusterLoadAssignment arrived, a new
listener once its RouteConfiguration arrived (or after ``initial_fetch_timeout``: then without).
Make-before-break: a RouteConfiguration naming clusters that are not serving yet is held back
(the previous version keeps serving) until they are, or until ``initial_fetch_timeout`` - so a
route that moves traffic to a new cluster never sends a request to a cluster that is not there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from control_plane_client import cache as lkg
from control_plane_client import resources as R
from control_plane_client.translate.dynamic import config_source
from control_plane_client.transport import Transport
from sidecar import __version__
from sidecar.config.cluster import Cluster
from sidecar.config.control_plane import ControlPlaneConfig, SourceSpec
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.listener import Listener
from sidecar.config.route import RouteAction, RouteConfig
from sidecar.config.snapshot import Snapshot
from sidecar.tls.context import client_context

log = logging.getLogger("sidecar.xds")


@dataclass
class Resource:
    name: str
    raw: dict
    model: Any
    version: str
    updated_at: float                   # when this content arrived
    first_seen: float                   # when this name first arrived (warming deadline)
    source: tuple                       # transport key it came from
    dep: SourceSpec | None = None    # listener: its RDS source; EDS cluster: its EDS source
    dep_name: str = ""                  # the RDS / EDS resource name it needs


@dataclass
class TypeState:
    type_url: str
    resources: dict[str, Resource] = field(default_factory=dict)
    versions: dict[tuple, str] = field(default_factory=dict)   # per source, last accepted
    accepted: int = 0
    rejected: int = 0
    last_update: float = 0.0
    last_nack: dict | None = None
    synced_sources: set = field(default_factory=set)

    @property
    def version(self) -> str:
        return ",".join(v for _, v in sorted(self.versions.items(), key=lambda kv: str(kv[0])) if v)


def _route_cluster_refs(rc: RouteConfig) -> set[str]:
    out = set()
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            a = r.action
            if isinstance(a, RouteAction):
                if a.cluster:
                    out.add(a.cluster)
                out.update(w.name for w in a.weighted_clusters)
                out.update(m.cluster for m in a.mirrors)
    return out


def _hcm_rds_source(raw: dict) -> dict | None:
    try:
        f = raw["filter_chains"][0]["filters"][0]["typed_config"]
        return f.get("rds", {}).get("config_source")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


class ControlPlane:
    def __init__(self, app, snap: Snapshot):
        self.app = app
        self.cfg: ControlPlaneConfig = snap.control_plane
        self.base = snap                      # the static part (bootstrap / native file)
        self.node = self._node(snap.node)
        self.types = {t: TypeState(t) for t in R.ORDER}
        self.transports: dict[tuple, Transport] = {}
        self.lock = asyncio.Lock()
        self.started_at = time.time()
        self.initialized_at: float | None = None
        self.active_clusters: dict[str, Cluster] = {}
        self.active_listeners: dict[str, Listener] = {}
        self.active_routes: dict[str, RouteConfig] = {}
        self.warming: dict[str, list[str]] = {"clusters": [], "listeners": [], "routes": []}
        self.applied_snapshot: Snapshot | None = None
        self.builds = 0
        self.last_nack: dict | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        # last-known-good cache
        self.cache: lkg.LkgCache | None = None
        if self.cfg.cache_enabled:
            d = self.cfg.cache_dir or getattr(app, "cache_dir", None) or lkg.default_cache_dir()
            self.cache = lkg.LkgCache(os.path.join(d, lkg.cache_file_name(self.node.get("id", ""))),
                                      self.node.get("id", ""))
        self.cache_status = "disabled" if self.cache is None else "empty"
        self.cache_error = ""
        self.lkg_active = False               # serving resources loaded from the cache
        self.lkg_loaded_at = 0.0
        self._lkg_tried = False
        self.contacted = False                # any source answered at least once
        self._save_pending: bytes | None = None
        self._saving = False
        self.sds = None                       # control_plane_client.sds.SdsClient, once needed
        self._metrics()

    # ---- setup -------------------------------------------------------------------------------
    @staticmethod
    def _node(node: Any) -> dict:
        n = dict(node) if isinstance(node, dict) else {}
        n.setdefault("id", "sidecar")
        n.setdefault("cluster", "sidecar")
        n["user_agent_name"] = "pysidecar"
        n["user_agent_version"] = __version__
        return n

    def _metrics(self) -> None:
        m = self.app.metrics
        self.m_on = m.enabled
        if not m.enabled:
            return
        self.m_updates = m.counter("sidecar_xds_updates_total",
                                   "xDS responses by resource type and outcome (accepted/rejected)",
                                   ("type", "outcome"))
        self.m_failures = m.counter("sidecar_xds_fetch_failures_total",
                                    "Failed requests or broken streams to the control plane",
                                    ("source",))
        self.m_resources = m.gauge("sidecar_xds_resources", "Resources held, by type and state",
                                   ("type", "state"))
        self.m_last = m.gauge("sidecar_xds_last_update_timestamp_seconds",
                              "When a resource type last changed", ("type",))
        self.m_connected = m.gauge("sidecar_xds_connected",
                                   "1 when the control-plane source answered its last request",
                                   ("source",))
        self.m_lkg_active = m.gauge("sidecar_xds_lkg_active",
                                    "1 while serving the last-known-good cache (control plane "
                                    "unreachable at start)")
        self.m_lkg_loads = m.counter("sidecar_xds_lkg_loads_total",
                                     "Attempts to load the last-known-good cache by outcome",
                                     ("outcome",))
        self.m_lkg_saves = m.counter("sidecar_xds_lkg_saves_total",
                                     "Writes of the last-known-good cache by outcome", ("outcome",))
        self.m_initialized = m.gauge("sidecar_xds_initialized",
                                     "1 once every subscribed LDS/CDS source answered")
        for t in R.ORDER:
            for o in ("accepted", "rejected"):
                self.m_updates.labels(R.short(t), o)
        self.m_lkg_active.set(0)
        self.m_initialized.set(0)

    def _endpoints(self, spec: SourceSpec) -> tuple[list[tuple[str, int]], Any]:
        if spec.cluster:
            c = self.base.cluster(spec.cluster)
            if c is None:
                raise ConfigError("control_plane", f"control-plane cluster {spec.cluster!r} is not "
                                  "a static cluster")
            ctx = None
            if c.tls is not None:
                ctx = client_context(c.tls)
            eps = [(e.host, e.port) for e in c.endpoints]
            if not eps:
                raise ConfigError("control_plane", f"control-plane cluster {spec.cluster!r} has no "
                                  "endpoints")
            return eps, ctx
        return list(self.cfg.addresses), None

    def _resolve(self, spec: SourceSpec | None, parent: tuple) -> SourceSpec:
        """The SourceSpec a dependent resource (RDS/EDS) is fetched from."""
        cfg = self.cfg
        if cfg.default is not None:           # native: one source for everything
            return cfg.default
        if spec is None:
            raise ConfigError("config_source", "is required")
        if spec.kind == "self":
            for t in self.transports.values():
                if t.key == parent:
                    return t.spec
            raise ConfigError("config_source.self", "no source to refer to")
        if spec.kind == "ads":
            if cfg.ads is None:
                raise ConfigError("config_source.ads", "ADS is not configured "
                                  "(dynamic_resources.ads_config)")
            return cfg.ads
        if spec.kind in ("rest", "grpc") and self.base.cluster(spec.cluster) is None:
            raise ConfigError("config_source.api_config_source.cluster_names",
                              f"{spec.cluster!r} is not a static cluster")
        return spec

    def transport(self, spec: SourceSpec) -> Transport:
        t = self.transports.get(spec.key)
        if t is not None:
            return t
        backoff = (self.cfg.backoff_base_s, self.cfg.backoff_max_s)
        if spec.kind == "rest":
            from control_plane_client.rest import RestTransport
            eps, ctx = self._endpoints(spec)
            t = RestTransport(spec, self, eps, ctx, backoff=backoff)
        elif spec.kind in ("ads", "grpc"):
            from control_plane_client.ads import GrpcTransport
            eps, ctx = self._endpoints(spec)
            t = GrpcTransport(spec, self, eps, ctx, backoff=backoff, ads=spec.kind == "ads",
                              connect_timeout=max(1.0, spec.request_timeout_s))
        elif spec.kind == "file":
            from control_plane_client.file_source import FileTransport
            t = FileTransport(spec, self, poll_interval=self.cfg.file_poll_s, backoff=backoff)
        else:
            raise ConfigError("control_plane", f"unsupported source kind {spec.kind}")
        self.transports[spec.key] = t
        if not self._closed and self._started:
            t.start()
        return t

    _started = False

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.cds is not None:
            self.transport(self._top(cfg.cds)).subscribe(R.CDS, None)
        if cfg.lds is not None:
            self.transport(self._top(cfg.lds)).subscribe(R.LDS, None)
        self._subscribe_dependencies()
        self._started = True
        for t in list(self.transports.values()):
            t.start()
        self.app.ready_checks.append(self.not_ready_reason)
        self.app.ready_notes.append(self.ready_note)
        self.app.snapshot_listeners.append(self._follow_secrets)
        if self.app.store.snapshot is not None:
            self._follow_secrets(self.app.store.snapshot)
        loop = asyncio.get_running_loop()
        # if nothing answers within the initial fetch timeout, fall back to the cache anyway
        loop.call_later(cfg.initial_fetch_timeout_s, self._spawn, self._fallback_to_lkg,
                        "initial fetch timeout")
        log.info("control plane: %s (%s); node id=%s cluster=%s", cfg.api_type,
                 ", ".join(t.name for t in self.transports.values()), self.node.get("id"),
                 self.node.get("cluster"))

    def _top(self, spec: SourceSpec) -> SourceSpec:
        if spec.kind == "ads":
            return self.cfg.ads or spec
        return spec

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self.transports.values()):
            await t.close()
        for task in list(self._tasks):
            task.cancel()
        try:
            self.app.ready_checks.remove(self.not_ready_reason)
            self.app.ready_notes.remove(self.ready_note)
        except ValueError:
            pass

    def _spawn(self, fn, *args) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- secrets (SDS over ADS) ------------------------------------------------------------
    def _follow_secrets(self, snap: Snapshot) -> None:
        """Subscribe to the secrets the snapshot's TLS contexts name (on the ADS stream)."""
        if self.sds is None:
            # imported when first needed: checking certificates loads cryptography, which a
            # proxy without SDS does not carry in memory
            from control_plane_client.sds import SdsClient, secret_names  # noqa: PLC0415
            if not secret_names(snap):
                return
            if self.cfg.ads is None:
                log.error("control plane: TLS contexts name SDS secrets (%s) but there is no "
                          "ADS stream (dynamic_resources.ads_config)",
                          ", ".join(sorted(secret_names(snap))))
                return
            self.sds = SdsClient(self.app.secrets, self.transport(self.cfg.ads), self.app.metrics)
            self.app.ready_checks.append(self.sds.not_ready_reason)
            self.app.ready_notes.append(self.sds.expiry_note)
        self.sds.follow(snap)

    # ---- readiness -------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.initialized_at is not None

    def _check_initialized(self) -> None:
        if self.initialized:
            return
        for t, spec in ((R.LDS, self.cfg.lds), (R.CDS, self.cfg.cds)):
            if spec is not None and not self.types[t].synced_sources:
                return
        self.initialized_at = time.time()
        if self.m_on:
            self.m_initialized.set(1)
        if self.lkg_active:
            self.lkg_active = False
            if self.m_on:
                self.m_lkg_active.set(0)
            self._save_cache()
            log.warning("control plane reachable again: the last-known-good config is replaced "
                        "by the control plane's")
        log.info("control plane: initial config received (%.2fs after start)",
                 self.initialized_at - self.started_at)

    def not_ready_reason(self) -> str | None:
        if self.initialized:
            if any(self.warming.values()) and time.time() - self.started_at < self.cfg.initial_fetch_timeout_s:
                return "control plane: warming " + ", ".join(
                    f"{k} {v}" for k, v in self.warming.items() if v)
            return None
        if self.lkg_active:
            return None      # serving: ready, with a note (see ready_note)
        return self._not_ready_detail()

    def ready_note(self) -> str | None:
        """Ready, but say so: the config in force came from the last-known-good cache."""
        if not self.initialized and self.lkg_active:
            ago = time.time() - (self.cache.last_saved_at or self.lkg_loaded_at)
            return (f"serving the last-known-good config from {self.cache.path} (saved "
                    f"{ago:.0f}s ago; versions {self._versions_text()}): control plane "
                    f"unreachable: {self._last_error() or 'no answer yet'}")
        return None

    def _not_ready_detail(self) -> str | None:
        if time.time() - self.started_at < self.cfg.initial_fetch_timeout_s and not self._lkg_tried:
            return "control plane: waiting for the initial config (" + ", ".join(
                R.short(t) for t in (R.LDS, R.CDS) if not self.types[t].synced_sources) + ")"
        why = self._last_error() or "no answer"
        if self.cache is None:
            return f"control plane unreachable ({why}); no last-known-good cache (disabled)"
        if self.cache_error:
            return (f"control plane unreachable ({why}); last-known-good cache refused: "
                    f"{self.cache_error}")
        return f"control plane unreachable ({why}); no last-known-good cache at {self.cache.path}"

    def _last_error(self) -> str:
        errs = [(t.last_error_at, t.last_error) for t in self.transports.values() if t.last_error]
        return max(errs)[1] if errs else ""

    def _versions_text(self) -> str:
        return " ".join(f"{R.short(t)}={self.types[t].version or '-'}" for t in R.ORDER)

    # ---- transport callbacks -----------------------------------------------------------------
    def on_contact(self, transport: Transport, type_url: str | None) -> None:
        self.contacted = True
        if self.m_on:
            self.m_connected.labels(transport.name).set(1)
        for t in ((type_url,) if type_url else R.SOTW):
            if t in R.SOTW and t in transport.subscriptions:
                self.types[t].synced_sources.add(transport.key)
        self._check_initialized()

    def on_failure(self, transport: Transport, type_url: str | None, error: str) -> None:
        if self.m_on:
            self.m_failures.labels(transport.name).inc()
            self.m_connected.labels(transport.name).set(0)
        if self._closed:
            return
        log.warning("control plane %s%s: %s", transport.name,
                    f" ({R.short(type_url)})" if type_url else "", error)
        if not self.initialized and not self._lkg_tried and not self.contacted:
            self._spawn(self._fallback_to_lkg, error)

    async def on_response(self, transport: Transport, type_url: str, version: str,
                          resources: list, error: str | None = None) -> str | None:
        if self._closed:
            return "shutting down"
        self.contacted = True
        if self.m_on:
            self.m_connected.labels(transport.name).set(1)
        if type_url == R.SDS:
            # secrets go to the TLS contexts' store, not into the config snapshot
            err = self.sds.on_response(version, resources, error) if self.sds is not None \
                else "no secrets were asked for"
            self.app.count_update("xds_sds", err is None, err or "")
            self._check_initialized()
            return err
        async with self.lock:
            ts = self.types[type_url]
            if type_url in R.SOTW:
                ts.synced_sources.add(transport.key)
            if error is not None:
                err = error
            else:
                err = await self._accept(transport, ts, version, resources)
            if err is not None:
                self._reject(transport, ts, version, err)
            self._check_initialized()
            return err

    # ---- validation and state --------------------------------------------------------------
    def _parse(self, transport: Transport, ts: TypeState, version: str,
               resources: list, now: float) -> dict[str, Resource]:
        type_url = ts.type_url
        kind = R.KIND[type_url]
        errors: list[ConfigError] = []
        parsed: dict[str, Resource] = {}
        static_names = ({c.name for c in self.base.clusters} if type_url == R.CDS else
                        {l.name for l in self.base.listeners} if type_url == R.LDS else set())
        for i, d in enumerate(resources):
            try:
                d = R.unwrap(type_url, d, f"{kind}[{i}]")
                name = R.resource_name(type_url, d)
                path = f"{kind} {name!r}"
                if name in parsed:
                    raise ConfigError(path, "is in the response twice")
                if name in static_names:
                    raise ConfigError(path, f"has the name of a static {kind.lower()}; static "
                                      "resources cannot be replaced by the control plane")
                model = R.translate_resource(type_url, d, path)
                dep, dep_name = None, ""
                if type_url == R.LDS and model.rds_name:
                    src = _hcm_rds_source(d)
                    sp = f"{path}.filter_chains[0].filters[0].typed_config.rds.config_source"
                    dep = self._resolve(config_source(src, sp) if src is not None else None, transport.key)
                    dep_name = model.rds_name
                elif type_url == R.CDS and model.type == "eds":
                    ecc = d.get("eds_cluster_config") or {}
                    sp = f"{path}.eds_cluster_config.eds_config"
                    src = ecc.get("eds_config")
                    dep = self._resolve(config_source(src, sp) if src is not None else None, transport.key)
                    dep_name = model.eds_service_name or model.name
                old = ts.resources.get(name)
                first_seen = old.first_seen if old is not None else now
                if old is not None and old.raw == d and old.source == transport.key:
                    parsed[name] = old                 # unchanged: keep its version and time
                else:
                    parsed[name] = Resource(name, d, model, version, now, first_seen,
                                            transport.key, dep, dep_name)
            except ConfigErrors as e:
                errors.extend(e.errors)
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise ConfigErrors(errors)
        return parsed

    async def _accept(self, transport: Transport, ts: TypeState, version: str,
                      resources: list) -> str | None:
        now = time.time()
        type_url = ts.type_url
        try:
            parsed = self._parse(transport, ts, version, resources, now)
        except (ConfigError, ConfigErrors) as e:
            return R.error_text(e)
        old_map = ts.resources
        if type_url in R.SOTW:
            new = {n: r for n, r in old_map.items() if r.source != transport.key}
            for n in parsed:
                if n in new:
                    return f"{R.KIND[type_url]} {n!r}: also served by another source"
            new.update(parsed)
        else:
            wanted = self._wanted(type_url)
            new = dict(old_map)
            for n, r in parsed.items():
                if n in wanted:
                    new[n] = r
        changed = [n for n in set(new) | set(old_map) if new.get(n) is not old_map.get(n)]
        ts.resources = new
        if changed:
            try:
                if type_url == R.EDS and self._eds_fast_path(changed):
                    pass
                else:
                    await self._rebuild(now)
            except (ConfigError, ConfigErrors, OSError) as e:
                ts.resources = old_map
                await self._restore()
                return R.error_text(e) if not isinstance(e, OSError) else f"cannot apply: {e}"
            except Exception as e:  # noqa: BLE001 - building routes/filters failed
                log.exception("control plane: applying %s failed", R.short(type_url))
                ts.resources = old_map
                await self._restore()
                return f"cannot apply: {e.__class__.__name__}: {e}"
        ts.versions.pop(("cache",), None)
        ts.versions[transport.key] = version
        ts.accepted += 1
        if changed:
            ts.last_update = now
        if self.m_on:
            self.m_updates.labels(R.short(type_url), "accepted").inc()
            if changed:
                self.m_last.labels(R.short(type_url)).set(now)
        self.app.count_update(f"xds_{R.short(type_url)}", True)
        if changed:
            log.info("control plane: %s version %s accepted (%d resource(s), changed: %s)",
                     R.short(type_url), version or "-", len(parsed), ", ".join(sorted(changed)[:10]))
            self._subscribe_dependencies()
            self._save_cache()
        self._gauges()
        return None

    def _reject(self, transport: Transport, ts: TypeState, version: str, err: str) -> None:
        ts.rejected += 1
        ts.last_nack = {"version": version, "error": err, "at": time.time(),
                        "source": transport.name}
        self.last_nack = {"type": R.short(ts.type_url), **ts.last_nack}
        if self.m_on:
            self.m_updates.labels(R.short(ts.type_url), "rejected").inc()
        self.app.count_update(f"xds_{R.short(ts.type_url)}", False, err)
        log.error("control plane: %s version %s rejected, keeping version %s: %s",
                  R.short(ts.type_url), version or "-", ts.version or "-", err)

    def _wanted(self, type_url: str) -> dict[str, SourceSpec]:
        """RDS/EDS names the current listeners/clusters need, with their sources."""
        out: dict[str, SourceSpec] = {}
        if type_url == R.RDS:
            for r in self.types[R.LDS].resources.values():
                if r.dep_name:
                    out[r.dep_name] = r.dep
            for l in self.base.listeners:
                if l.rds_name and l.route_config is None:
                    out.setdefault(l.rds_name, self._static_dep(l.source, True))
        else:
            for r in self.types[R.CDS].resources.values():
                if r.dep_name:
                    out[r.dep_name] = r.dep
            for c in self.base.clusters:
                if c.type == "eds" and not c.endpoints:
                    out.setdefault(c.eds_service_name or c.name, self._static_dep(c.source, False))
        return {k: v for k, v in out.items() if v is not None}

    def _static_dep(self, raw: Any, listener: bool) -> SourceSpec | None:
        try:
            if self.cfg.default is not None:
                return self.cfg.default
            src = _hcm_rds_source(raw) if listener else (raw or {}).get("eds_cluster_config", {}).get("eds_config")
            if src is None:
                return None
            return self._resolve(config_source(src, "static"), ("static",))
        except (ConfigError, AttributeError, TypeError) as e:
            log.error("static resource needs a config source the client cannot use: %s", e)
            return None

    def _subscribe_dependencies(self) -> None:
        for type_url in R.BY_NAME:
            wanted = self._wanted(type_url)
            per: dict[tuple, set] = {}
            specs: dict[tuple, SourceSpec] = {}
            for name, spec in wanted.items():
                per.setdefault(spec.key, set()).add(name)
                specs[spec.key] = spec
            for key, spec in specs.items():
                self.transport(spec).subscribe(type_url, frozenset(per[key]))
            for t in list(self.transports.values()):
                if type_url in t.subscriptions and t.key not in per:
                    t.subscribe(type_url, frozenset())
            # forget resources nobody needs any more
            ts = self.types[type_url]
            for n in [n for n in ts.resources if n not in wanted]:
                del ts.resources[n]

    # ---- building and applying -------------------------------------------------------------
    def _eds_fast_path(self, changed: list[str]) -> bool:
        """Endpoint-only change for clusters already serving: update them in place."""
        eds = self.types[R.EDS].resources
        by_service: dict[str, list[str]] = {}
        for name, c in self.active_clusters.items():
            if c.type == "eds":
                by_service.setdefault(c.eds_service_name or c.name, []).append(name)
        if any(n not in by_service or n not in eds for n in changed):
            return False
        if self.warming["clusters"] or self.warming["routes"]:
            return False          # something waits for clusters: rebuild, it may now be ready
        for svc in changed:
            eps = eds[svc].model[1]
            for cname in by_service[svc]:
                self.app.clusters.set_endpoints(cname, eps)
                self.active_clusters[cname] = dataclasses.replace(self.active_clusters[cname],
                                                                  endpoints=eps)
        return True

    def _build(self, now: float) -> tuple[Snapshot, float]:
        """The snapshot to serve now, and when warming next needs a look (or inf)."""
        ift = self.cfg.initial_fetch_timeout_s
        next_at = math.inf
        cds = self.types[R.CDS].resources
        eds = self.types[R.EDS].resources
        rds = self.types[R.RDS].resources
        lds = self.types[R.LDS].resources
        warming = {"clusters": [], "listeners": [], "routes": []}

        def deadline(r: Resource, since: float) -> float:
            t = r.dep.initial_fetch_timeout_s if r.dep and r.dep.initial_fetch_timeout_s is not None else ift
            return since + t if t > 0 else math.inf

        def with_eds(c: Cluster) -> Cluster | None:
            cla = eds.get(c.eds_service_name or c.name)
            if cla is not None:
                return dataclasses.replace(c, endpoints=cla.model[1])
            return None

        clusters: list[Cluster] = []
        for c in self.base.clusters:
            if c.type == "eds" and not c.endpoints:
                c = with_eds(c) or c
            clusters.append(c)
        for name, r in cds.items():
            c = r.model
            if c.type == "eds":
                ce = with_eds(c)
                if ce is None:
                    prev = self.active_clusters.get(name)
                    if prev is not None and prev.type == "eds" and \
                            (prev.eds_service_name or prev.name) == (c.eds_service_name or c.name):
                        ce = dataclasses.replace(c, endpoints=prev.endpoints)
                    else:
                        dl = deadline(r, r.first_seen)
                        if now < dl:
                            warming["clusters"].append(name)
                            next_at = min(next_at, dl)
                            continue
                        ce = c      # initial fetch timeout: serve it without endpoints
                c = ce
            clusters.append(c)
        active = {c.name for c in clusters}

        routes: dict[str, RouteConfig] = {}
        for name, r in rds.items():
            missing = _route_cluster_refs(r.model) - active
            dl = deadline(r, r.updated_at)
            if not missing or now >= dl:
                routes[name] = r.model
            else:
                warming["routes"].append(f"{name} (needs {', '.join(sorted(missing))})")
                next_at = min(next_at, dl)
                prev = self.active_routes.get(name)
                if prev is not None:
                    routes[name] = prev
        listeners: list[Listener] = []
        for l in self.base.listeners:
            if l.rds_name and l.route_config is None and l.rds_name in routes:
                l = dataclasses.replace(l, route_config=routes[l.rds_name])
            listeners.append(l)
        for name, r in lds.items():
            l = r.model
            if l.rds_name:
                rc = routes.get(l.rds_name)
                if rc is not None:
                    l = dataclasses.replace(l, route_config=rc)
                else:
                    prev = self.active_listeners.get(name)
                    dl = deadline(r, r.updated_at if prev is not None else r.first_seen)
                    if now < dl:
                        warming["listeners"].append(name)
                        next_at = min(next_at, dl)
                        if prev is None:
                            continue
                        l = prev     # the old listener serves while the new one warms
                    # else: initial fetch timeout: serve it without routes (404 NR)
            listeners.append(l)
        seen: dict[tuple, str] = {}
        for l in listeners:
            key = (l.host, l.port)
            if l.port and key in seen:
                raise ConfigError(f"Listener {l.name!r}.address",
                                  f"{l.host}:{l.port} is already used by listener {seen[key]!r}")
            seen[key] = l.name
        self.warming = warming
        version = self._versions_text()
        snap = Snapshot(listeners=tuple(listeners), clusters=tuple(clusters), admin=self.base.admin,
                        version=version, tracing=self.base.tracing,
                        control_plane=self.base.control_plane, node=self.base.node,
                        source_format=self.base.source_format, metrics=self.base.metrics)
        return snap, next_at

    async def _rebuild(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        snap, next_at = self._build(now)
        cur = self.applied_snapshot or self.app.store.snapshot
        if cur is not None and cur.listeners == snap.listeners and cur.clusters == snap.clusters:
            self._arm(next_at)
            return
        await self.app.store.apply(snap)
        self.builds += 1
        self.applied_snapshot = snap
        # an EDS cluster keeps its live endpoints across a config update that carries none:
        # make the live set match the ClusterLoadAssignment (an empty one included)
        for c in snap.clusters:
            if c.type == "eds" and (c.eds_service_name or c.name) in self.types[R.EDS].resources:
                st = self.app.clusters.get(c.name)
                if st is not None and tuple(h.endpoint for h in st.hosts) != c.endpoints:
                    self.app.clusters.set_endpoints(c.name, c.endpoints)
        self.active_clusters = {c.name: c for c in snap.clusters}
        self.active_listeners = {l.name: l for l in snap.listeners}
        self.active_routes = {}
        for l in snap.listeners:
            if l.rds_name and l.route_config is not None:
                self.active_routes[l.rds_name] = l.route_config
        self._arm(next_at)
        self._gauges()

    async def _restore(self) -> None:
        """After a failed apply: put the last good snapshot back (clusters may have moved)."""
        snap = self.applied_snapshot or self.base
        try:
            await self.app.store.apply(snap)
        except Exception:  # noqa: BLE001
            log.exception("control plane: restoring the previous config failed")

    def _arm(self, at: float) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at < math.inf and not self._closed:
            delay = max(0.0, at - time.time()) + 0.01
            self._timer = asyncio.get_running_loop().call_later(delay, self._spawn, self._on_timer)

    async def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        async with self.lock:
            try:
                await self._rebuild()
            except Exception as e:  # noqa: BLE001
                log.error("control plane: warming timeout rebuild failed: %s", e)

    def _gauges(self) -> None:
        if not self.m_on:
            return
        warming_names = {"cds": set(self.warming["clusters"]), "lds": set(self.warming["listeners"]),
                         "rds": {w.split(" ", 1)[0] for w in self.warming["routes"]}, "eds": set()}
        for t, ts in self.types.items():
            s = R.short(t)
            w = len(warming_names[s] & set(ts.resources))
            self.m_resources.labels(s, "warming").set(w)
            self.m_resources.labels(s, "active").set(len(ts.resources) - w)

    # ---- last-known-good cache -------------------------------------------------------------
    def _cache_doc(self) -> tuple[dict, dict]:
        versions = {R.short(t): ts.version for t, ts in self.types.items()}
        res = {t: [{"name": r.name, "version": r.version, "resource": r.raw}
                   for r in ts.resources.values()] for t, ts in self.types.items()}
        return versions, res

    def _save_cache(self) -> None:
        if self.cache is None or self.lkg_active:
            # while serving from the cache, the file already holds exactly that
            return
        versions, res = self._cache_doc()
        self._save_pending = self.cache.encode(versions, res)
        if not self._saving:
            self._spawn(self._save_loop)

    async def _save_loop(self) -> None:
        self._saving = True
        loop = asyncio.get_running_loop()
        try:
            while self._save_pending is not None:
                data, self._save_pending = self._save_pending, None
                try:
                    await loop.run_in_executor(None, self.cache.write, data)
                    self.cache_status = "saved"
                    if self.m_on:
                        self.m_lkg_saves.labels("ok").inc()
                except OSError as e:
                    self.cache_status = f"save failed: {e}"
                    log.error("control plane: cannot write the last-known-good cache %s: %s",
                              self.cache.path, e)
                    if self.m_on:
                        self.m_lkg_saves.labels("error").inc()
        finally:
            self._saving = False

    async def _fallback_to_lkg(self, why: str) -> None:
        if self._lkg_tried or self.initialized or self._closed or self.contacted:
            return
        self._lkg_tried = True
        if self.cache is None:
            log.warning("control plane unreachable (%s); the last-known-good cache is disabled", why)
            return
        async with self.lock:
            if self.initialized:
                return
            outcome = "loaded"
            try:
                doc = self.cache.load()
                if doc is None:
                    outcome = "missing"
                    self.cache_status = "missing"
                    log.warning("control plane unreachable (%s); no last-known-good cache at %s",
                                why, self.cache.path)
                    return
                await self._load_cached(doc)
            except (lkg.CacheError, ConfigError, ConfigErrors, OSError) as e:
                outcome = "refused"
                self.cache_error = R.error_text(e)
                self.cache_status = f"refused: {self.cache_error}"
                log.error("control plane unreachable (%s); last-known-good cache REFUSED: %s",
                          why, self.cache_error)
                for ts in self.types.values():
                    ts.resources = {}
                await self._restore()
                return
            finally:
                if self.m_on:
                    self.m_lkg_loads.labels(outcome).inc()
            self.lkg_active = True
            self.lkg_loaded_at = time.time()
            self.cache.last_saved_at = float(doc.get("saved_at") or 0.0)
            self.cache_status = f"loaded (generation {doc.get('generation')})"
            if self.m_on:
                self.m_lkg_active.set(1)
            log.warning("control plane unreachable (%s): serving the last-known-good config from "
                        "%s (saved %s, versions %s)", why, self.cache.path,
                        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.cache.last_saved_at)),
                        self._versions_text())

    async def _load_cached(self, doc: dict) -> None:
        """Cached resources -> the same validation -> one snapshot (no warming: all is there)."""
        now = time.time()
        res = doc["resources"]
        versions = doc.get("versions") or {}
        top = {R.LDS: self.cfg.lds, R.CDS: self.cfg.cds}
        for t in R.ORDER:
            items = res.get(t, [])
            ts = self.types[t]
            spec = self._top(top[t]) if t in top and top[t] is not None else None
            key = spec.key if spec is not None else ("cache",)
            fake = _CacheSource(key)
            raws = []
            for i, it in enumerate(items):
                if not isinstance(it, dict) or not isinstance(it.get("resource"), dict):
                    raise lkg.CacheError(f"{R.short(t)} entry {i} is malformed")
                raws.append(it["resource"])
            if t in R.BY_NAME:
                # dependencies are resolved from the cached listeners/clusters first (ORDER)
                pass
            parsed = self._parse(fake, ts, "", raws, now)
            for it in items:
                r = parsed.get(R.resource_name(t, it["resource"]))
                if r is not None:
                    r.version = str(it.get("version", ""))
            ts.resources = parsed
            v = versions.get(R.short(t), "")
            if v:
                ts.versions[("cache",)] = v
        snap, _ = self._build(math.inf)
        await self.app.store.apply(snap)
        self.applied_snapshot = snap
        self.active_clusters = {c.name: c for c in snap.clusters}
        self.active_listeners = {l.name: l for l in snap.listeners}
        self.active_routes = {l.rds_name: l.route_config for l in snap.listeners
                              if l.rds_name and l.route_config is not None}
        self.warming = {"clusters": [], "listeners": [], "routes": []}
        self._subscribe_dependencies()
        self._gauges()

    # ---- visibility --------------------------------------------------------------------------
    def state(self) -> str:
        if self.initialized:
            return "synced"
        if self.lkg_active:
            return "serving_last_known_good"
        return "initializing"

    def dump(self) -> dict:
        types = {}
        warm = {"cds": set(self.warming["clusters"]), "lds": set(self.warming["listeners"]),
                "rds": {w.split(" ", 1)[0] for w in self.warming["routes"]}, "eds": set()}
        for t, ts in self.types.items():
            s = R.short(t)
            types[s] = {
                "type_url": t,
                "version": ts.version or None,
                "accepted": ts.accepted,
                "rejected": ts.rejected,
                "last_update": ts.last_update or None,
                "last_nack": ts.last_nack,
                "resources": [
                    {"name": r.name, "version": r.version, "last_updated": r.updated_at,
                     "status": "warming" if r.name in warm[s] else "active",
                     "source": ":".join(str(x) for x in r.source)}
                    for r in sorted(ts.resources.values(), key=lambda r: r.name)],
            }
        return {
            "api_type": self.cfg.api_type,
            "state": self.state(),
            "ready": self.not_ready_reason() or "ready",
            "node": self.node,
            "started_at": self.started_at,
            "initialized_at": self.initialized_at,
            "snapshot_builds": self.builds,
            "warming": self.warming,
            "last_nack": self.last_nack,
            "types": types,
            "sources": [t.dump() for t in self.transports.values()],
            "sds": self.sds.dump() if self.sds is not None else None,
            "cache": {
                "enabled": self.cache is not None,
                "path": self.cache.path if self.cache else None,
                "status": self.cache_status,
                "serving_from_cache": self.lkg_active,
                "generation": self.cache.generation if self.cache else None,
                "last_saved_at": (self.cache.last_saved_at or None) if self.cache else None,
            },
        }


class _CacheSource:
    """Stands in for a transport when resources come from the cache."""

    def __init__(self, key: tuple):
        self.key = key
        self.name = "cache"


async def start_control_plane(app, snap: Snapshot) -> ControlPlane:
    cp = ControlPlane(app, snap)
    await cp.start()
    return cp
