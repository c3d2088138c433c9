"""Counters and histograms recorded as plain numbers on the event loop, exposed by a collector.

prometheus_client's ``Counter.inc`` is four Python calls and a lock per increment (it is built
for threads); a histogram's ``observe`` is more. Every request records several of them, so the
hot path uses these instead: a child is one object whose ``inc``/``observe`` is one call that
adds to a number. Recording happens on the worker's event loop thread only (the one that also
answers the scrape), so no lock is needed. At scrape time each family yields a standard
``CounterMetricFamily`` / ``HistogramMetricFamily``: the exposition (names, ``_total``,
cumulative ``le`` buckets, ``_sum``, ``_count``) is prometheus_client's own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class CounterValue:
    """One labelled counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class HistogramValue:
    """One labelled histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)       # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= amount
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family:
    __slots__ = ("name", "doc", "labelnames", "children")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], object] = {}

    def _key(self, values: tuple[object, ...]) -> tuple[str, ...]:
        if not self.labelnames:
            raise ValueError(f"no label names were set when constructing {self.name}")
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: incorrect label count")
        return tuple(str(v) for v in values)


class LocalCounter(_Family):
    """A counter family (``labels(...)`` binds a child once; record through the child)."""

    __slots__ = ("_single",)

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self._single = CounterValue()            # the series of a family without labels

    def labels(self, *values: object) -> CounterValue:
        key = self._key(values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = CounterValue()
        return child  # type: ignore[return-value]

    def inc(self, amount: float = 1) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels: record through .labels(...)")
        self._single.inc(amount)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.doc, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        if not self.labelnames:
            fam.add_metric([], self._single.value)
        for key, child in list(self.children.items()):
            fam.add_metric(list(key), child.value)  # type: ignore[attr-defined]
        yield fam


class LocalHistogram(_Family):
    """A histogram family with fixed bucket bounds."""

    __slots__ = ("bounds", "_les", "_single")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = ()) -> None:
        super().__init__(name, doc, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one bucket bound")
        self.bounds = bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self._single = HistogramValue(bounds)

    def labels(self, *values: object) -> HistogramValue:
        key = self._key(values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = HistogramValue(self.bounds)
        return child  # type: ignore[return-value]

    def observe(self, amount: float) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels: record through .labels(...)")
        self._single.observe(amount)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        series = list(self.children.items())
        if not self.labelnames:
            series = [((), self._single)]
        for key, child in series:
            h: HistogramValue = child  # type: ignore[assignment]
            acc = 0
            buckets = []
            for le, n in zip(self._les, list(h.counts), strict=True):
                acc += n
                buckets.append((le, float(acc)))
            fam.add_metric(list(key), buckets, h.sum)
        yield fam
