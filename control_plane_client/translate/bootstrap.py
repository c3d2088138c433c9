"""An Envoy v3 bootstrap -> Snapshot (static resources; ``dynamic_resources`` become the control
plane config), collecting every error with its path."""

from __future__ import annotations

from collections.abc import Callable

from control_plane_client.translate.cluster import cluster
from control_plane_client.translate.common import socket_address
from control_plane_client.translate.dynamic import control_plane_from_bootstrap
from control_plane_client.translate.listener import listener
from control_plane_client.translate.telemetry import admin_clusters, check_metrics_port, stats_listener
from control_plane_client.translate.tls import Secrets, secrets_from_envoy
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError, ConfigErrors, ErrorCollector
from sidecar.config.listener import Admin, TracingConfig
from sidecar.config.snapshot import Snapshot, check_references
from sidecar.config.telemetry import MetricsListener


def _collect(items: list, path: str, fn: Callable, errs: ErrorCollector) -> list:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(fn(item, w.join(path, i)))
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    return out


def bootstrap(d: dict) -> Snapshot:
    """An Envoy v3 bootstrap -> Snapshot (static parts; dynamic_resources kept for the client)."""
    errs = ErrorCollector()
    try:
        # layered_runtime, stats_flush_interval, overload_manager, stats sinks...: refused by
        # name (nothing here would honour them)
        w.check_keys(d, ("node", "admin", "static_resources", "dynamic_resources"), "")
    except ConfigError as e:
        errs.capture(e)
    admin = Admin()
    if "admin" in d:
        try:
            a = w.check_keys(d["admin"], ("address",), "admin")
            host, prt = socket_address(w.mapping(a, "address", "admin"), "admin.address")
            admin = Admin(host=host, port=prt)
        except ConfigError as e:
            errs.capture(e)
    sr = d.get("static_resources") or {}
    try:
        w.check_keys(sr, ("listeners", "clusters", "secrets"), "static_resources")
    except ConfigError as e:
        errs.capture(e)
    secrets: Secrets = {}
    try:
        secrets = secrets_from_envoy(w.seq(sr, "secrets", "static_resources", []),
                                     "static_resources.secrets")
    except ConfigError as e:
        errs.capture(e)
    clusters = _collect(sr.get("clusters") or [], "static_resources.clusters",
                        lambda c, p: cluster(c, p, secrets), errs)
    # Istio's 15090 listener (routes to the admin) is the metrics-only listener, not a proxy
    admin_names = admin_clusters(clusters, admin)
    metrics: MetricsListener | None = None
    metrics_path = ""
    proxied: list = []
    for i, raw in enumerate(w.seq(sr, "listeners", "static_resources", []) if isinstance(sr, dict) else []):
        lp = w.join("static_resources.listeners", i)
        try:
            m = stats_listener(raw, lp, admin_names) if isinstance(raw, dict) else None
        except ConfigError as e:
            errs.capture(e)
            continue
        if m is None:
            proxied.append((lp, raw))
        elif metrics is not None:
            errs.add(lp, f"a second metrics listener ({metrics_path} is the first)")
        else:
            metrics, metrics_path = m, lp
    listeners = []
    for lp, raw in proxied:
        try:
            listeners.append(listener(raw, lp, None, secrets))
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    if metrics is not None:
        try:
            check_metrics_port(metrics, metrics_path, admin, listeners)
        except ConfigError as e:
            errs.capture(e)
    control_plane = None
    if d.get("dynamic_resources"):
        try:
            control_plane = control_plane_from_bootstrap(d, "dynamic_resources")
        except (ConfigError, ConfigErrors) as e:
            errs.capture(e)
    tracing = TracingConfig()
    traced = [(i, lst.tracing) for i, lst in enumerate(listeners) if lst.tracing is not None]
    if traced:
        tracing = traced[0][1]
        for i, t in traced[1:]:
            if t != tracing:
                errs.add(f"static_resources.listeners[{i}].filter_chains[0].filters[0]."
                         "typed_config.tracing", "every listener must use the same tracing "
                         "config (one tracer per process)")
    if control_plane is None or control_plane.ads is None:
        # SDS references need the ADS stream their secrets come over
        for kind, items in (("listeners", listeners), ("clusters", clusters)):
            for item in items:
                if item.tls is not None and item.tls.secrets:
                    errs.add(f"static_resources.{kind}[{item.name!r}]", "names SDS secrets ("
                             f"{', '.join(item.tls.secrets)}) with sds_config {{ads: {{}}}}, but "
                             "there is no dynamic_resources.ads_config")
    errs.raise_if_any()
    snap = Snapshot(listeners=tuple(listeners), clusters=tuple(clusters), admin=admin,
                    source_format="envoy", control_plane=control_plane, node=d.get("node"),
                    tracing=tracing, metrics=metrics)
    check_references(snap)
    return snap
