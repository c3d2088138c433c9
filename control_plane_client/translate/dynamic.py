"""How the sidecar reaches its control plane, parsed into frozen config objects.

Two ways in, as for the rest of the config:

* an Envoy bootstrap's ``dynamic_resources`` (``lds_config`` / ``cds_config`` ConfigSources,
  ``ads_config``, and a static cluster that reaches the control plane), and
* the native ``control_plane:`` section::

      control_plane:
        api_type: REST            # REST | ADS | FILE
        address: 127.0.0.1:8070   # or cluster: <a static cluster name>
        refresh_delay: 1s         # REST polling interval
        request_timeout: 2s
        initial_fetch_timeout: 15s
        retry_backoff: {base_interval: 0.5s, max_interval: 30s}
        cache: {enabled: true, dir: /var/lib/sidecar}   # last-known-good cache
        # FILE: path: /etc/sidecar/xds   (a file or a directory of xDS resources)

The ConfigSources that resources carry (a listener's ``rds.config_source``, a cluster's
``eds_cluster_config.eds_config``) are parsed by :func:`config_source` when those resources
arrive; an unsupported one makes that resource (and so its response) rejected.
"""

from __future__ import annotations

from typing import Any

from sidecar.config import wire as w
from sidecar.config.control_plane import (
    DEFAULT_INITIAL_FETCH_TIMEOUT,
    ControlPlaneConfig,
    SourceSpec,
    _need_grpc_package,
)
from sidecar.config.errors import ConfigError

# ---- Envoy ConfigSource / ApiConfigSource ---------------------------------------------------

_API_TYPES = ("REST", "GRPC", "DELTA_GRPC", "AGGREGATED_GRPC", "AGGREGATED_DELTA_GRPC",
              "UNSUPPORTED_REST_LEGACY")


def _grpc_cluster(api: dict, path: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    services = w.seq(api, "grpc_services", path)
    sp = w.join(path, "grpc_services")
    if len(services) != 1:
        raise ConfigError(sp, "exactly one grpc_service is supported")
    gp = w.join(sp, 0)
    g = w.check_keys(services[0], ("envoy_grpc", "google_grpc", "timeout", "initial_metadata",
                                   "retry_policy"), gp)
    if "google_grpc" in g:
        raise ConfigError(w.join(gp, "google_grpc"), "is not supported; use envoy_grpc")
    if "retry_policy" in g:
        raise ConfigError(w.join(gp, "retry_policy"), "is not supported (streams reconnect "
                          "with exponential backoff)")
    ep = w.join(gp, "envoy_grpc")
    eg = w.check_keys(w.mapping(g, "envoy_grpc", gp), ("cluster_name",), ep)   # authority: refused
    md = []
    for i, m in enumerate(w.seq(g, "initial_metadata", gp, [])):
        mp = w.join(w.join(gp, "initial_metadata"), i)
        w.check_keys(m, ("key", "value"), mp)
        md.append((w.string(m, "key", mp, nonempty=True).lower(), w.string(m, "value", mp, "")))
    return w.string(eg, "cluster_name", ep, nonempty=True), tuple(md)


def api_config_source(api: dict, path: str, *, ads: bool = False,
                      initial_fetch_timeout: float | None = None) -> SourceSpec:
    w.check_keys(api, ("api_type", "transport_api_version", "cluster_names", "grpc_services",
                       "refresh_delay", "request_timeout", "set_node_on_first_message_only"), path)
    api_type = w.string(api, "api_type", path, choices=_API_TYPES)
    tv = w.string(api, "transport_api_version", path, "V3", choices=("AUTO", "V2", "V3"))
    if tv == "V2":
        raise ConfigError(w.join(path, "transport_api_version"), "only V3 is supported")
    w.boolean(api, "set_node_on_first_message_only", path, True)
    if api_type == "REST":
        if ads:
            raise ConfigError(w.join(path, "api_type"), "ads_config must be GRPC")
        if "grpc_services" in api:
            raise ConfigError(w.join(path, "grpc_services"), "is for GRPC api_type")
        names = w.seq(api, "cluster_names", path)
        if len(names) != 1 or not isinstance(names[0], str) or not names[0]:
            raise ConfigError(w.join(path, "cluster_names"), "exactly one cluster name is required")
        return SourceSpec(kind="rest", cluster=names[0],
                          refresh_delay_s=max(0.05, w.duration(api, "refresh_delay", path, 1.0)),
                          request_timeout_s=max(0.05, w.duration(api, "request_timeout", path, 1.0)),
                          initial_fetch_timeout_s=initial_fetch_timeout)
    if api_type == "GRPC":
        if "cluster_names" in api:
            raise ConfigError(w.join(path, "cluster_names"), "is for REST api_type; "
                              "GRPC uses grpc_services")
        if "refresh_delay" in api:
            raise ConfigError(w.join(path, "refresh_delay"), "is for REST api_type")
        cluster, md = _grpc_cluster(api, path)
        return SourceSpec(kind="ads" if ads else "grpc", cluster=cluster, metadata=md,
                          request_timeout_s=w.duration(api, "request_timeout", path, 1.0),
                          initial_fetch_timeout_s=initial_fetch_timeout)
    raise ConfigError(w.join(path, "api_type"), f"{api_type} is not supported "
                      "(supported: REST, GRPC; ADS via ads_config)")


def config_source(d: Any, path: str) -> SourceSpec:
    """An Envoy v3 ConfigSource -> SourceSpec."""
    w.check_keys(d, ("api_config_source", "ads", "path", "path_config_source", "self",
                     "initial_fetch_timeout", "resource_api_version", "authorities"), path)
    if w.string(d, "resource_api_version", path, "V3", choices=("AUTO", "V2", "V3")) == "V2":
        raise ConfigError(w.join(path, "resource_api_version"), "only V3 is supported")
    if "authorities" in d:
        raise ConfigError(w.join(path, "authorities"), "xDS-TP authorities are not supported")
    ift = w.duration(d, "initial_fetch_timeout", path, None)
    kind = w.one_of(d, ("api_config_source", "ads", "path", "path_config_source", "self"), path)
    kp = w.join(path, kind)
    if kind == "api_config_source":
        return api_config_source(w.mapping(d, kind, path), kp, initial_fetch_timeout=ift)
    if kind == "ads":
        w.check_keys(w.mapping(d, kind, path, {}), (), kp)
        return SourceSpec(kind="ads", initial_fetch_timeout_s=ift)
    if kind == "self":
        w.check_keys(w.mapping(d, kind, path, {}), ("transport_api_version",), kp)
        return SourceSpec(kind="self", initial_fetch_timeout_s=ift)
    if kind == "path":
        return SourceSpec(kind="file", path=w.string(d, "path", path, nonempty=True),
                          initial_fetch_timeout_s=ift)
    p = w.check_keys(w.mapping(d, kind, path), ("path", "watched_directory"), kp)
    if "watched_directory" in p:
        wd = w.check_keys(w.mapping(p, "watched_directory", kp), ("path",), w.join(kp, "watched_directory"))
        w.string(wd, "path", w.join(kp, "watched_directory"), nonempty=True)
    return SourceSpec(kind="file", path=w.string(p, "path", kp, nonempty=True),
                      initial_fetch_timeout_s=ift)


def _static_cluster_names(doc: dict) -> dict[str, dict]:
    sr = doc.get("static_resources") or {}
    out = {}
    for c in (sr.get("clusters") or []):
        if isinstance(c, dict) and isinstance(c.get("name"), str):
            out[c["name"]] = c
    return out


def _check_cluster(spec: SourceSpec, statics: dict, path: str) -> None:
    if spec.kind in ("rest", "grpc", "ads") and spec.cluster:
        c = statics.get(spec.cluster)
        if c is None:
            raise ConfigError(path, f"control-plane cluster {spec.cluster!r} must be a static "
                              "cluster in static_resources.clusters")
        if str(c.get("type", "STATIC")).upper() == "EDS":
            raise ConfigError(path, f"control-plane cluster {spec.cluster!r} cannot be an EDS cluster")


def control_plane_from_bootstrap(doc: dict, path: str) -> ControlPlaneConfig:
    """``doc`` is the whole bootstrap; ``path`` names its ``dynamic_resources``."""
    d = w.mapping(doc, "dynamic_resources", "")
    w.check_keys(d, ("lds_config", "cds_config", "ads_config"), path)
    statics = _static_cluster_names(doc)
    ads = None
    if "ads_config" in d:
        ap = w.join(path, "ads_config")
        ads = api_config_source(w.mapping(d, "ads_config", path), ap, ads=True)
        _check_cluster(ads, statics, ap)
        _need_grpc_package(ap)
    specs = {}
    for key in ("lds_config", "cds_config"):
        if key not in d:
            continue
        kp = w.join(path, key)
        spec = config_source(w.mapping(d, key, path), kp)
        if spec.kind == "self":
            raise ConfigError(kp, "self is only meaningful inside a resource")
        if spec.kind == "ads" and ads is None:
            raise ConfigError(kp, "ads is set but dynamic_resources.ads_config is missing")
        _check_cluster(spec, statics, kp)
        if spec.kind == "grpc":
            _need_grpc_package(kp)
        specs[key] = spec
    if not specs and ads is None:
        # ads_config alone is the stream SDS secrets come over (static listeners and clusters)
        raise ConfigError(path, "needs lds_config, cds_config or ads_config")
    ifts = [s.initial_fetch_timeout_s for s in specs.values() if s.initial_fetch_timeout_s is not None]
    return ControlPlaneConfig(mode="bootstrap", lds=specs.get("lds_config"),
                              cds=specs.get("cds_config"), ads=ads,
                              initial_fetch_timeout_s=min(ifts) if ifts else DEFAULT_INITIAL_FETCH_TIMEOUT)


