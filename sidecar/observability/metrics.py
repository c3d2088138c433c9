"""Prometheus metrics on one registry per process.

Metric families are created once (idempotently, by name) and the hot path holds pre-bound
label children, so recording is an attribute call, not a label lookup. State that already
lives in the data plane (connections, endpoint health, EWMA, breaker occupancy) is not
recorded per request at all: a collector reads it when Prometheus scrapes
(``sidecar.stats.StateCollector``).

``/stats/prometheus`` answers in the Prometheus text format, or in OpenMetrics when the
scraper asks for it (``Accept: application/openmetrics-text``).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest

from sidecar import __version__
from sidecar.observability.local_metrics import LocalCounter, LocalHistogram

# Sub-millisecond to tens of seconds (the range); 16 bounds keep observe() cheap.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Metrics:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[str, object] = {}
        self._collectors: dict[str, object] = {}
        self.started = time.time()
        if enabled:
            # no ``*_created`` series: they double the exposition for no use Envoy users expect
            try:
                from prometheus_client import disable_created_metrics
                disable_created_metrics()
            except ImportError:  # pragma: no cover
                pass
            self.gauge("sidecar_build_info", "Sidecar version (value 1)", ("version",)) \
                .labels(__version__).set(1)
            self.gauge("sidecar_start_time_seconds", "When the process started (unix time)") \
                .set(self.started)
            try:
                from prometheus_client import ProcessCollector
                ProcessCollector(registry=self.registry)   # process_cpu_seconds_total, RSS, fds
            except Exception:  # pragma: no cover  (no /proc: not Linux)
                pass

    # ---- family factories (idempotent by name) -------------------------------------------
    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> LocalCounter:
        return self._family(LocalCounter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = (),
              multiprocess_mode: str = "") -> Gauge:
        return self._family(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> LocalHistogram:
        return self._family(LocalHistogram, name, doc, labels, buckets=buckets)

    def _family(self, cls, name, doc, labels, **kw):
        fam = self._families.get(name)
        if fam is None:
            if cls is Gauge:
                fam = cls(name, doc, labelnames=labels, registry=self.registry, **kw)
            else:
                # counters and histograms: plain numbers on the loop, a collector at scrape
                # time (sidecar.observability.local_metrics)
                fam = cls(name, doc, labels, **kw)
                self.registry.register(fam)
            self._families[name] = fam
        elif not isinstance(fam, cls):
            raise ValueError(f"metric {name} already registered as {type(fam).__name__}")
        return fam

    def family(self, name: str) -> object | None:
        """A family created through this object, or None (used by the dashboard)."""
        return self._families.get(name)

    def add_collector(self, key: str, collector) -> bool:
        """Register a custom collector once per ``key``; False if already there or metrics off."""
        if not self.enabled or key in self._collectors:
            return False
        self._collectors[key] = collector
        self.registry.register(collector)
        return True

    # ---- exposition ----------------------------------------------------------------------
    def render(self, accept: str = "") -> tuple[bytes, str]:
        if "application/openmetrics-text" in accept:
            return om_generate_latest(self.registry), OM_CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def status_class(status: int) -> str:
    return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
