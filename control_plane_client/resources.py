"""xDS resource types: their type URLs, short names, names, and translation (via translate.py).

Every way resources arrive (REST, gRPC/ADS, files, the last-known-good cache) hands plain
Envoy-JSON dicts (with their ``@type``) to :func:`translate_resource`, which goes through the
same ``control_plane_client.translate`` functions as a bootstrap file.
"""

from __future__ import annotations

from typing import Any

from control_plane_client.translate.cluster import cluster, load_assignment
from control_plane_client.translate.common import T_CLUSTER, T_ENDPOINT, T_LISTENER, T_ROUTE
from control_plane_client.translate.listener import listener
from control_plane_client.translate.route import route_configuration
from sidecar.config.errors import ConfigError, ConfigErrors

LDS, RDS, CDS, EDS = T_LISTENER, T_ROUTE, T_CLUSTER, T_ENDPOINT
# secrets (SDS) travel on the ADS stream but are not part of the config snapshot: they go to
# the TLS contexts' secret store (control_plane_client.sds)
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SHORT = {LDS: "lds", RDS: "rds", CDS: "cds", EDS: "eds", SDS: "sds"}
BY_SHORT = {v: k for k, v in SHORT.items()}
KIND = {LDS: "Listener", RDS: "RouteConfiguration", CDS: "Cluster", EDS: "ClusterLoadAssignment"}
SOTW = (LDS, CDS)               # state of the world: a resource missing from a response is removed
BY_NAME = (RDS, EDS)            # requested by name
ORDER = (CDS, EDS, LDS, RDS)    # the order Envoy (and ADS servers) use: make before break
ADS_TYPES = (CDS, EDS, SDS, LDS, RDS)     # what the aggregated stream carries (secrets before
                                          # the listeners that use them, as Envoy orders them)
NAMED = BY_NAME + (SDS,)        # requested by name on a stream
T_RESOURCE_WRAPPER = "type.googleapis.com/envoy.service.discovery.v3.Resource"

# REST endpoints: POST /v3/discovery:<name>
REST_PATH = {LDS: "/v3/discovery:listeners", RDS: "/v3/discovery:routes",
             CDS: "/v3/discovery:clusters", EDS: "/v3/discovery:endpoints"}
# gRPC methods
GRPC_METHOD = {
    LDS: "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
    RDS: "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
    CDS: "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
    EDS: "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
    SDS: "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
}
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def short(type_url: str) -> str:
    return SHORT.get(type_url, type_url.rsplit(".", 1)[-1])


def resource_name(type_url: str, d: dict) -> str:
    key = "cluster_name" if type_url == EDS else "name"
    v = d.get(key)
    return v if isinstance(v, str) else ""


def unwrap(type_url: str, d: Any, path: str) -> dict:
    """Check a resource's ``@type`` (unwrapping a discovery ``Resource`` envelope)."""
    if not isinstance(d, dict):
        raise ConfigError(path, "resource must be a mapping")
    t = d.get("@type")
    if t == T_RESOURCE_WRAPPER:
        inner = d.get("resource")
        if not isinstance(inner, dict):
            raise ConfigError(f"{path}.resource", "is required")
        d, t = inner, inner.get("@type")
        path = f"{path}.resource"
    if t is not None and t != type_url:
        raise ConfigError(f"{path}.@type", f"expected {type_url}, got {t!r}")
    if not resource_name(type_url, d):
        raise ConfigError(f"{path}.{'cluster_name' if type_url == EDS else 'name'}",
                          f"a {KIND[type_url]} needs a name")
    return d


def translate_resource(type_url: str, d: dict, path: str) -> Any:
    """One resource -> model object (Listener with route_config None until RDS, RouteConfig,
    Cluster, or the (cluster_name, endpoints) of a ClusterLoadAssignment)."""
    try:
        if type_url == LDS:
            return listener(d, path, None)
        if type_url == RDS:
            return route_configuration(d, path)
        if type_url == CDS:
            return cluster(d, path)
        if type_url == EDS:
            return load_assignment(d, path)
    except ConfigErrors:
        raise
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        # a malformed value the typed readers did not expect: still a rejection, with a path
        raise ConfigError(path, f"malformed resource: {type(e).__name__}: {e}") from None
    raise ConfigError(path, f"unsupported resource type {type_url}")


def error_text(e: BaseException) -> str:
    if isinstance(e, ConfigErrors):
        return "; ".join(str(x) for x in e.errors)
    return str(e)
