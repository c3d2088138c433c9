"""Builders for Envoy v3 xDS resources and bootstraps, for tests and examples.

Plain dicts in Envoy JSON (with ``@type``), so the same resources can be served by the in-test
ADS server, written to files for the file source, or compared with what a real Envoy accepts.
"""

from __future__ import annotations

import asyncio
import inspect

from control_plane_client.resources import CDS, EDS, LDS, RDS

HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ADS_SOURCE = {"ads": {}, "resource_api_version": "V3"}


def listener(port: int, rds: str = "main", name: str = "ingress",
             config_source: dict | None = None, http_filters: list | None = None) -> dict:
    return {
        "@type": LDS, "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM, "stat_prefix": name,
                "rds": {"route_config_name": rds, "config_source": config_source or ADS_SOURCE},
                "http_filters": (http_filters or []) + [
                    {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
            }}]}],
    }


def route(name: str = "main", cluster: str = "svc", domains: tuple[str, ...] = ("*",),
          routes: list | None = None) -> dict:
    return {"@type": RDS, "name": name, "virtual_hosts": [{
        "name": "vh", "domains": list(domains),
        "routes": routes or [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]}


def cluster(name: str = "svc", config_source: dict | None = None, **extra) -> dict:
    return {"@type": CDS, "name": name, "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": config_source or ADS_SOURCE}, **extra}


def load_assignment(name: str, ports: list[int], host: str = "127.0.0.1") -> dict:
    return {"@type": EDS, "cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": p}}}}
        for p in ports]}]}


def static_cluster(name: str, port: int, http2: bool = False) -> dict:
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": port}}}}]}]}}
    if http2:   # what a real Envoy needs to speak gRPC to the control plane
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


def ads_bootstrap(xds_port: int, node_id: str = "sidecar-1", admin_port: int = 0,
                  envoy: bool = False, per_type_grpc: bool = False) -> dict:
    """An Envoy bootstrap taking everything over ADS (or per-type gRPC streams) from
    127.0.0.1:``xds_port``. ``envoy=True``: the static cluster speaks HTTP/2 (for real Envoy)."""
    grpc: dict[str, object] = {"api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}
    if per_type_grpc:
        dyn: dict[str, object] = {"cds_config": {"resource_api_version": "V3", "api_config_source": grpc},
               "lds_config": {"resource_api_version": "V3", "api_config_source": grpc}}
    else:
        dyn = {"ads_config": grpc, "cds_config": dict(ADS_SOURCE), "lds_config": dict(ADS_SOURCE)}
    return {
        "node": {"id": node_id, "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": dyn,
        "static_resources": {"clusters": [static_cluster("xds", xds_port, http2=envoy)]},
    }


async def eventually(check, timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Await until ``check()`` (sync or async) returns something truthy, and return it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            v = check()
            if inspect.isawaitable(v):
                v = await v
            if v:
                return v
        except (AssertionError, OSError, ValueError, KeyError) as e:
            last_exc = e
        except Exception as e:  # noqa: BLE001 - e.g. aiohttp client errors while starting
            last_exc = e
        if loop.time() >= end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        await asyncio.sleep(interval)


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text exposition, or None."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        if head == name and not labels:
            return float(val)
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(val)
    return None
