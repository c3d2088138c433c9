"""A native YAML document -> Snapshot, collecting every error with its path.

The concise native format (see docs/config.md) for people; Envoy v3 (control_plane_client.
translate) for control planes and Envoy users. Both produce the same frozen model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sidecar.config import wire as w
from sidecar.config.cluster import Cluster
from sidecar.config.control_plane import ControlPlaneConfig, control_plane_from_native
from sidecar.config.errors import ConfigError, ConfigErrors, ErrorCollector
from sidecar.config.filters import FilterCatalog
from sidecar.config.listener import Admin, Listener, SidecarConfig, TracingConfig
from sidecar.config.native.cluster import cluster_from_native
from sidecar.config.native.listener import listener_from_native, tracing_from_native
from sidecar.config.native.sidecar_mode import sidecar_from_native
from sidecar.config.snapshot import Snapshot, check_references
from sidecar.config.stores import StoresConfig, stores_from_native
from sidecar.config.telemetry import MetricsListener
from sidecar.config.wire import Raw

TOP_LEVEL = ("admin", "listeners", "clusters", "tracing", "control_plane", "node", "version",
             "sidecar", "metrics", "shared_state", "stores")

T = TypeVar("T")


def snapshot(d: Raw, filters: FilterCatalog) -> Snapshot:
    """Every error of the document is collected (``ConfigErrors``), not just the first."""
    errs = ErrorCollector()
    try:
        w.check_keys(d, TOP_LEVEL, "")
    except ConfigError as e:
        errs.capture(e)
    admin = Admin()
    if "admin" in d:
        try:
            a = w.check_keys(d["admin"], ("address", "port"), "admin")
            admin = Admin(host=w.string(a, "address", "admin", "127.0.0.1"),
                          port=w.integer(a, "port", "admin", 9901, lo=0, hi=65535))
        except ConfigError as e:
            errs.capture(e)

    def collect(key: str, parse: Callable[[Raw, str], T]) -> list[T]:
        out: list[T] = []
        items = d.get(key) or []
        if not isinstance(items, list):
            errs.add(key, "must be a list")
            return out
        for i, item in enumerate(items):
            try:
                out.append(parse(item, f"{key}[{i}]"))
            except (ConfigError, ConfigErrors) as e:
                errs.capture(e)
        return out

    clusters: list[Cluster] = collect("clusters", cluster_from_native)
    listeners: list[Listener] = collect("listeners", lambda x, p: listener_from_native(x, p, filters))
    sidecar: SidecarConfig | None = None
    if "sidecar" in d:     # sidecar mode: inbound + outbound listeners and the local_app cluster
        try:
            sidecar, more_l, more_c = sidecar_from_native(d["sidecar"], "sidecar", filters,
                                                          d.get("clusters"))
            listeners += more_l
            clusters += more_c
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    tracing = TracingConfig()
    if "tracing" in d:
        try:
            tracing = tracing_from_native(d["tracing"], "tracing")
        except ConfigError as e:
            errs.capture(e)
    control_plane: ControlPlaneConfig | None = None
    if d.get("control_plane"):
        try:
            control_plane = control_plane_from_native(d["control_plane"], "control_plane")
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    stores = StoresConfig()
    try:
        stores = stores_from_native(d)
    except ConfigError as e:
        errs.capture(e)
    metrics: MetricsListener | None = None
    if "metrics" in d:
        try:
            metrics = metrics_from_native(d["metrics"], "metrics", admin, listeners)
        except ConfigError as e:
            errs.capture(e)
    errs.raise_if_any()
    node = d.get("node")
    snap = Snapshot(listeners=tuple(listeners), clusters=tuple(clusters), admin=admin,
                    tracing=tracing, control_plane=control_plane,
                    node=node if isinstance(node, dict) else None, source_format="native",
                    version=str(d.get("version", "0")), sidecar=sidecar, metrics=metrics,
                    stores=stores)
    check_references(snap, native=True)
    return snap


def metrics_from_native(d: object, path: str, admin: Admin, listeners: list[Listener]
                        ) -> MetricsListener:
    """``metrics: {address: 0.0.0.0, port: 15090}``: the metrics-only listener."""
    m = w.check_keys(d, ("address", "port"), path)
    out = MetricsListener(host=w.string(m, "address", path, "0.0.0.0", nonempty=True),
                          port=w.integer(m, "port", path, 15090, lo=1, hi=65535))
    if out.port == admin.port:
        raise ConfigError(w.join(path, "port"), f"{out.port} is the admin port")
    for lst in listeners:
        if lst.port == out.port:
            raise ConfigError(w.join(path, "port"), f"{out.port} is listener {lst.name!r}'s port")
    return out
