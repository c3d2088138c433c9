"""Outlier detection at run time (passive health), Envoy ``outlier_detection`` semantics.

One ``OutlierDetector`` per cluster that has ``outlier_detection``, owned by its
``ClusterState`` (it survives config versions). ``Cluster.record`` hands it the outcome of
every attempt, and it ejects a host on

* ``consecutive_5xx`` 5xx responses in a row (local-origin failures count as 5xx unless
  ``split_external_local_origin_errors``: connect failure and reset as 503, timeout as 504),
* ``consecutive_gateway_failure`` 502/503/504 in a row,
* ``consecutive_local_origin_failure`` connect failures / timeouts / resets in a row (only with
  ``split_external_local_origin_errors``, as in Envoy),
* success rate: every ``interval``, hosts with at least ``success_rate_request_volume``
  requests, when at least ``success_rate_minimum_hosts`` have that many, are ejected when their
  success rate is below ``mean - success_rate_stdev_factor * stdev``.

A streak is judged once, when it reaches its threshold (as Envoy does): if that ejection is
not enforced (``enforcing_*`` probability, in percent) or would pass ``max_ejection_percent``,
the host stays in until a new streak reaches the threshold. A threshold of 0 turns the check
off. An ejection lasts
``base_ejection_time x n`` where ``n`` counts this host's ejections in a row (it goes up on each
ejection and down by one each interval the host stays in), capped at
``max(base_ejection_time, max_ejection_time)``. At most ``max_ejection_percent`` of the hosts
are ejected at once, but always at least one may be (Envoy). Un-ejection is a timer at the
ejection's end, so the host is back in the load-balancing set on time, not on the next pick.
If too many hosts are out, ``Cluster.rebuild`` applies the panic threshold.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from sidecar.cluster.cluster import ClusterState, OutcomeObserver
from sidecar.cluster.endpoint import EndpointState
from sidecar.cluster.manager import ClusterManager
from sidecar.config.cluster import OutlierDetection
from sidecar.core.metrics import NULL
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import ClusterStats

log = logging.getLogger("sidecar.outlier")

REASONS = ("consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
           "success_rate")
_LOCAL_AS_STATUS = {"connect_failure": 503, "reset": 503, "timeout": 504}


class _Stats:
    __slots__ = ("detected", "enforced", "overflow", "unejected", "enforced_total")

    def __init__(self, m: Metrics, cstats: ClusterStats, cluster: str):
        if not m.enabled:
            self.detected = self.enforced = {r: NULL for r in REASONS}
            self.overflow = self.unejected = self.enforced_total = NULL
            return
        det = m.counter("sidecar_upstream_outlier_ejections_detected_total",
                        "Outlier conditions detected (ejected or not), by reason",
                        ("cluster", "reason"))
        enf = m.counter("sidecar_upstream_outlier_ejections_by_reason_total",
                        "Ejections enforced by outlier detection, by reason", ("cluster", "reason"))
        self.detected = {r: det.labels(cluster, r) for r in REASONS}
        self.enforced = {r: enf.labels(cluster, r) for r in REASONS}
        self.overflow = m.counter("sidecar_upstream_outlier_ejections_overflow_total",
                                  "Ejections skipped because max_ejection_percent was reached",
                                  ("cluster",)).labels(cluster)
        self.unejected = m.counter("sidecar_upstream_outlier_unejections_total",
                                   "Hosts returned to the load-balancing set after an ejection",
                                   ("cluster",)).labels(cluster)
        self.enforced_total = cstats.ejections_enforced


class OutlierDetector(OutcomeObserver):
    """Outlier detection for one cluster (see the module docstring)."""

    def __init__(self, state: ClusterState, cfg: OutlierDetection, metrics: Metrics):
        self.state = state
        self.cfg = cfg
        self.stats = _Stats(metrics, state.stats, state.name)
        self.multiplier: dict[str, int] = {}    # address -> ejections in a row
        self._tick_handle = None
        self._uneject_handle = None
        self._uneject_at = 0.0
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_timer()

    @property
    def hosts(self) -> list[EndpointState]:
        c = self.state.current
        return c.hosts if c is not None else []

    def _rebuild(self) -> None:
        c = self.state.current
        if c is not None:
            c.rebuild()

    # ---- lifecycle --------------------------------------------------------------------------
    def _start_timer(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                     # started from the first outcome, inside the loop
        self._loop = loop
        self._tick_handle = loop.call_later(self.cfg.interval_s, self._tick)

    def reconfigure(self, cfg: OutlierDetection) -> None:
        if cfg != self.cfg:
            interval_changed = cfg.interval_s != self.cfg.interval_s
            self.cfg = cfg
            if interval_changed and self._tick_handle is not None:
                self._tick_handle.cancel()
                self._tick_handle = self._loop.call_later(cfg.interval_s, self._tick)

    def close(self) -> None:
        """Detection turned off or the cluster removed: stop, and return every host."""
        if self.closed:
            return
        self.closed = True
        for h in (self._tick_handle, self._uneject_handle):
            if h is not None:
                h.cancel()
        changed = False
        for h in self.hosts:
            if h.ejected_until:
                h.ejected_until = 0.0
                changed = True
        if changed:
            self._rebuild()

    # ---- the hot path: one call per attempt ------------------------------------------------
    def on_outcome(self, host, status: int | None, latency: float, local_error: str | None) -> None:
        if self._tick_handle is None and not self.closed:
            self._start_timer()
        cfg = self.cfg
        if local_error is not None:
            if cfg.split_external_local_origin_errors:
                host.consecutive_local += 1
                if host.consecutive_local == cfg.consecutive_local_origin_failure:
                    self._maybe_eject(host, "consecutive_local_origin_failure",
                                      cfg.enforcing_consecutive_local_origin_failure)
                return
            status = _LOCAL_AS_STATUS.get(local_error, 503)
        elif cfg.split_external_local_origin_errors:
            host.consecutive_local = 0      # the connection worked: a local-origin success
        host.sr_total += 1
        if status < 500:
            host.sr_success += 1
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return
        host.consecutive_5xx += 1
        if 502 <= status <= 504:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        # the gateway check first: its enforcement is off by default, so a host that also hits
        # consecutive_5xx is then ejected for that
        if host.consecutive_gateway == cfg.consecutive_gateway_failure:
            if self._maybe_eject(host, "consecutive_gateway_failure",
                                 cfg.enforcing_consecutive_gateway_failure):
                return
        if host.consecutive_5xx == cfg.consecutive_5xx:
            self._maybe_eject(host, "consecutive_5xx", cfg.enforcing_consecutive_5xx)

    # ---- ejection -------------------------------------------------------------------------
    def _maybe_eject(self, host, reason: str, enforcing: float) -> bool:
        now = time.monotonic()
        if host.ejected_until > now or host.removed:
            return False
        self.stats.detected[reason].inc()
        if enforcing < 100.0 and random.random() * 100.0 >= enforcing:
            return False
        hosts = self.hosts
        ejected = sum(1 for h in hosts if h.ejected_until > now)
        if ejected and (ejected + 1) * 100.0 > len(hosts) * self.cfg.max_ejection_percent:
            self.stats.overflow.inc()
            return False
        self._eject(host, reason, now)
        return True

    def _eject(self, host, reason: str, now: float) -> None:
        cfg = self.cfg
        n = self.multiplier.get(host.address, 0) + 1
        self.multiplier[host.address] = n
        duration = min(cfg.base_ejection_time_s * n, max(cfg.base_ejection_time_s, cfg.max_ejection_time_s))
        host.ejected_until = now + duration
        host.ejections += 1
        host.consecutive_5xx = host.consecutive_gateway = host.consecutive_local = 0
        self.stats.enforced[reason].inc()
        self.stats.enforced_total.inc()
        self._rebuild()
        self._schedule_uneject(host.ejected_until)
        log.warning("cluster %s: ejected %s (%s) for %.1fs (ejection %d in a row)",
                    self.state.name, host.address, reason, duration, n)

    def _schedule_uneject(self, at: float) -> None:
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        if self._uneject_handle is not None:
            if self._uneject_at <= at:
                return                     # an earlier un-ejection is due first; it re-arms
            self._uneject_handle.cancel()
        self._uneject_at = at
        self._uneject_handle = loop.call_later(max(0.0, at - time.monotonic()), self._uneject_due)

    def _uneject_due(self) -> None:
        self._uneject_handle = None
        if self.closed:
            return
        now = time.monotonic()
        changed = False
        nxt = None
        for h in self.hosts:
            u = h.ejected_until
            if not u:
                continue
            if u <= now + 0.001:
                h.ejected_until = 0.0
                changed = True
                self.stats.unejected.inc()
                log.info("cluster %s: %s is back in the load-balancing set", self.state.name, h.address)
            elif nxt is None or u < nxt:
                nxt = u
        if changed:
            self._rebuild()
        if nxt is not None:
            self._schedule_uneject(nxt)

    # ---- the interval: success rate, ejection multipliers -----------------------------------
    def _tick(self) -> None:
        if self.closed:
            return
        cfg = self.cfg
        self._tick_handle = self._loop.call_later(cfg.interval_s, self._tick)
        now = time.monotonic()
        hosts = list(self.hosts)
        # success rate over the interval just ended
        sample = [(h, h.sr_success / h.sr_total) for h in hosts
                  if h.sr_total >= cfg.success_rate_request_volume and h.sr_total > 0]
        if sample and len(sample) >= cfg.success_rate_minimum_hosts:
            threshold = success_rate_threshold([r for _, r in sample], cfg.success_rate_stdev_factor)
            for h, rate in sample:
                if rate < threshold:
                    self._maybe_eject(h, "success_rate", cfg.enforcing_success_rate)
        addresses = set()
        for h in hosts:
            h.sr_success = h.sr_total = 0
            addresses.add(h.address)
            if h.ejected_until <= now:
                n = self.multiplier.get(h.address)
                if n:
                    if n > 1:
                        self.multiplier[h.address] = n - 1
                    else:
                        del self.multiplier[h.address]
        for a in [a for a in self.multiplier if a not in addresses]:
            del self.multiplier[a]
        # a safety net for un-ejection (the timer is the normal path)
        if any(0 < h.ejected_until <= now for h in hosts):
            self._uneject_due()


def success_rate_threshold(rates: list[float], stdev_factor: float) -> float:
    """Envoy: ``mean - stdev_factor * stdev`` of the hosts' success rates (population stdev)."""
    n = len(rates)
    mean = sum(rates) / n
    var = sum((r - mean) ** 2 for r in rates) / n
    return mean - stdev_factor * math.sqrt(var)


# ---- wiring ----------------------------------------------------------------------------------

def follow(clusters: ClusterManager, metrics: Metrics) -> None:
    """Give every cluster whose config asks for outlier detection a detector (and take it
    away when the config stops asking or the cluster goes)."""

    def on_activated(state: ClusterState) -> None:
        c = state.current
        cfg = c.config.outlier_detection if c is not None else None
        d = state.outlier
        if cfg is None:
            if d is not None:
                state.outlier = None
                d.close()
            return
        if isinstance(d, OutlierDetector) and not d.closed:
            d.reconfigure(cfg)
        else:
            state.outlier = OutlierDetector(state, cfg, metrics)

    def on_removed(state: ClusterState) -> None:
        d = state.outlier
        if d is not None:
            state.outlier = None
            d.close()

    clusters.subscribe(on_activated, on_removed)
