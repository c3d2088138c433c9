"""The whole config at one moment: what both ways in (native YAML, Envoy v3) produce, and what
the config store applies in one swap."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config.cluster import Cluster
from sidecar.config.control_plane import ControlPlaneConfig
from sidecar.config.errors import ErrorCollector
from sidecar.config.listener import Admin, Listener, SidecarConfig, TracingConfig
from sidecar.config.route import RouteAction
from sidecar.config.stores import StoresConfig
from sidecar.config.telemetry import MetricsListener


@dataclass(frozen=True, slots=True)
class Snapshot:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    admin: Admin = Admin()
    version: str = "0"
    tracing: TracingConfig = TracingConfig()
    control_plane: ControlPlaneConfig | None = None   # when resources come from xDS
    node: dict[str, object] | None = None             # the xDS node identity, as given
    source_format: str = "native"        # native | envoy
    sidecar: SidecarConfig | None = None  # native `sidecar:` section (sidecar mode)
    stores: StoresConfig = StoresConfig()  # shared_state sizes and named Redis stores
    metrics: MetricsListener | None = None   # the metrics-only listener (worker 0)

    def cluster(self, name: str) -> Cluster | None:
        for c in self.clusters:
            if c.name == name:
                return c
        return None


def check_references(snap: Snapshot, native: bool = False) -> None:
    """Every cluster a route names must exist; names and addresses must be unique."""
    errs = ErrorCollector()
    base = "" if native else "static_resources."
    names: dict[str, int] = {}
    for i, c in enumerate(snap.clusters):
        if c.name in names:
            errs.add(f"{base}clusters[{i}].name", f"duplicate cluster name {c.name!r}")
        names[c.name] = i
    ports: dict[tuple[str, int], int] = {}
    for li, lst in enumerate(snap.listeners):
        key = (lst.host, lst.port)
        if key in ports and lst.port != 0:
            errs.add(f"{base}listeners[{li}].address",
                     f"{lst.host}:{lst.port} is already used by listeners[{ports[key]}]")
        ports[key] = li
        if lst.route_config is None:
            continue
        flat = native and isinstance(lst.source, dict) and "routes" in lst.source
        for vi, vh in enumerate(lst.route_config.virtual_hosts):
            for ri, r in enumerate(vh.routes):
                a = r.action
                if not isinstance(a, RouteAction):
                    continue
                if flat:
                    p = f"listeners[{li}].routes[{ri}]"
                elif native:
                    p = f"listeners[{li}].virtual_hosts[{vi}].routes[{ri}]"
                else:
                    p = (f"{base}listeners[{li}].filter_chains[0].filters[0].typed_config."
                         f"route_config.virtual_hosts[{vi}].routes[{ri}].route")
                targets = [a.cluster] if a.cluster else [x.name for x in a.weighted_clusters]
                targets += [m.cluster for m in a.mirrors]
                for t in targets:
                    if t not in names:
                        errs.add(p, f"unknown cluster {t!r}")
    errs.raise_if_any()
