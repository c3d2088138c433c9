"""What serves now: one snapshot from the static resources and the held dynamic ones.

Warming, as Envoy: a new EDS cluster joins once its ClusterLoadAssignment arrived, a new
listener once its RouteConfiguration arrived (or after ``initial_fetch_timeout``: then without).
Make-before-break: a RouteConfiguration naming clusters that are not serving yet is held back
(its previous version keeps serving) until they are, or until ``initial_fetch_timeout``, so a
route that moves traffic to a new cluster never sends a request to a cluster that is not there.
Pure: the caller passes the time, and rebuilds at ``Build.next_at`` while something warms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from control_plane_client.resources import CDS, LDS, RDS, LoadAssignment, Resource
from sidecar.config.cluster import Cluster
from sidecar.config.control_plane import SourceSpec
from sidecar.config.errors import ConfigError
from sidecar.config.listener import Listener
from sidecar.config.route import RouteAction, RouteConfig
from sidecar.config.snapshot import Snapshot


@dataclass(slots=True)
class Warming:
    """What waits, and for what."""
    clusters: list[str] = field(default_factory=list)            # EDS clusters: their assignment
    listeners: list[str] = field(default_factory=list)           # listeners: their routes
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # route: clusters it names

    def __bool__(self) -> bool:
        return bool(self.clusters or self.listeners or self.routes)

    def names(self, type_url: str) -> frozenset[str]:
        """The resources of a type that are warming."""
        if type_url == CDS:
            return frozenset(self.clusters)
        if type_url == LDS:
            return frozenset(self.listeners)
        if type_url == RDS:
            return frozenset(self.routes)
        return frozenset()

    def as_dict(self) -> dict[str, list[str]]:
        return {"clusters": list(self.clusters), "listeners": list(self.listeners),
                "routes": [f"{n} (needs {', '.join(m)})" for n, m in self.routes.items()]}


@dataclass(frozen=True, slots=True)
class Build:
    snapshot: Snapshot
    next_at: float                      # when warming next needs a look (or inf)
    warming: Warming


def route_cluster_refs(rc: RouteConfig) -> set[str]:
    """Every cluster a route configuration may send to (targets, weighted, mirrors)."""
    out: set[str] = set()
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            a = r.action
            if isinstance(a, RouteAction):
                if a.cluster:
                    out.add(a.cluster)
                out.update(w.name for w in a.weighted_clusters)
                out.update(m.cluster for m in a.mirrors)
    return out


def eds_service(c: Cluster) -> str:
    """The ClusterLoadAssignment name an EDS cluster takes its endpoints from."""
    return c.eds_service_name or c.name


def build_snapshot(base: Snapshot, *, clusters: Mapping[str, Resource[Cluster]],
                   assignments: Mapping[str, Resource[LoadAssignment]],
                   listeners: Mapping[str, Resource[Listener]],
                   routes: Mapping[str, Resource[RouteConfig]],
                   active_clusters: Mapping[str, Cluster],
                   active_listeners: Mapping[str, Listener],
                   active_routes: Mapping[str, RouteConfig],
                   initial_fetch_timeout: float, version: str, now: float) -> Build:
    """The snapshot to serve at ``now``: ``base`` (static) plus the dynamic resources held,
    warming applied; ``active_*`` is what serves now (the previous versions kept meanwhile).
    ConfigError when two listeners want one address."""
    next_at = math.inf
    warming = Warming()

    def deadline(dep: SourceSpec | None, since: float) -> float:
        t = dep.initial_fetch_timeout_s if dep and dep.initial_fetch_timeout_s is not None \
            else initial_fetch_timeout
        return since + t if t > 0 else math.inf

    def with_eds(c: Cluster) -> Cluster | None:
        cla = assignments.get(eds_service(c))
        if cla is not None:
            return dataclasses.replace(c, endpoints=cla.model[1])
        return None

    serve_clusters: list[Cluster] = []
    for c in base.clusters:
        if c.type == "eds" and not c.endpoints:
            c = with_eds(c) or c
        serve_clusters.append(c)
    for name, cr in clusters.items():
        c = cr.model
        if c.type == "eds":
            ce = with_eds(c)
            if ce is None:
                prev = active_clusters.get(name)
                if prev is not None and prev.type == "eds" and eds_service(prev) == eds_service(c):
                    ce = dataclasses.replace(c, endpoints=prev.endpoints)
                else:
                    dl = deadline(cr.dep, cr.first_seen)
                    if now < dl:
                        warming.clusters.append(name)
                        next_at = min(next_at, dl)
                        continue
                    ce = c      # initial fetch timeout: serve it without endpoints
            c = ce
        serve_clusters.append(c)
    serving = {c.name for c in serve_clusters}

    serve_routes: dict[str, RouteConfig] = {}
    for name, rr in routes.items():
        missing = route_cluster_refs(rr.model) - serving
        dl = deadline(rr.dep, rr.updated_at)
        if not missing or now >= dl:
            serve_routes[name] = rr.model
        else:
            warming.routes[name] = tuple(sorted(missing))
            next_at = min(next_at, dl)
            prev_rc = active_routes.get(name)
            if prev_rc is not None:
                serve_routes[name] = prev_rc       # make before break

    serve_listeners: list[Listener] = []
    for lc in base.listeners:
        if lc.rds_name and lc.route_config is None and lc.rds_name in serve_routes:
            lc = dataclasses.replace(lc, route_config=serve_routes[lc.rds_name])
        serve_listeners.append(lc)
    for name, lr in listeners.items():
        lc = lr.model
        if lc.rds_name:
            rc = serve_routes.get(lc.rds_name)
            if rc is not None:
                lc = dataclasses.replace(lc, route_config=rc)
            else:
                prev_l = active_listeners.get(name)
                dl = deadline(lr.dep, lr.updated_at if prev_l is not None else lr.first_seen)
                if now < dl:
                    warming.listeners.append(name)
                    next_at = min(next_at, dl)
                    if prev_l is None:
                        continue
                    lc = prev_l     # the old listener serves while the new one warms
                # else: initial fetch timeout: serve it without routes (404 NR)
        serve_listeners.append(lc)

    seen: dict[tuple[str, int], str] = {}
    for lc in serve_listeners:
        addr = (lc.host, lc.port)
        if lc.port and addr in seen:
            raise ConfigError(f"Listener {lc.name!r}.address",
                              f"{lc.host}:{lc.port} is already used by listener {seen[addr]!r}")
        seen[addr] = lc.name
    # (dataclasses.replace keeps every other part of the static config, e.g. sidecar mode)
    snap = dataclasses.replace(base, listeners=tuple(serve_listeners),
                               clusters=tuple(serve_clusters), version=version)
    return Build(snap, next_at, warming)
