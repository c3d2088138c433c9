"""One transport per source: REST poller, gRPC stream (ADS or per type) or file watcher."""

from __future__ import annotations

import ssl

from control_plane_client.sources.file import FileTransport
from control_plane_client.sources.transport import DiscoveryHandler, Transport
from sidecar.config.control_plane import ControlPlaneConfig, SourceSpec
from sidecar.config.errors import ConfigError
from sidecar.config.snapshot import Snapshot
from sidecar.tls.context import client_context


def _endpoints(spec: SourceSpec, cfg: ControlPlaneConfig, base: Snapshot
               ) -> tuple[list[tuple[str, int]], ssl.SSLContext | None]:
    """Where a network source is: its static cluster's endpoints and TLS, or native addresses."""
    if not spec.cluster:
        return list(cfg.addresses), None
    c = base.cluster(spec.cluster)
    if c is None:
        raise ConfigError("control_plane", f"control-plane cluster {spec.cluster!r} is not "
                          "a static cluster")
    ctx = client_context(c.tls) if c.tls is not None else None
    eps = [(e.host, e.port) for e in c.endpoints]
    if not eps:
        raise ConfigError("control_plane", f"control-plane cluster {spec.cluster!r} has no "
                          "endpoints")
    return eps, ctx


def open_transport(spec: SourceSpec, handler: DiscoveryHandler, cfg: ControlPlaneConfig,
                   base: Snapshot) -> Transport:
    backoff = (cfg.backoff_base_s, cfg.backoff_max_s)
    # Lazy: each network transport loads its client library (aiohttp for REST, grpclib for
    # gRPC: several MB each) only when a config has such a source.
    if spec.kind == "rest":
        from control_plane_client.sources.rest import RestTransport
        eps, ctx = _endpoints(spec, cfg, base)
        return RestTransport(spec, handler, eps, ctx, backoff=backoff)
    if spec.kind in ("ads", "grpc"):
        from control_plane_client.sources.ads import GrpcTransport
        eps, ctx = _endpoints(spec, cfg, base)
        return GrpcTransport(spec, handler, eps, ctx, backoff=backoff, ads=spec.kind == "ads",
                             connect_timeout=max(1.0, spec.request_timeout_s))
    if spec.kind == "file":
        return FileTransport(spec, handler, poll_interval=cfg.file_poll_s, backoff=backoff)
    raise ConfigError("control_plane", f"unsupported source kind {spec.kind}")
