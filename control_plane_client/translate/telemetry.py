"""Istio's Envoy-format shapes for telemetry -> the telemetry model.

* **The metrics-only listener.** Istio's bootstrap serves Prometheus on ``0.0.0.0:15090``
  with a listener whose only route, ``/stats/prometheus``, goes to a STATIC cluster pointing
  at the admin address. A listener routing to the admin like that becomes the
  ``MetricsListener`` (served by worker 0, every worker's metrics merged, and nothing but
  ``GET /stats/prometheus``), not a proxy to the admin: proxying would put the whole admin
  (``/quitquitquit``, ``/config_dump``) one path trick away from the pod IP. Anything else on
  such a listener (filters, TLS, other routes, rewrites) is refused by name.
* **The Istio standard metrics.** Istio configures them with the ``istio.stats`` HTTP filter
  (``type.googleapis.com/stats.PluginConfig``); upstream Envoy does not know that filter.
"""

from __future__ import annotations

from control_plane_client.translate.common import socket_address
from sidecar.config import wire as w
from sidecar.config.cluster import Cluster
from sidecar.config.errors import ConfigError
from sidecar.config.listener import Admin, Listener
from sidecar.config.telemetry import METRICS_PATH, IstioMetrics, MetricsListener

ISTIO_STATS = "istio.stats"
T_ISTIO_STATS = "type.googleapis.com/stats.PluginConfig"

_HCM_NAME = "envoy.filters.network.http_connection_manager"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _is_admin_address(host: str, port: int, admin: Admin) -> bool:
    if port != admin.port:
        return False
    if host == admin.host:
        return True
    return admin.host in ("0.0.0.0", "::", "") + _LOOPBACK and host in _LOOPBACK


def admin_clusters(clusters: list[Cluster], admin: Admin) -> set[str]:
    """Static clusters whose every endpoint is the admin's address."""
    return {c.name for c in clusters
            if c.type == "static" and c.endpoints
            and all(_is_admin_address(e.host, e.port, admin) for e in c.endpoints)}


def _route_clusters(raw: dict) -> list[str]:
    """The clusters an inline route config of a listener names (best effort on raw JSON)."""
    out: list[str] = []
    try:
        hcm = raw["filter_chains"][0]["filters"][0]["typed_config"]
        for vh in hcm["route_config"]["virtual_hosts"]:
            for r in vh.get("routes") or ():
                c = (r.get("route") or {}).get("cluster")
                if isinstance(c, str):
                    out.append(c)
    except (KeyError, IndexError, TypeError, AttributeError):
        return []
    return out


def stats_listener(raw: dict, path: str, admin_names: set[str]) -> MetricsListener | None:
    """The metrics-only listener if ``raw`` routes to the admin (Istio's 15090 shape), None if
    it does not touch the admin; ConfigError naming the field that does not fit the shape."""
    if not admin_names.intersection(_route_clusters(raw)):
        return None
    why = (f"routes to the admin (cluster {sorted(admin_names)[0]!r}): such a listener is served "
           f"as the metrics-only listener, which supports exactly Istio's shape (one HTTP "
           f"connection manager, routes matching {METRICS_PATH} to the admin cluster, the "
           f"router filter)")
    w.check_keys(raw, ("name", "address", "filter_chains", "traffic_direction"), path)
    host, port = socket_address(w.mapping(raw, "address", path), w.join(path, "address"))
    if port == 0:
        raise ConfigError(w.join(path, "address"), "the metrics listener needs a fixed port")
    cp = w.join(w.join(path, "filter_chains"), 0)
    chains = w.seq(raw, "filter_chains", path)
    if len(chains) != 1:
        raise ConfigError(w.join(path, "filter_chains"), why)
    w.check_keys(chains[0], ("filters",), cp)
    fl = w.seq(chains[0], "filters", cp)
    fp = w.join(w.join(cp, "filters"), 0)
    if len(fl) != 1 or fl[0].get("name") != _HCM_NAME:
        raise ConfigError(w.join(cp, "filters"), why)
    w.check_keys(fl[0], ("name", "typed_config"), fp)
    hp = w.join(fp, "typed_config")
    hcm = fl[0]["typed_config"]
    w.check_keys(hcm, ("@type", "stat_prefix", "codec_type", "route_config", "http_filters"), hp)
    w.string(hcm, "codec_type", hp, "AUTO", choices=("AUTO", "HTTP1"))
    filters = w.seq(hcm, "http_filters", hp, [])
    for i, f in enumerate(filters):
        if not isinstance(f, dict) or f.get("name") != "envoy.filters.http.router":
            raise ConfigError(w.join(w.join(hp, "http_filters"), i), why)
    rp = w.join(hp, "route_config")
    rc = w.check_keys(w.mapping(hcm, "route_config", hp), ("name", "virtual_hosts"), rp)
    for vi, vh in enumerate(w.seq(rc, "virtual_hosts", rp)):
        vp = w.join(w.join(rp, "virtual_hosts"), vi)
        w.check_keys(vh, ("name", "domains", "routes"), vp)
        if vh.get("domains", ["*"]) != ["*"]:
            raise ConfigError(w.join(vp, "domains"), why)
        for ri, r in enumerate(w.seq(vh, "routes", vp)):
            p = w.join(w.join(vp, "routes"), ri)
            w.check_keys(r, ("name", "match", "route"), p)
            m = w.check_keys(w.mapping(r, "match", p), ("prefix", "path"), w.join(p, "match"))
            if list(m.values()) != [METRICS_PATH]:
                raise ConfigError(w.join(p, "match"), why)
            a = w.check_keys(w.mapping(r, "route", p), ("cluster", "timeout"), w.join(p, "route"))
            if a.get("cluster") not in admin_names:
                raise ConfigError(w.join(p, "route.cluster"), why)
    return MetricsListener(host=host, port=port, name=w.string(raw, "name", path, "") or "metrics")


def check_metrics_port(m: MetricsListener, path: str, admin: Admin, listeners: list[Listener]
                       ) -> None:
    if m.port == admin.port:
        raise ConfigError(w.join(path, "address"), f"{m.port} is the admin port")
    for lst in listeners:
        if lst.port == m.port:
            raise ConfigError(w.join(path, "address"), f"{m.port} is listener {lst.name!r}'s port")


def istio_stats(body: dict, path: str) -> IstioMetrics:
    """The ``istio.stats`` filter's PluginConfig. Honoured: ``reporter`` UNSPECIFIED (from the
    listener's direction, as Istio infers it), ``disable_host_header_fallback: true`` (the
    sidecar never takes destination_service from the Host header: unbounded label values).
    Everything else (custom metric definitions, overrides, rotation) is refused by name."""
    w.check_keys(body, ("reporter", "disable_host_header_fallback"), path)
    w.string(body, "reporter", path, "UNSPECIFIED", choices=("UNSPECIFIED",))
    if not w.boolean(body, "disable_host_header_fallback", path, True):
        raise ConfigError(w.join(path, "disable_host_header_fallback"),
                          "the Host header fallback is not supported (request values are never "
                          "label values)")
    return IstioMetrics()
