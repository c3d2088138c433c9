"""The whole config at one moment: what both ways in (native YAML, Envoy v3) produce, and what
the config store applies in one swap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    original_dst = frozenset(c.name for c in snap.clusters if c.type == "original_dst")
    ports: dict[tuple[str, int], int] = {}
    for li, lst in enumerate(snap.listeners):
        key = (lst.host, lst.port)
        if key in ports and lst.port != 0:
            errs.add(f"{base}listeners[{li}].address",
                     f"{lst.host}:{lst.port} is already used by listeners[{ports[key]}]")
        ports[key] = li
        lp = f"{base}listeners[{li}]"
        if not lst.l4:
            _check_routes(lst, lp, "" if native else ".filter_chains[0].filters[0].typed_config",
                          native, names, errs, original_dst)
            continue
        src = lst.source if isinstance(lst.source, dict) else {}
        chains = [(f".filter_chains[{ci}]", c) for ci, c in enumerate(lst.filter_chains)]
        if lst.default_filter_chain is not None:
            chains.append((".default_filter_chain", lst.default_filter_chain))
        for cp, chain in chains:
            # a native TCP listener written flat (tcp_proxy at the listener) has no chain path
            cpath = lp + cp if not native or "filter_chains" in src or "default_filter_chain" \
                in src else lp
            if chain.http is not None:
                _check_routes(chain.http, cpath, "" if native else ".filters[0].typed_config",
                              native, names, errs, original_dst)
            elif chain.tcp is not None:
                tp = (f"{cpath}.tcp_proxy" if native else
                      f"{cpath}.filters[{_tcp_proxy_index(src, cp)}].typed_config")
                tcp = chain.tcp
                for wi, cname in enumerate(tcp.cluster_names):
                    if cname not in names:
                        errs.add(f"{tp}.cluster" if tcp.cluster else
                                 f"{tp}.weighted_clusters" + ("" if native else ".clusters")
                                 + f"[{wi}].name", f"unknown cluster {cname!r}")
    errs.raise_if_any()


def _tcp_proxy_index(src: dict[str, Any], chain_path: str) -> int:
    """The index of tcp_proxy (last) among an Envoy chain's filters, for error paths."""
    try:
        if chain_path == ".default_filter_chain":
            chain = src["default_filter_chain"]
        else:
            chain = src["filter_chains"][int(chain_path.split("[")[1].rstrip("]"))]
        return len(chain["filters"]) - 1
    except (KeyError, IndexError, TypeError, ValueError):
        return 0


def _check_routes(lst: Listener, lp: str, hcm_path: str, native: bool, names: dict[str, int],
                  errs: ErrorCollector, original_dst: frozenset[str] = frozenset()) -> None:
    if lst.route_config is None:
        return
    flat = native and isinstance(lst.source, dict) and "routes" in lst.source
    for vi, vh in enumerate(lst.route_config.virtual_hosts):
        for ri, r in enumerate(vh.routes):
            a = r.action
            if not isinstance(a, RouteAction):
                continue
            if flat:
                p = f"{lp}.routes[{ri}]"
            elif native:
                p = f"{lp}.virtual_hosts[{vi}].routes[{ri}]"
            else:
                p = f"{lp}{hcm_path}.route_config.virtual_hosts[{vi}].routes[{ri}].route"
            targets = [a.cluster] if a.cluster else [x.name for x in a.weighted_clusters]
            targets += [m.cluster for m in a.mirrors]
            for t in targets:
                if t not in names:
                    errs.add(p, f"unknown cluster {t!r}")
                elif t in original_dst:
                    errs.add(p, f"cluster {t!r} is ORIGINAL_DST: it serves tcp_proxy only "
                                "(HTTP routes to the original destination are not supported)")
