"""What the config parsers need to know of HTTP filters, without importing them.

Filters sit above ``config`` in the layering; the native parser is handed a ``FilterCatalog``
(``filters.CATALOG``) by whoever loads a config, and parses each filter's section with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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

    @property
    def name_instance(self) -> Callable[[object, str | None], tuple[str, object]] | None: ...


class FilterCatalog(Protocol):
    def lookup(self, name: str) -> FilterParsers | None:
        """A filter by its Envoy or native name, or None when there is no such filter."""
        ...

    def short_names(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class InstanceParsers:
    """A named filter instance of one listener (a user filter) as routes see it: its
    per-route overrides are keyed by the instance name."""

    name: str
    short: str
    from_native: Callable[[object, str], object]
    per_route_from_native: Callable[[object, str], object] | None
    name_instance: Callable[[object, str | None], tuple[str, object]] | None = None


class ListenerFilterCatalog:
    """The catalog a listener's routes are parsed with: its named instances, then the rest."""

    def __init__(self, base: FilterCatalog, instances: dict[str, InstanceParsers]):
        self.base = base
        self.instances = instances

    def lookup(self, name: str) -> FilterParsers | None:
        inst = self.instances.get(name)
        if inst is not None:
            return inst
        return self.base.lookup(name)

    def short_names(self) -> list[str]:
        return sorted([*self.base.short_names(), *self.instances])
