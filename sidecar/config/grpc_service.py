"""Envoy's ``config.core.v3.GrpcService`` with ``envoy_grpc``: the gRPC service a filter calls
through a cluster (ext_authz, the rate limit service). One parser for every filter."""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.config import wire
from sidecar.config.errors import ConfigError
from sidecar.core.grpc import DEFAULT_MAX_RECEIVE_BYTES, EnvoyGrpcService

ENVOY_GRPC_KEYS = ("cluster_name", "authority", "retry_policy", "max_receive_message_length",
                   "skip_envoy_headers")


def initial_metadata(items: list[object], path: str) -> tuple[tuple[str, str], ...]:
    """``initial_metadata`` (``HeaderValue`` list): sent with every call."""
    out = []
    for i, h in enumerate(items):
        hp = wire.join(path, i)
        hv = wire.check_keys(h, ("key", "value", "raw_value"), hp)
        if hv.get("raw_value"):
            raise ConfigError(wire.join(hp, "raw_value"), "is not supported; use value")
        key = wire.string(hv, "key", hp, nonempty=True).lower()
        if key.startswith(":") or key in ("host", "te", "content-type", "grpc-timeout"):
            raise ConfigError(wire.join(hp, "key"), f"{key!r} is set by the gRPC client")
        out.append((key, wire.string(hv, "value", hp, "")))
    return tuple(out)


def envoy_grpc_service(service: Mapping[str, object], path: str) -> EnvoyGrpcService:
    """The ``envoy_grpc`` of a ``GrpcService`` mapping (``path`` is the GrpcService's) and its
    ``initial_metadata``; the caller reads ``timeout`` (its meaning is the filter's) and
    refuses ``retry_policy``."""
    ep = wire.join(path, "envoy_grpc")
    eg = wire.check_keys(service.get("envoy_grpc"), ENVOY_GRPC_KEYS, ep)
    if eg.get("retry_policy") is not None:
        raise ConfigError(wire.join(ep, "retry_policy"), "is not supported")
    limit = DEFAULT_MAX_RECEIVE_BYTES
    if eg.get("max_receive_message_length") is not None:
        limit = wire.integer(eg, "max_receive_message_length", ep, lo=1, hi=2**32 - 1)
    return EnvoyGrpcService(
        cluster=wire.string(eg, "cluster_name", ep, nonempty=True),
        authority=wire.string(eg, "authority", ep, ""),
        initial_metadata=initial_metadata(wire.seq(service, "initial_metadata", path, []),
                                          wire.join(path, "initial_metadata")),
        skip_envoy_headers=wire.boolean(eg, "skip_envoy_headers", ep, False),
        max_receive_bytes=limit)
