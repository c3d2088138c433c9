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
    ("envoy.filters.http.ratelimit", "ratelimit", "filters.ratelimit"),
    ("envoy.filters.http.fault", "fault", "filters.fault"),
    ("envoy.filters.http.buffer", "buffer", "filters.buffer"),
    ("envoy.filters.http.cors", "cors", "filters.cors"),
    ("envoy.filters.http.compressor", "compressor", "filters.compressor"),
    ("envoy.filters.http.ext_authz", "ext_authz", "filters.ext_authz"),
    ("envoy.filters.http.header_to_metadata", "header_to_metadata", "filters.header_to_metadata"),
    # user filters: a Python class named by config (docs/filters.md)
    ("pysidecar.filters.http.python", "python", "filters.python"),
)

# typed_config "@type" -> Envoy name, for filter entries whose name is their own (Envoy finds
# an extension by its type; the name only keys per-route overrides). Per-route types too.
_T = "type.googleapis.com/"
TYPE_URLS: dict[str, str] = {
    _T + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication": "envoy.filters.http.jwt_authn",
    _T + "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig": "envoy.filters.http.jwt_authn",
    _T + "envoy.extensions.filters.http.rbac.v3.RBAC": "envoy.filters.http.rbac",
    _T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute": "envoy.filters.http.rbac",
    _T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit": "envoy.filters.http.local_ratelimit",
    _T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit": "envoy.filters.http.ratelimit",
    _T + "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute": "envoy.filters.http.ratelimit",
    _T + "envoy.extensions.filters.http.fault.v3.HTTPFault": "envoy.filters.http.fault",
    _T + "envoy.extensions.filters.http.buffer.v3.Buffer": "envoy.filters.http.buffer",
    _T + "envoy.extensions.filters.http.buffer.v3.BufferPerRoute": "envoy.filters.http.buffer",
    _T + "envoy.extensions.filters.http.cors.v3.Cors": "envoy.filters.http.cors",
    _T + "envoy.extensions.filters.http.cors.v3.CorsPolicy": "envoy.filters.http.cors",
    _T + "envoy.extensions.filters.http.compressor.v3.Compressor": "envoy.filters.http.compressor",
    _T + "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute": "envoy.filters.http.compressor",
    _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz": "envoy.filters.http.ext_authz",
    _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute": "envoy.filters.http.ext_authz",
    _T + "envoy.extensions.filters.http.header_to_metadata.v3.Config": "envoy.filters.http.header_to_metadata",
    _T + "pysidecar.filter.v1.PythonFilter": "pysidecar.filters.http.python",
    _T + "pysidecar.filter.v1.PythonFilterPerRoute": "pysidecar.filters.http.python",
}

AnySpec = FilterSpec[object, object, object]


class FilterCatalog:
    """The built-in filters by both names (``sidecar.config.filters.FilterCatalog``)."""

    def __init__(self, table: tuple[tuple[str, str, str], ...],
                 type_urls: dict[str, str] | None = None):
        self._table = table
        self._type_urls = type_urls or {}
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

    def by_type_url(self, type_url: object) -> AnySpec | None:
        """The filter whose config (or per-route config) has this ``@type``, or None."""
        name = self._type_urls.get(type_url) if isinstance(type_url, str) else None
        return self.lookup(name) if name is not None else None

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


CATALOG = FilterCatalog(FILTERS, TYPE_URLS)
lookup = CATALOG.lookup
by_type_url = CATALOG.by_type_url
known_names = CATALOG.known_names
short_names = CATALOG.short_names
