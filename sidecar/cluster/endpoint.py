"""One upstream host of one cluster and everything the data plane keeps about it.

An ``EndpointState`` outlives config updates that keep its address: its pool, counters, EWMA
estimate, health verdict and ejection stay. Only the cluster that owns it writes to it (from
``Cluster.send``, its outlier detector and its health checker).

What the balancers and outlier detection must see sidecar-wide lives in ``counters``
(``sidecar.shared.EndpointCounters``): requests in flight, outcome streaks and totals, and the
health board (active-check verdict, ejection). ``hc_healthy``, ``ejected_until`` and
``ejections`` are this worker's copy of the board, refreshed by ``Cluster.sync_health`` when
the board's epoch moves; the rest (pool, EWMA, per-attempt counters) is this worker's own.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sidecar.config.cluster import Endpoint
from sidecar.shared.api import EndpointCounters
from sidecar.upstream.http1 import ConnectionPool

if TYPE_CHECKING:
    from sidecar.upstream.http2_pool import Http2Pool  # HTTP/2 (ngh2) is loaded only when a cluster speaks it


class EndpointState:
    __slots__ = ("endpoint", "address", "pool", "h2", "counters", "hc_healthy", "ejected_until",
                 "ejections", "rq_total", "rq_error", "rq_timeout", "cx_connect_fail",
                 "ewma", "ewma_stamp", "last_hc", "removed", "cx_active", "cx_connecting",
                 "cx_total", "last_used", "__weakref__")

    def __init__(self, endpoint: Endpoint, pool: ConnectionPool, counters: EndpointCounters,
                 default_rtt: float = 0.030):
        self.endpoint = endpoint
        self.address = endpoint.address
        self.pool = pool
        self.h2: Http2Pool | None = None    # HTTP/2 connections (clusters that speak it)
        self.counters = counters
        self.hc_healthy = True           # active health checking verdict (the board's)
        self.ejected_until = 0.0         # outlier detection (monotonic time)
        self.ejections = 0
        self.rq_total = 0
        self.rq_error = 0
        self.rq_timeout = 0
        self.cx_connect_fail = 0
        self.ewma = default_rtt          # peak-EWMA latency estimate, seconds
        self.ewma_stamp = time.monotonic()
        self.last_hc = ""
        self.removed = False
        # TCP proxy connections (the HTTP pool counts its own): open, connecting, ever opened
        self.cx_active = 0
        self.cx_connecting = 0
        self.cx_total = 0
        self.last_used = 0.0             # monotonic; ORIGINAL_DST hosts unused a while go
        self.sync()                      # another worker may have judged it already

    @property
    def active_requests(self) -> int:
        """Requests in flight to this endpoint from every worker (least-request, peak-EWMA)."""
        return self.counters.active()

    def begin(self) -> None:
        self.counters.begin()

    def end(self) -> None:
        self.counters.end()

    def sync(self) -> None:
        """Copy the board's verdict and ejection into this worker's fields."""
        hb = self.counters.health()
        self.hc_healthy = hb.healthy
        until = hb.ejected_until
        self.ejected_until = until if until > time.monotonic() else 0.0
        self.ejections = hb.ejections

    @property
    def http_cx_active(self) -> int:
        """Open HTTP connections to the endpoint (HTTP/1.1 and HTTP/2; ``cx_active`` counts
        the TCP proxy's)."""
        h2 = self.h2
        return self.pool.active + (h2.active if h2 is not None else 0)

    def close_pools(self) -> None:
        self.pool.close_all()
        if self.h2 is not None:
            self.h2.close_all()

    @property
    def ejected(self) -> bool:
        return self.ejected_until > time.monotonic()

    @property
    def available(self) -> bool:
        return self.hc_healthy and not self.ejected and not self.removed

    def __repr__(self) -> str:
        return f"<EndpointState {self.address}>"
