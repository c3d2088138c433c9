"""How the sidecar reaches its control plane (xDS sources), and the native ``control_plane:``
section."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.wire import Raw

DEFAULT_INITIAL_FETCH_TIMEOUT = 15.0     # Envoy's default


DEFAULT_BACKOFF = (0.5, 30.0)            # Envoy's xDS stream backoff: 500 ms base, 30 s max


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One place resources come from.

    kind: ``rest`` (xDS REST/JSON polling), ``grpc`` (one gRPC stream per type), ``ads`` (the
    aggregated stream), ``file`` (a watched file or directory), ``self`` (the source that
    delivered the resource carrying this ConfigSource).
    """
    kind: str
    cluster: str = ""                     # rest/grpc/ads: a static cluster
    refresh_delay_s: float = 1.0          # rest: polling interval
    request_timeout_s: float = 1.0        # rest: per request (Envoy's default is 1 s)
    path: str = ""                        # file
    initial_fetch_timeout_s: float | None = None
    metadata: tuple[tuple[str, str], ...] = ()   # grpc: initial_metadata

    @property
    def key(self) -> tuple[object, ...]:
        """Identity of the transport that serves this source (one per key)."""
        if self.kind == "rest":
            return ("rest", self.cluster, self.refresh_delay_s, self.request_timeout_s)
        if self.kind == "grpc":
            return ("grpc", self.cluster)
        if self.kind == "ads":
            return ("ads",)
        if self.kind == "file":
            return ("file", self.path)
        return ("self",)


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    mode: str = "bootstrap"               # bootstrap | native
    lds: SourceSpec | None = None
    cds: SourceSpec | None = None
    ads: SourceSpec | None = None      # the ADS stream (kind "grpc" transport on one stream)
    # native: the one source every type (including RDS/EDS) comes from
    default: SourceSpec | None = None
    # native `address:` (host, port) pairs when no static cluster is named
    addresses: tuple[tuple[str, int], ...] = ()
    initial_fetch_timeout_s: float = DEFAULT_INITIAL_FETCH_TIMEOUT
    backoff_base_s: float = DEFAULT_BACKOFF[0]
    backoff_max_s: float = DEFAULT_BACKOFF[1]
    cache_enabled: bool = True
    cache_dir: str = ""                   # "" = default location (see cache.default_cache_dir)
    file_poll_s: float = 0.5              # file sources: how often the path is checked

    @property
    def api_type(self) -> str:
        """A one-word summary for logs and /config_dump."""
        if self.default is not None:
            return self.default.kind.upper()
        kinds = {s.kind for s in (self.lds, self.cds) if s is not None}
        if "ads" in kinds or (not kinds and self.ads is not None):
            return "ADS"
        return "+".join(sorted(k.upper() for k in kinds)) or "NONE"


def _address(v: Any, path: str) -> tuple[str, int]:
    if not isinstance(v, str) or ":" not in v:
        raise ConfigError(path, "must be host:port")
    host, _, port = v.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, "must be host:port with a port 1..65535")
    return host, int(port)


def control_plane_from_native(d: Raw, path: str) -> ControlPlaneConfig:
    w.check_keys(d, ("api_type", "address", "addresses", "cluster", "path", "refresh_delay",
                     "request_timeout", "initial_fetch_timeout", "retry_backoff", "cache",
                     "poll_interval"), path)
    api_type = w.string(d, "api_type", path, "REST", choices=("REST", "ADS", "GRPC", "FILE")).upper()
    ift = w.duration(d, "initial_fetch_timeout", path, DEFAULT_INITIAL_FETCH_TIMEOUT)
    addrs: list[tuple[str, int]] = []
    if "address" in d:
        addrs.append(_address(d["address"], w.join(path, "address")))
    for i, a in enumerate(w.seq(d, "addresses", path, [])):
        addrs.append(_address(a, w.join(w.join(path, "addresses"), i)))
    cluster = w.string(d, "cluster", path, "")
    kw: dict[str, Any] = {}
    if api_type == "FILE":
        for k in ("address", "addresses", "cluster", "refresh_delay", "request_timeout"):
            if k in d:
                raise ConfigError(w.join(path, k), "is not used with api_type FILE")
        spec = SourceSpec(kind="file", path=w.string(d, "path", path, nonempty=True))
        kw["cache_enabled"] = False
    else:
        if "path" in d:
            raise ConfigError(w.join(path, "path"), "is only used with api_type FILE")
        if "poll_interval" in d:
            raise ConfigError(w.join(path, "poll_interval"), "is only used with api_type FILE")
        if bool(addrs) == bool(cluster):
            raise ConfigError(path, "one of address, addresses or cluster is required")
        if api_type == "REST":
            spec = SourceSpec(kind="rest", cluster=cluster,
                              refresh_delay_s=max(0.05, w.duration(d, "refresh_delay", path, 1.0)),
                              request_timeout_s=max(0.05, w.duration(d, "request_timeout", path, 2.0)))
        else:
            if "refresh_delay" in d:
                raise ConfigError(w.join(path, "refresh_delay"), "is only used with api_type REST")
            spec = SourceSpec(kind="ads", cluster=cluster,
                              request_timeout_s=w.duration(d, "request_timeout", path, 2.0))
            _need_grpc_package(w.join(path, "api_type"))
    if "retry_backoff" in d:
        bp = w.join(path, "retry_backoff")
        b = w.check_keys(w.mapping(d, "retry_backoff", path), ("base_interval", "max_interval"), bp)
        base = w.duration(b, "base_interval", bp, DEFAULT_BACKOFF[0])
        mx = w.duration(b, "max_interval", bp, max(DEFAULT_BACKOFF[1], base))
        if base <= 0 or mx < base:
            raise ConfigError(bp, "needs 0 < base_interval <= max_interval")
        kw.update(backoff_base_s=base, backoff_max_s=mx)
    if "cache" in d:
        cp = w.join(path, "cache")
        c = w.check_keys(w.mapping(d, "cache", path), ("enabled", "dir"), cp)
        kw["cache_enabled"] = w.boolean(c, "enabled", cp, True)
        kw["cache_dir"] = w.string(c, "dir", cp, "")
    if "poll_interval" in d:
        kw["file_poll_s"] = max(0.05, w.duration(d, "poll_interval", path))
    ads = spec if spec.kind == "ads" else None
    return ControlPlaneConfig(mode="native", lds=spec, cds=spec, ads=ads, default=spec,
                              addresses=tuple(addrs), initial_fetch_timeout_s=ift, **kw)


def _need_grpc_package(path: str) -> None:
    if importlib.util.find_spec("envoy_data_plane") is None or importlib.util.find_spec("grpclib") is None:
        raise ConfigError(path, "gRPC xDS (ADS) needs the envoy-data-plane package: "
                          "pip install 'pysidecar[ads]' (or 'envoy-data-plane>=2.2,<3')")
