"""The metric interfaces layers and filters record through (Prometheus families implement them).

A family is made once per config (never per request) and its label children are bound once, so
recording on the hot path is one method call. With metrics off every child is ``NULL``.
"""

from __future__ import annotations

from typing import Protocol


class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...

    def set(self, value: float) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterFamily(CounterChild, Protocol):
    def labels(self, *values: str) -> CounterChild: ...


class GaugeFamily(GaugeChild, Protocol):
    def labels(self, *values: str) -> GaugeChild: ...


class HistogramFamily(HistogramChild, Protocol):
    def labels(self, *values: str) -> HistogramChild: ...


class MetricFactory(Protocol):
    """Creates (or returns, by name) metric families on the process registry."""

    @property
    def enabled(self) -> bool: ...

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterFamily: ...

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeFamily: ...

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = ...) -> HistogramFamily: ...


class NullMetric:
    """Stands in for any metric child or family when metrics are off: every call is a no-op."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass

    def labels(self, *values: str) -> "NullMetric":
        return self


NULL = NullMetric()
