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


# The registry: (Envoy name, native name, module). Adding a filter is one line here. Modules
# are imported on first use, so a config without JWT never pays for cryptography's memory.
FILTERS = (
    ("envoy.filters.http.jwt_authn", "jwt_authn", "filters.jwt_authn"),
    ("envoy.filters.http.rbac", "rbac", "filters.rbac"),
    ("envoy.filters.http.local_ratelimit", "local_ratelimit", "filters.local_ratelimit"),
    ("envoy.filters.http.fault", "fault", "filters.fault"),
)
_MODULES = {name: mod for canonical, short, mod in FILTERS for name in (canonical, short)}
_SPECS: dict[str, FilterSpec] = {}


def lookup(name: str) -> Optional[FilterSpec]:
    spec = _SPECS.get(name)
    if spec is None:
        mod = _MODULES.get(name)
        if mod is None:
            return None
        import importlib
        spec = importlib.import_module(mod).SPEC
        _SPECS[spec.name] = _SPECS[spec.short] = spec
    return spec


def registry() -> dict[str, FilterSpec]:
    """Every filter's spec by both names (imports them all)."""
    for canonical, _, _ in FILTERS:
        lookup(canonical)
    return dict(_SPECS)


def known_names() -> list[str]:
    return sorted(canonical for canonical, _, _ in FILTERS)


def short_names() -> list[str]:
    return sorted(short for _, short, _ in FILTERS)
