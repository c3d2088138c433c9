"""The control-plane client's metric families (every child is a no-op with metrics off)."""

from __future__ import annotations

from control_plane_client.resources import ORDER, short
from sidecar.core.metrics import NULL, CounterFamily, GaugeFamily, MetricFactory


class XdsMetrics:
    __slots__ = ("updates", "failures", "resources", "last_update", "connected", "lkg_active",
                 "lkg_loads", "lkg_saves", "initialized")

    def __init__(self, m: MetricFactory) -> None:
        self.updates: CounterFamily = NULL
        self.failures: CounterFamily = NULL
        self.resources: GaugeFamily = NULL
        self.last_update: GaugeFamily = NULL
        self.connected: GaugeFamily = NULL
        self.lkg_active: GaugeFamily = NULL
        self.lkg_loads: CounterFamily = NULL
        self.lkg_saves: CounterFamily = NULL
        self.initialized: GaugeFamily = NULL
        if not m.enabled:
            return
        self.updates = m.counter("sidecar_xds_updates_total",
                                 "xDS responses by resource type and outcome (accepted/rejected)",
                                 ("type", "outcome"))
        self.failures = m.counter("sidecar_xds_fetch_failures_total",
                                  "Failed requests or broken streams to the control plane",
                                  ("source",))
        self.resources = m.gauge("sidecar_xds_resources", "Resources held, by type and state",
                                 ("type", "state"))
        self.last_update = m.gauge("sidecar_xds_last_update_timestamp_seconds",
                                   "When a resource type last changed", ("type",))
        self.connected = m.gauge("sidecar_xds_connected",
                                 "1 when the control-plane source answered its last request",
                                 ("source",))
        self.lkg_active = m.gauge("sidecar_xds_lkg_active",
                                  "1 while serving the last-known-good cache (control plane "
                                  "unreachable at start)")
        self.lkg_loads = m.counter("sidecar_xds_lkg_loads_total",
                                   "Attempts to load the last-known-good cache by outcome",
                                   ("outcome",))
        self.lkg_saves = m.counter("sidecar_xds_lkg_saves_total",
                                   "Writes of the last-known-good cache by outcome", ("outcome",))
        self.initialized = m.gauge("sidecar_xds_initialized",
                                   "1 once every subscribed LDS/CDS source answered")
        for t in ORDER:
            for outcome in ("accepted", "rejected"):
                self.updates.labels(short(t), outcome)
        self.lkg_active.set(0)
        self.initialized.set(0)
