"""The native ``sidecar:`` section (sidecar mode): inbound and outbound listeners and the
``local_app`` cluster, from a few lines (see ``sidecar.runtime.sidecar_mode``)."""

from __future__ import annotations

from typing import Any

from sidecar.config import wire as w
from sidecar.config.cluster import Cluster
from sidecar.config.errors import ConfigError
from sidecar.config.filters import FilterCatalog
from sidecar.config.http2 import UPSTREAM_PROTOCOLS
from sidecar.config.listener import APP_CLUSTER, Listener, SidecarConfig
from sidecar.config.native.cluster import cluster_from_native
from sidecar.config.native.listener import listener_from_native
from sidecar.config.route import RouteAction

_KEYS = ("service", "app", "app_protocol", "app_health", "inbound", "outbound")


def _app_address(v: Any, path: str) -> tuple[str, int]:
    if isinstance(v, bool):
        raise ConfigError(path, "must be a port or host:port")
    if isinstance(v, int):
        host, port = "127.0.0.1", v
    elif isinstance(v, str):
        host, sep, p = v.rpartition(":")
        if not sep:
            host, p = "127.0.0.1", v
        if not p.isdigit() or not host:
            raise ConfigError(path, f"must be a port or host:port, got {v!r}")
        port = int(p)
    else:
        raise ConfigError(path, "must be a port or host:port")
    if not 1 <= port <= 65535:
        raise ConfigError(path, "port must be 1..65535")
    return host.strip("[]"), port


def _check_routes(listener: Listener, path: str, known: set[str]) -> None:
    flat = isinstance(listener.source, dict) and "routes" in listener.source
    rc = listener.route_config
    for vi, vh in enumerate(rc.virtual_hosts if rc is not None else ()):
        for ri, r in enumerate(vh.routes):
            a = r.action
            if not isinstance(a, RouteAction):
                continue
            p = (f"{path}.routes[{ri}]" if flat else f"{path}.virtual_hosts[{vi}].routes[{ri}]")
            targets = [a.cluster] if a.cluster else [x.name for x in a.weighted_clusters]
            targets += [m.cluster for m in a.mirrors]
            for t in targets:
                if t not in known:
                    raise ConfigError(p, f"unknown cluster {t!r}")


def sidecar_from_native(d: Any, path: str, filters: FilterCatalog, clusters: Any = None
                        ) -> tuple[SidecarConfig, list[Listener], list[Cluster]]:
    """The ``sidecar:`` section -> (SidecarConfig, [inbound, outbound listeners], [local_app]).

    ``clusters`` is the document's ``clusters`` list, to check route references with paths
    inside the ``sidecar:`` section."""
    w.check_keys(d, _KEYS, path)
    ap = w.join(path, "app")
    if "app" not in d:
        raise ConfigError(ap, "is required (the local app's port or host:port)")
    host, port = _app_address(d["app"], ap)
    service = w.string(d, "service", path, "app", nonempty=True)
    kw: dict[str, Any] = {}
    if "app_health" in d:
        hp = w.join(path, "app_health")
        h = w.check_keys(w.mapping(d, "app_health", path), ("path", "interval", "timeout"), hp)
        if "path" in h:
            hpath = w.string(h, "path", hp, nonempty=True)
            if not hpath.startswith("/"):
                raise ConfigError(w.join(hp, "path"), "must start with /")
            kw["health_path"] = hpath
        kw["probe_interval_s"] = w.duration(h, "interval", hp, 1.0)
        kw["probe_timeout_s"] = w.duration(h, "timeout", hp, 1.0)
    cfg = SidecarConfig(service=service, app_host=host, app_port=port, **kw)
    known = {APP_CLUSTER}
    for c in clusters or []:
        if isinstance(c, dict) and isinstance(c.get("name"), str):
            if c["name"] == APP_CLUSTER:
                raise ConfigError("clusters", f"the name {APP_CLUSTER!r} is reserved for the "
                                  "sidecar's app")
            known.add(c["name"])
    # app_protocol: http1 (default), http2 (a gRPC or h2c app), downstream (the client's)
    protocol = w.string(d, "app_protocol", path, "http1", choices=UPSTREAM_PROTOCOLS)
    if protocol != "http1" and kw.get("health_path"):
        raise ConfigError(w.join(path, "app_health.path"),
                          "the app probe is an HTTP/1.1 GET; with app_protocol "
                          f"{protocol} leave path unset (a TCP connect is the probe)")
    app_cluster = cluster_from_native({"name": APP_CLUSTER, "endpoints": [f"{host}:{port}"],
                                       "connect_timeout": "1s", "panic_threshold": 0,
                                       "protocol": protocol}, ap)
    listeners = []
    for name, defaults, required in (("inbound", {"address": "0.0.0.0", "port": 15006}, True),
                                     ("outbound", {"address": "127.0.0.1", "port": 15001}, False)):
        lp = w.join(path, name)
        if name not in d:
            if required:
                d = {**d, name: {}}
            else:
                continue
        ld = w.mapping(d, name, path, {})
        for k in ("name", "direction"):
            if k in ld:
                raise ConfigError(w.join(lp, k), "is set by the sidecar section")
        ld = {**defaults, **ld, "name": name, "direction": name}
        if name == "inbound" and "routes" not in ld and "virtual_hosts" not in ld:
            ld["routes"] = [{"name": "app", "match": {"prefix": "/"}, "cluster": APP_CLUSTER}]
        elif name == "outbound" and "routes" not in ld and "virtual_hosts" not in ld:
            raise ConfigError(lp, "needs routes or virtual_hosts (the services the app calls)")
        lst = listener_from_native(ld, lp, filters)
        _check_routes(lst, lp, known)
        listeners.append(lst)
    return cfg, listeners, [app_cluster]
