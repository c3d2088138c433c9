"""The resource state machine: what the control plane sent, what was accepted, what serves.

Pure: no sockets, no event loop, no clock (callers pass ``now``), so every decision below is
unit-tested directly (tests/unit/control_plane_client/). The client (``client.py``) feeds it
responses and carries out what it decides.

One response, for one type, from one source::

    receive()  translate every resource (the same code as a bootstrap file)
        invalid -> ConfigError(s): the caller NACKs it (reject()); nothing held changes
        state of the world (LDS, CDS): the source's previous set is replaced (missing = removed)
        by name (RDS, EDS): only the names some listener / cluster needs are kept
    -> Update: nothing changed | endpoints only, for EDS clusters already serving | rebuild
    commit() once served, or revert() when serving it failed (then it is a NACK after all)

build(now) is the snapshot to serve (``warming.py``: warming and make-before-break).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from control_plane_client.cache import CacheError
from control_plane_client.resources import (
    ASSIGNMENTS,
    BY_NAME,
    CDS,
    CLUSTERS,
    EDS,
    LDS,
    LISTENERS,
    RDS,
    ROUTES,
    Dependency,
    LoadAssignment,
    Resource,
    ResourceType,
    SourceKey,
    eds_source,
    hcm_rds_source,
    resource_name,
    short,
    unwrap,
)
from control_plane_client.translate.dynamic import config_source
from control_plane_client.warming import Build, Warming, build_snapshot, eds_service
from sidecar.config.cluster import Cluster, Endpoint
from sidecar.config.control_plane import ControlPlaneConfig, SourceSpec
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.listener import Listener
from sidecar.config.route import RouteConfig
from sidecar.config.snapshot import Snapshot

log = logging.getLogger("sidecar.xds")

M = TypeVar("M")
CACHE_KEY: SourceKey = ("cache",)


@dataclass(frozen=True, slots=True)
class Nack:
    """The last rejection of one type."""
    type: str                           # lds, rds, cds, eds
    version: str
    error: str
    at: float
    source: str

    def as_dict(self, *, with_type: bool = False) -> dict[str, object]:
        d: dict[str, object] = {"version": self.version, "error": self.error, "at": self.at,
                                "source": self.source}
        return {"type": self.type, **d} if with_type else d


class TypeState(Generic[M]):
    """The resources of one type, the versions accepted per source, and the counters."""

    def __init__(self, rtype: ResourceType[M]) -> None:
        self.rtype = rtype
        self.type_url = rtype.type_url
        self.resources: dict[str, Resource[M]] = {}
        self.versions: dict[SourceKey, str] = {}    # per source, last accepted
        self.accepted = 0
        self.rejected = 0
        self.last_update = 0.0
        self.last_nack: Nack | None = None
        self.synced_sources: set[SourceKey] = set()

    @property
    def version(self) -> str:
        return ",".join(v for _, v in sorted(self.versions.items(), key=lambda kv: str(kv[0])) if v)

    def parse(self, raws: Sequence[object], source: SourceKey, version: str, now: float, *,
              static_names: Collection[str],
              resolve: Callable[[Dependency], SourceSpec]) -> dict[str, Resource[M]]:
        """Translate a response; ConfigErrors listing every bad resource. An unchanged resource
        (same content, same source) is kept as it was: its version and time stay."""
        rt = self.rtype
        errors: list[ConfigError] = []
        parsed: dict[str, Resource[M]] = {}
        for i, item in enumerate(raws):
            try:
                d = unwrap(self.type_url, item, f"{rt.kind}[{i}]")
                name = resource_name(self.type_url, d)
                path = f"{rt.kind} {name!r}"
                if name in parsed:
                    raise ConfigError(path, "is in the response twice")
                if name in static_names:
                    raise ConfigError(path, f"has the name of a static {rt.kind.lower()}; static "
                                      "resources cannot be replaced by the control plane")
                model = rt.translate(d, path)
                need = rt.needs(model, d, path)
                dep = resolve(need) if need is not None else None
                old = self.resources.get(name)
                if old is not None and old.raw == d and old.source == source:
                    parsed[name] = old
                else:
                    parsed[name] = Resource(name, d, model, version, now,
                                            old.first_seen if old is not None else now, source,
                                            dep, need.name if need is not None else "")
            except ConfigErrors as e:
                errors.extend(e.errors)
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise ConfigErrors(errors)
        return parsed

    def merged(self, parsed: dict[str, Resource[M]], source: SourceKey,
               wanted: Collection[str]) -> dict[str, Resource[M]]:
        """The resources after this response: state of the world replaces what ``source`` held
        before; by name keeps only the names ``wanted``."""
        if self.rtype.state_of_the_world:
            new = {n: r for n, r in self.resources.items() if r.source != source}
            for n in parsed:
                if n in new:
                    raise ConfigError(f"{self.rtype.kind} {n!r}", "also served by another source")
            new.update(parsed)
            return new
        new = dict(self.resources)
        for n, r in parsed.items():
            if n in wanted:
                new[n] = r
        return new

    def describe(self, warming: Collection[str]) -> dict[str, object]:
        return {
            "type_url": self.type_url,
            "version": self.version or None,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "last_update": self.last_update or None,
            "last_nack": self.last_nack.as_dict() if self.last_nack is not None else None,
            "resources": [
                {"name": r.name, "version": r.version, "last_updated": r.updated_at,
                 "status": "warming" if r.name in warming else "active",
                 "source": ":".join(str(x) for x in r.source)}
                for r in sorted(self.resources.values(), key=lambda r: r.name)],
        }


AnyTypeState = TypeState[Cluster] | TypeState[LoadAssignment] | TypeState[Listener] | \
    TypeState[RouteConfig]


@dataclass(frozen=True, slots=True)
class Update:
    """An accepted response, staged: the new resources are held; serving them is the caller's.

    ``changed`` empty: nothing to serve. ``endpoints`` set: only endpoints of EDS clusters that
    already serve changed (set them in place, endpoint state kept). Otherwise: rebuild."""
    type_url: str
    source: SourceKey
    version: str
    count: int                                   # resources in the response
    changed: tuple[str, ...]
    endpoints: tuple[tuple[str, tuple[Endpoint, ...]], ...] | None
    restore: Callable[[], None]                  # put the previous resources back


def _with_timeout(source: SourceSpec, named: SourceSpec) -> SourceSpec:
    """``source`` (the ADS stream, or the parent's source) with the ``initial_fetch_timeout``
    of the ConfigSource that named it, when it has one."""
    if named.initial_fetch_timeout_s is None:
        return source
    return dataclasses.replace(source, initial_fetch_timeout_s=named.initial_fetch_timeout_s)


class ResourceState:
    """Every type's resources, what serves, and what waits."""

    def __init__(self, cfg: ControlPlaneConfig, base: Snapshot) -> None:
        self.cfg = cfg
        self.base = base                      # the static part (bootstrap / native file)
        self.cds = TypeState(CLUSTERS)
        self.eds = TypeState(ASSIGNMENTS)
        self.lds = TypeState(LISTENERS)
        self.rds = TypeState(ROUTES)
        self.active_clusters: dict[str, Cluster] = {}
        self.active_listeners: dict[str, Listener] = {}
        self.active_routes: dict[str, RouteConfig] = {}
        self.warming = Warming()
        self.applied: Snapshot | None = None  # the last snapshot served
        self.last_nack: Nack | None = None

    # ---- lookups ----------------------------------------------------------------------------
    def types(self) -> Iterator[AnyTypeState]:
        """Every type, in ORDER (clusters, endpoints, listeners, routes)."""
        yield self.cds
        yield self.eds
        yield self.lds
        yield self.rds

    def type_state(self, type_url: str) -> AnyTypeState:
        for ts in self.types():
            if ts.type_url == type_url:
                return ts
        raise KeyError(type_url)

    def version_text(self) -> str:
        return " ".join(f"{short(ts.type_url)}={ts.version or '-'}" for ts in self.types())

    def top_source(self, type_url: str) -> SourceSpec | None:
        """The source LDS or CDS is subscribed from (the ADS stream for ``ads``)."""
        spec = self.cfg.lds if type_url == LDS else self.cfg.cds if type_url == CDS else None
        if spec is not None and spec.kind == "ads":
            return self.cfg.ads or spec
        return spec

    # ---- sources of dependent resources ---------------------------------------------------
    def resolve(self, spec: SourceSpec | None, parent: SourceSpec | None) -> SourceSpec:
        """The SourceSpec a dependent resource (RDS/EDS) is fetched from; ``parent``: the source
        of the resource naming it (for ``self``)."""
        cfg = self.cfg
        if cfg.default is not None:           # native: one source for everything
            return cfg.default
        if spec is None:
            raise ConfigError("config_source", "is required")
        if spec.kind == "self":
            if parent is None:
                raise ConfigError("config_source.self", "no source to refer to")
            return _with_timeout(parent, spec)
        if spec.kind == "ads":
            if cfg.ads is None:
                raise ConfigError("config_source.ads", "ADS is not configured "
                                  "(dynamic_resources.ads_config)")
            return _with_timeout(cfg.ads, spec)
        if spec.kind in ("rest", "grpc") and self.base.cluster(spec.cluster) is None:
            raise ConfigError("config_source.api_config_source.cluster_names",
                              f"{spec.cluster!r} is not a static cluster")
        return spec

    def _resolver(self, parent: SourceSpec | None) -> Callable[[Dependency], SourceSpec]:
        def resolve(dep: Dependency) -> SourceSpec:
            src = dep.config_source
            return self.resolve(config_source(src, dep.path) if src is not None else None, parent)
        return resolve

    def _static_dep(self, raw: object, listener: bool) -> SourceSpec | None:
        """The source of what a static listener (RDS) or EDS cluster needs; None: unusable."""
        if self.cfg.default is not None:
            return self.cfg.default
        src = hcm_rds_source(raw) if listener else eds_source(raw)
        if src is None:
            return None
        try:
            return self.resolve(config_source(src, "static"), None)
        except ConfigError as e:
            log.error("static resource needs a config source the client cannot use: %s", e)
            return None

    def wanted(self, type_url: str) -> dict[str, SourceSpec]:
        """RDS/EDS names the current listeners/clusters need, with their sources."""
        out: dict[str, SourceSpec | None] = {}
        if type_url == RDS:
            for lr in self.lds.resources.values():
                if lr.dep_name:
                    out[lr.dep_name] = lr.dep
            for lc in self.base.listeners:
                if lc.rds_name and lc.route_config is None:
                    out.setdefault(lc.rds_name, self._static_dep(lc.source, True))
        else:
            for cr in self.cds.resources.values():
                if cr.dep_name:
                    out[cr.dep_name] = cr.dep
            for c in self.base.clusters:
                if c.type == "eds" and not c.endpoints:
                    out.setdefault(eds_service(c), self._static_dep(c.source, False))
        return {k: v for k, v in out.items() if v is not None}

    def subscriptions(self) -> dict[str, list[tuple[SourceSpec, frozenset[str]]]]:
        """For RDS and EDS: which names to ask each source for."""
        out: dict[str, list[tuple[SourceSpec, frozenset[str]]]] = {}
        for type_url in BY_NAME:
            per: dict[SourceKey, set[str]] = {}
            specs: dict[SourceKey, SourceSpec] = {}
            for name, spec in self.wanted(type_url).items():
                per.setdefault(spec.key, set()).add(name)
                specs[spec.key] = spec
            out[type_url] = [(specs[k], frozenset(names)) for k, names in per.items()]
        return out

    def forget_unwanted(self) -> None:
        """Drop RDS/EDS resources no listener or cluster needs any more."""
        for ts in (self.rds, self.eds):
            wanted = self.wanted(ts.type_url)
            for n in [n for n in ts.resources if n not in wanted]:
                del ts.resources[n]

    # ---- responses -----------------------------------------------------------------------------
    def synced(self, type_url: str, source: SourceKey) -> None:
        """A state-of-the-world source answered for its type (initial sync)."""
        if type_url == LDS:
            self.lds.synced_sources.add(source)
        elif type_url == CDS:
            self.cds.synced_sources.add(source)

    def unsynced(self) -> list[str]:
        """The subscribed state-of-the-world types no source answered for yet."""
        return [short(ts.type_url) for ts, spec in ((self.lds, self.cfg.lds), (self.cds, self.cfg.cds))
                if spec is not None and not ts.synced_sources]

    def receive(self, type_url: str, source: SourceSpec, version: str,
                raws: Sequence[object], now: float) -> Update:
        """Stage one response; ConfigError(s) when it is refused (a NACK: nothing changed)."""
        if type_url == CDS:
            return self._receive(self.cds, source, version, raws, now)
        if type_url == EDS:
            return self._receive(self.eds, source, version, raws, now)
        if type_url == LDS:
            return self._receive(self.lds, source, version, raws, now)
        if type_url == RDS:
            return self._receive(self.rds, source, version, raws, now)
        raise ConfigError("type_url", f"unsupported resource type {type_url}")

    def _receive(self, ts: TypeState[M], source: SourceSpec, version: str,
                 raws: Sequence[object], now: float) -> Update:
        key = source.key
        parsed = ts.parse(raws, key, version, now, static_names=self._static_names(ts.type_url),
                          resolve=self._resolver(source))
        wanted = self.wanted(ts.type_url) if ts.type_url in BY_NAME else ()
        new = ts.merged(parsed, key, wanted)
        old = ts.resources
        changed = tuple(n for n in set(new) | set(old) if new.get(n) is not old.get(n))
        ts.resources = new

        def restore() -> None:
            ts.resources = old

        endpoints = self._endpoint_only(changed) if changed and ts.type_url == EDS else None
        return Update(ts.type_url, key, version, len(parsed), changed, endpoints, restore)

    def _static_names(self, type_url: str) -> frozenset[str]:
        if type_url == CDS:
            return frozenset(c.name for c in self.base.clusters)
        if type_url == LDS:
            return frozenset(lc.name for lc in self.base.listeners)
        return frozenset()

    def _endpoint_only(self, changed: Sequence[str]
                       ) -> tuple[tuple[str, tuple[Endpoint, ...]], ...] | None:
        """Endpoint-only change for clusters already serving: (cluster, endpoints) to set in
        place; None when the snapshot must be rebuilt."""
        eds = self.eds.resources
        by_service: dict[str, list[str]] = {}
        for name, c in self.active_clusters.items():
            if c.type == "eds":
                by_service.setdefault(eds_service(c), []).append(name)
        if any(n not in by_service or n not in eds for n in changed):
            return None
        if self.warming.clusters or self.warming.routes:
            return None          # something waits for clusters: rebuild, it may now be ready
        return tuple((cname, eds[svc].model[1]) for svc in changed for cname in by_service[svc])

    def commit(self, update: Update, now: float) -> None:
        """The update serves: record its version."""
        ts = self.type_state(update.type_url)
        ts.versions.pop(CACHE_KEY, None)
        ts.versions[update.source] = update.version
        ts.accepted += 1
        if update.changed:
            ts.last_update = now
        for cname, eps in update.endpoints or ():
            self.active_clusters[cname] = dataclasses.replace(self.active_clusters[cname],
                                                              endpoints=eps)

    def revert(self, update: Update) -> None:
        """Serving the update failed: the previous resources are held again."""
        update.restore()

    def reject(self, type_url: str, source: str, version: str, error: str, now: float) -> Nack:
        ts = self.type_state(type_url)
        ts.rejected += 1
        ts.last_nack = self.last_nack = Nack(short(type_url), version, error, now, source)
        return ts.last_nack

    # ---- what to serve ----------------------------------------------------------------------
    def build(self, now: float) -> Build:
        """The snapshot to serve now (warming applied); sets ``warming``."""
        b = build_snapshot(self.base, clusters=self.cds.resources, assignments=self.eds.resources,
                           listeners=self.lds.resources, routes=self.rds.resources,
                           active_clusters=self.active_clusters,
                           active_listeners=self.active_listeners,
                           active_routes=self.active_routes,
                           initial_fetch_timeout=self.cfg.initial_fetch_timeout_s,
                           version=self.version_text(), now=now)
        self.warming = b.warming
        return b

    def serving(self, snap: Snapshot) -> None:
        """``snap`` was applied: it is what serves now."""
        self.applied = snap
        self.active_clusters = {c.name: c for c in snap.clusters}
        self.active_listeners = {lc.name: lc for lc in snap.listeners}
        self.active_routes = {lc.rds_name: lc.route_config for lc in snap.listeners
                              if lc.rds_name and lc.route_config is not None}

    def assignments(self, snap: Snapshot) -> list[tuple[str, tuple[Endpoint, ...]]]:
        """(cluster, endpoints) of each EDS cluster of ``snap`` that has its assignment: a
        cluster keeps its live endpoints across a config update that carries none, so the
        caller makes the live set match these (an empty one included)."""
        return [(c.name, c.endpoints) for c in snap.clusters
                if c.type == "eds" and eds_service(c) in self.eds.resources]

    # ---- the last-known-good cache --------------------------------------------------------------
    def cache_document(self) -> tuple[dict[str, str], dict[str, list[dict[str, object]]]]:
        """(versions by short type, resources by type URL) to persist."""
        versions = {short(ts.type_url): ts.version for ts in self.types()}
        res: dict[str, list[dict[str, object]]] = {
            ts.type_url: [{"name": r.name, "version": r.version, "resource": r.raw}
                          for r in ts.resources.values()] for ts in self.types()}
        return versions, res

    def load_cached(self, doc: Mapping[str, object], now: float) -> Snapshot:
        """Cached resources -> the same validation -> one snapshot (no warming: all is there).
        CacheError / ConfigError(s) when the cache cannot be used (call ``clear()`` then)."""
        res = doc.get("resources")
        versions = doc.get("versions") or {}
        if not isinstance(res, dict) or not isinstance(versions, dict):
            raise CacheError("resources and versions must be mappings")
        # in ORDER: dependencies are resolved from the cached listeners/clusters first
        self._load_type(self.cds, res, versions, now)
        self._load_type(self.eds, res, versions, now)
        self._load_type(self.lds, res, versions, now)
        self._load_type(self.rds, res, versions, now)
        snap = self.build(math.inf).snapshot
        self.warming = Warming()
        return snap

    def _load_type(self, ts: TypeState[M], resources: Mapping[object, object],
                   versions: Mapping[object, object], now: float) -> None:
        items = resources.get(ts.type_url, [])
        version = versions.get(short(ts.type_url), "")
        if not isinstance(items, list):
            raise CacheError(f"{short(ts.type_url)} entries must be a list")
        raws: list[object] = []
        for i, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("resource"), dict):
                raise CacheError(f"{short(ts.type_url)} entry {i} is malformed")
            raws.append(it["resource"])
        spec = self.top_source(ts.type_url)
        parsed = ts.parse(raws, spec.key if spec is not None else CACHE_KEY, "", now,
                          static_names=self._static_names(ts.type_url),
                          resolve=self._resolver(spec))
        for it in items:
            r = parsed.get(resource_name(ts.type_url, it["resource"]))
            if r is not None:
                r.version = str(it.get("version", ""))
        ts.resources = parsed
        if version:
            ts.versions[CACHE_KEY] = str(version)

    def clear(self) -> None:
        """Forget every resource (a refused cache)."""
        for ts in self.types():
            ts.resources = {}

    # ---- visibility ---------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        return {short(ts.type_url): ts.describe(self.warming.names(ts.type_url))
                for ts in self.types()}

    def counts(self) -> list[tuple[str, int, int]]:
        """(type, active, warming) resource counts."""
        out = []
        for ts in self.types():
            w = len(self.warming.names(ts.type_url) & set(ts.resources))
            out.append((short(ts.type_url), len(ts.resources) - w, w))
        return out

