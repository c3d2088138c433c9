"""HTTP filter registry: one explicit table, no registration by import side effect.

Each filter module exposes ``SPEC: sidecar.core.filter.FilterSpec`` (how its config is parsed
from each way in, how it is built for one route, the state it keeps across reloads). The Envoy
name and the native short name map to the same spec. Adding a filter is one module and one line
in ``FILTERS``.
"""

from __future__ import annotations

import importlib

from sidecar.core.filter import FilterSpec

ROUTER = "envoy.filters.http.router"

# (Envoy name, native name, module). Modules are imported on first use, so a config without
# JWT never pays for cryptography's memory.
FILTERS: tuple[tuple[str, str, str], ...] = (
    ("envoy.filters.http.jwt_authn", "jwt_authn", "filters.jwt_authn"),
    ("envoy.filters.http.rbac", "rbac", "filters.rbac"),
    ("envoy.filters.http.local_ratelimit", "local_ratelimit", "filters.local_ratelimit"),
    ("envoy.filters.http.fault", "fault", "filters.fault"),
)

AnySpec = FilterSpec[object, object, object]


class FilterCatalog:
    """The built-in filters by both names (``sidecar.config.filters.FilterCatalog``)."""

    def __init__(self, table: tuple[tuple[str, str, str], ...]):
        self._table = table
        self._modules = {name: mod for canonical, short, mod in table for name in (canonical, short)}
        self._specs: dict[str, AnySpec] = {}

    def lookup(self, name: str) -> AnySpec | None:
        spec = self._specs.get(name)
        if spec is None:
            mod = self._modules.get(name)
            if mod is None:
                return None
            spec = importlib.import_module(mod).SPEC     # lazily: see FILTERS
            self._specs[spec.name] = self._specs[spec.short] = spec
        return spec

    def all(self) -> list[AnySpec]:
        """Every filter's spec (imports them all)."""
        out = []
        for canonical, _, _ in self._table:
            spec = self.lookup(canonical)
            assert spec is not None
            out.append(spec)
        return out

    def known_names(self) -> list[str]:
        return sorted(canonical for canonical, _, _ in self._table)

    def short_names(self) -> list[str]:
        return sorted(short for _, short, _ in self._table)


CATALOG = FilterCatalog(FILTERS)
lookup = CATALOG.lookup
known_names = CATALOG.known_names
short_names = CATALOG.short_names
