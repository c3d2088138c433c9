"""What the config parsers need to know of HTTP filters, without importing them.

Filters sit above ``config`` in the layering; the native parser is handed a ``FilterCatalog``
(``filters.CATALOG``) by whoever loads a config, and parses each filter's section with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class FilterParsers(Protocol):
    """One filter's config parsers (``sidecar.core.filter.FilterSpec`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def short(self) -> str: ...

    @property
    def from_native(self) -> Callable[[object, str], object]: ...

    @property
    def per_route_from_native(self) -> Callable[[object, str], object] | None: ...


class FilterCatalog(Protocol):
    def lookup(self, name: str) -> FilterParsers | None:
        """A filter by its Envoy or native name, or None when there is no such filter."""
        ...

    def short_names(self) -> list[str]: ...
