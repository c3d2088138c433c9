"""HTTP filter registry: one explicit table, no registration by import side effect.

Each filter module exposes a ``SPEC: FilterSpec`` describing how to parse its config from each
way in and how to build the filter for one route. The Envoy name and the native short name map
to the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

ROUTER = "envoy.filters.http.router"


@dataclass(frozen=True, slots=True)
class FilterRuntime:
    """Services a filter may use; lives as long as the process (survives config reloads)."""
    metrics: Any                 # sidecar.metrics.Metrics
    clusters: Any                # sidecar.cluster.ClusterManager
    state: dict                  # per-filter state that must survive reloads (JWKS, buckets)
    tracer: Any = None
    stats: Any = None            # sidecar.stats.StatsCache (pre-bound metric children)


@dataclass(frozen=True, slots=True)
class FilterSpec:
    name: str                                  # canonical Envoy name
    short: str                                 # native YAML name
    type_url: str                              # typed_config "@type" accepted from Envoy
    from_envoy: Callable[[dict, str], Any]     # typed_config (minus @type) -> config
    from_native: Callable[[dict, str], Any]
    # build(config, per_route_config_or_None, runtime, route_info) -> Filter or None (skip)
    build: Callable[..., Any]
    per_route_type_url: str = ""
    per_route_from_envoy: Optional[Callable[[dict, str], Any]] = None
    per_route_from_native: Optional[Callable[[dict, str], Any]] = None


def _load_specs() -> dict[str, FilterSpec]:
    # Explicit list: adding a filter is one line here.
    from filters import fault, jwt_authn, local_ratelimit, rbac

    specs = [jwt_authn.SPEC, rbac.SPEC, local_ratelimit.SPEC, fault.SPEC]
    table: dict[str, FilterSpec] = {}
    for s in specs:
        table[s.name] = s
        table[s.short] = s
    return table


_SPECS: dict[str, FilterSpec] | None = None


def registry() -> dict[str, FilterSpec]:
    global _SPECS
    if _SPECS is None:
        _SPECS = _load_specs()
    return _SPECS


def lookup(name: str) -> Optional[FilterSpec]:
    return registry().get(name)


def known_names() -> list[str]:
    return sorted({s.name for s in registry().values()})
