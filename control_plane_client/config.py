"""How the sidecar reaches its control plane (bootstrap ``dynamic_resources`` or native
``control_plane:``), parsed into a frozen ``ControlPlaneConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    api_type: str = "REST"             # REST | GRPC (ADS)
    cluster: str = ""                  # static cluster that reaches the control plane
    refresh_delay_s: float = 1.0
    request_timeout_s: float = 2.0
    initial_fetch_timeout_s: float = 15.0
    lds: bool = True
    cds: bool = True
    cache_dir: str = ""                # last-known-good cache; "" = default location


def control_plane_from_bootstrap(d: dict, path: str) -> ControlPlaneConfig:
    raise ConfigError(path, "dynamic_resources is not supported yet")
