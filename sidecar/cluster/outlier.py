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

With several workers, detection is the sidecar's: outcomes are counted in ``sidecar.shared``
(per worker, summed), so a streak is every worker's failures since the latest success
anywhere; the worker whose outcome completes a streak ejects on the shared health board (one
ejection: the board refuses a second one for an ejected host), and every worker reads the
board. The interval work (success rate over every worker's outcomes, the multiplier's decay)
runs in one worker, the ``main`` one, as Envoy runs it on its main thread. Bounds: a streak
may be one failure off per other worker when outcomes race, and two workers ejecting two
hosts at the same instant may pass ``max_ejection_percent`` by one host each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from sidecar.cluster.cluster import ClusterState
from sidecar.cluster.endpoint import EndpointState
from sidecar.cluster.manager import ClusterManager
from sidecar.config.cluster import OutlierDetection
from sidecar.core.metrics import NULL, CounterChild
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import ClusterStats
from sidecar.shared.api import Outcome, OutcomeTotals, Streak

log = logging.getLogger("sidecar.outlier")

REASONS = ("consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
           "success_rate")
# without split_external_local_origin_errors a local failure counts as 503 (connect failure,
# reset) or 504 (timeout): a gateway error either way (Outcome.GATEWAY)


class _Stats:
    __slots__ = ("detected", "enforced", "overflow", "unejected", "enforced_total")

    def __init__(self, m: Metrics, cstats: ClusterStats, cluster: str):
        if not m.enabled:
            nulls: dict[str, CounterChild] = {r: NULL for r in REASONS}
            self.detected = self.enforced = nulls
            self.overflow: CounterChild = NULL
            self.unejected: CounterChild = NULL
            self.enforced_total: CounterChild = NULL
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


class OutlierDetector:
    """Outlier detection for one cluster (see the module docstring); the cluster's
    ``OutcomeObserver``."""

    def __init__(self, state: ClusterState, cfg: OutlierDetection, metrics: Metrics,
                 main: bool = True):
        self.state = state
        self.cfg = cfg
        self.main = main                        # runs the interval work (one worker)
        self.stats = _Stats(metrics, state.stats, state.name)
        self.judged: dict[tuple[str, Streak], int] = {}   # (address, kind) -> streak judged
        self.sr_last: dict[str, OutcomeTotals] = {}       # address -> totals at the last tick
        self._tick_handle: asyncio.TimerHandle | None = None
        self._uneject_handle: asyncio.TimerHandle | None = None
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
        if self.main:
            self._tick_handle = loop.call_later(self.cfg.interval_s, self._tick)

    def reconfigure(self, cfg: OutlierDetection) -> None:
        if cfg != self.cfg:
            interval_changed = cfg.interval_s != self.cfg.interval_s
            self.cfg = cfg
            if interval_changed and self._tick_handle is not None and self._loop is not None:
                self._tick_handle.cancel()
                self._tick_handle = self._loop.call_later(cfg.interval_s, self._tick)

    def close(self) -> None:
        """Detection turned off or the cluster removed: stop, and return every host."""
        if self.closed:
            return
        self.closed = True
        for handle in (self._tick_handle, self._uneject_handle):
            if handle is not None:
                handle.cancel()
        changed = False
        for h in self.hosts:
            if h.ejected_until:
                h.counters.uneject()
                h.ejected_until = 0.0
                changed = True
        if changed:
            self._rebuild()

    # ---- the hot path: one call per attempt ------------------------------------------------
    def on_outcome(self, host: EndpointState, status: int | None, latency: float,
                   local_error: str | None) -> None:
        if self._loop is None and not self.closed:
            self._start_timer()
        cfg = self.cfg
        c = host.counters
        if local_error is not None:
            if cfg.split_external_local_origin_errors:
                c.record(Outcome.LOCAL_ORIGIN)
                self._judge(host, Streak.CONSECUTIVE_LOCAL_ORIGIN,
                            cfg.consecutive_local_origin_failure,
                            "consecutive_local_origin_failure",
                            cfg.enforcing_consecutive_local_origin_failure)
                return
            c.record(Outcome.GATEWAY)
        elif status is None or status < 500:
            c.record(Outcome.SUCCESS)
            return
        else:
            c.record(Outcome.GATEWAY if 502 <= status <= 504 else Outcome.ERROR_5XX)
        # the gateway check first: its enforcement is off by default, so a host that also hits
        # consecutive_5xx is then ejected for that
        if self._judge(host, Streak.CONSECUTIVE_GATEWAY, cfg.consecutive_gateway_failure,
                       "consecutive_gateway_failure", cfg.enforcing_consecutive_gateway_failure):
            return
        self._judge(host, Streak.CONSECUTIVE_5XX, cfg.consecutive_5xx, "consecutive_5xx",
                    cfg.enforcing_consecutive_5xx)

    def _judge(self, host: EndpointState, kind: Streak, threshold: int, reason: str, enforcing: float) -> bool:
        """A streak is judged once, when it reaches its threshold (a threshold of 0: off)."""
        if threshold <= 0:
            return False
        length, start = host.counters.streak(kind)
        if length < threshold:
            return False
        key = (host.address, kind)
        if self.judged.get(key) == start:
            return False
        self.judged[key] = start
        return self._maybe_eject(host, reason, enforcing)

    # ---- ejection -------------------------------------------------------------------------
    def _maybe_eject(self, host: EndpointState, reason: str, enforcing: float) -> bool:
        now = time.monotonic()
        c = self.state.current
        if c is not None:
            c.refresh_health()             # another worker may have ejected hosts meanwhile
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
        return self._eject(host, reason, now)

    def _eject(self, host: EndpointState, reason: str, now: float) -> bool:
        cfg = self.cfg
        hb = host.counters.eject(now, cfg.base_ejection_time_s, cfg.max_ejection_time_s)
        if hb is None:
            return False                   # another worker ejected it a moment ago
        host.counters.reset_streaks()
        host.ejected_until = hb.ejected_until
        host.ejections = hb.ejections
        self.stats.enforced[reason].inc()
        self.stats.enforced_total.inc()
        self._rebuild()
        self._schedule_uneject(host.ejected_until)
        log.warning("cluster %s: ejected %s (%s) for %.1fs (ejection %d in a row)",
                    self.state.name, host.address, reason, hb.ejected_until - now, hb.multiplier)
        return True

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

    # ---- the interval: success rate, ejection multipliers (the main worker) ---------------
    def _tick(self) -> None:
        if self.closed:
            return
        cfg = self.cfg
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(cfg.interval_s, self._tick)
        now = time.monotonic()
        hosts = list(self.hosts)
        # success rate over the interval just ended, every worker's outcomes
        sample = []
        last = self.sr_last
        seen = {}
        for h in hosts:
            t = h.counters.totals()
            seen[h.address] = t
            prev = last.get(h.address)
            if prev is None:
                continue
            total = (t.total - t.local_origin) - (prev.total - prev.local_origin) \
                if cfg.split_external_local_origin_errors else t.total - prev.total
            if total >= cfg.success_rate_request_volume and total > 0:
                success = t.success - prev.success
                sample.append((h, success / total))
        self.sr_last = seen
        if sample and len(sample) >= cfg.success_rate_minimum_hosts:
            threshold = success_rate_threshold([r for _, r in sample], cfg.success_rate_stdev_factor)
            for h, rate in sample:
                if rate < threshold:
                    self._maybe_eject(h, "success_rate", cfg.enforcing_success_rate)
        addresses = set()
        for h in hosts:
            addresses.add(h.address)
            if h.ejected_until <= now:
                h.counters.decay_multiplier()
        for k in [k for k in self.judged if k[0] not in addresses]:
            del self.judged[k]
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

def follow(clusters: ClusterManager, metrics: Metrics, main: bool = True) -> None:
    """Give every cluster whose config asks for outlier detection a detector (and take it
    away when the config stops asking or the cluster goes). ``main``: this worker runs the
    interval work (one worker of the sidecar)."""

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
            state.outlier = OutlierDetector(state, cfg, metrics, main)

    def on_removed(state: ClusterState) -> None:
        d = state.outlier
        if d is not None:
            state.outlier = None
            d.close()

    clusters.subscribe(on_activated, on_removed)
