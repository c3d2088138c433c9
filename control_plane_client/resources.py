"""xDS resource types: their type URLs, short names, names, and the parsers table.

Every way resources arrive (REST, gRPC/ADS, files, the last-known-good cache) hands plain
Envoy-JSON dicts (with their ``@type``) to :meth:`ResourceType.translate`, which goes through the
same ``control_plane_client.translate`` functions as a bootstrap file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from control_plane_client.translate.cluster import cluster, load_assignment
from control_plane_client.translate.common import T_CLUSTER, T_ENDPOINT, T_LISTENER, T_ROUTE
from control_plane_client.translate.listener import listener
from control_plane_client.translate.route import route_configuration
from sidecar.config.cluster import Cluster, Endpoint
from sidecar.config.control_plane import SourceSpec
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.listener import Listener
from sidecar.config.route import RouteConfig

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

LoadAssignment = tuple[str, tuple[Endpoint, ...]]
"""A translated ClusterLoadAssignment: (cluster or EDS service name, endpoints)."""

Raw = dict[str, object]
"""One resource as Envoy JSON (proto field names, ``@type`` on every Any)."""

SourceKey = tuple[object, ...]
"""Identity of the source a resource came from (``SourceSpec.key``)."""

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Dependency:
    """The RDS or EDS resource a listener or cluster needs before it can serve."""
    name: str                             # the RouteConfiguration / ClusterLoadAssignment name
    config_source: object                 # the raw ConfigSource naming where it comes from
    path: str                             # of that ConfigSource, for errors


@dataclass(slots=True, eq=False)
class Resource(Generic[M]):
    """One resource as held: its translation, where and when it came, and what it waits for."""
    name: str
    raw: Raw
    model: M
    version: str
    updated_at: float                   # when this content arrived
    first_seen: float                   # when this name first arrived (warming deadline)
    source: SourceKey                   # the source it came from
    dep: SourceSpec | None = None       # listener: its RDS source; EDS cluster: its EDS source
    dep_name: str = ""                  # the RDS / EDS resource name it needs


def short(type_url: str) -> str:
    return SHORT.get(type_url, type_url.rsplit(".", 1)[-1])


def resource_name(type_url: str, d: Raw) -> str:
    key = "cluster_name" if type_url == EDS else "name"
    v = d.get(key)
    return v if isinstance(v, str) else ""


def unwrap(type_url: str, d: object, path: str) -> Raw:
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


@dataclass(frozen=True, slots=True)
class ResourceType(Generic[M]):
    """One xDS resource type: how it translates, and what it waits for."""
    type_url: str
    parse: Callable[[Raw, str], M]
    needs: Callable[[M, Raw, str], Dependency | None]

    @property
    def short(self) -> str:
        return SHORT[self.type_url]

    @property
    def kind(self) -> str:
        return KIND[self.type_url]

    @property
    def state_of_the_world(self) -> bool:
        return self.type_url in SOTW

    def translate(self, d: Raw, path: str) -> M:
        """One resource -> its model object; ConfigError(s) with paths when it is refused."""
        try:
            return self.parse(d, path)
        except (ConfigError, ConfigErrors):
            raise
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            # a malformed value the typed readers did not expect: still a rejection, with a path
            raise ConfigError(path, f"malformed resource: {type(e).__name__}: {e}") from None


def _dig(d: object, *keys: str | int) -> object:
    """``d[k0][k1]...`` through dicts and lists, or None where a step is missing."""
    for k in keys:
        if isinstance(k, int):
            if not isinstance(d, list) or len(d) <= k:
                return None
            d = d[k]
        elif isinstance(d, dict):
            d = d.get(k)
        else:
            return None
    return d


def hcm_rds_source(raw: object) -> object:
    """The RDS ConfigSource of a listener's HTTP connection manager, or None."""
    return _dig(raw, "filter_chains", 0, "filters", 0, "typed_config", "rds", "config_source")


def eds_source(raw: object) -> object:
    """The EDS ConfigSource of a cluster, or None."""
    return _dig(raw, "eds_cluster_config", "eds_config")


def _listener_needs(model: Listener, raw: Raw, path: str) -> Dependency | None:
    if not model.rds_name:
        return None
    return Dependency(model.rds_name, hcm_rds_source(raw),
                      f"{path}.filter_chains[0].filters[0].typed_config.rds.config_source")


def _cluster_needs(model: Cluster, raw: Raw, path: str) -> Dependency | None:
    if model.type != "eds":
        return None
    return Dependency(model.eds_service_name or model.name, eds_source(raw),
                      f"{path}.eds_cluster_config.eds_config")


def _needs_nothing(model: object, raw: Raw, path: str) -> None:
    return None


def _listener(d: Raw, path: str) -> Listener:
    return listener(d, path, None)        # route_config None until its RDS arrives


LISTENERS: ResourceType[Listener] = ResourceType(LDS, _listener, _listener_needs)
ROUTES: ResourceType[RouteConfig] = ResourceType(RDS, route_configuration, _needs_nothing)
CLUSTERS: ResourceType[Cluster] = ResourceType(CDS, cluster, _cluster_needs)
ASSIGNMENTS: ResourceType[LoadAssignment] = ResourceType(EDS, load_assignment, _needs_nothing)


def error_text(e: BaseException) -> str:
    if isinstance(e, ConfigErrors):
        return "; ".join(str(x) for x in e.errors)
    return str(e)
