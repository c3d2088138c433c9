"""Health of a remote dependency (a Redis store, a rate limit service): up/down, why, since
when, counters, and the fail-fast rule while it is down.

One failed or timed-out call marks the dependency down. While down no call is attempted (the
caller applies its failure policy at once, so no request waits on a dead peer) until a backoff
has passed (``base``, doubling to ``max``); then one call at a time is let through as a probe,
and the first success marks it up again. Recovery needs no restart and no background task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.config.stores import Backoff
from sidecar.core.limits import DependencyUnavailable, FailurePolicy


@dataclass(frozen=True, slots=True)
class DependencyStatus:
    """For /ready's detail, the metrics and the dashboard."""
    name: str
    address: str                 # e.g. redis://host:port/db, never credentials
    up: bool
    since: float                 # wall time of the last up/down change (0: never changed)
    last_error: str
    last_error_at: float         # wall time (0: never)
    calls: int                   # attempted
    failures: int                # attempted and failed (timeouts included)
    timeouts: int
    skipped: int                 # not attempted because it was down (answered by policy)
    fail_open: int               # requests let through because it could not answer
    fail_closed: int             # requests refused because it could not answer
    warning: str = ""            # e.g. Redis with an evicting maxmemory-policy


class Unavailable(DependencyUnavailable):
    """The dependency could not answer (down, timed out, refused): apply the failure policy."""


class HealthTracker:
    __slots__ = ("name", "address", "timeout_s", "backoff", "_clock", "up", "_since",
                 "_retry_at", "_delay", "_probing", "_last_error", "_last_error_at", "calls",
                 "failures", "timeouts", "skipped", "fail_open", "fail_closed", "warning")

    def __init__(self, name: str, address: str, timeout_s: float, backoff: Backoff,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.address, self.timeout_s, self.backoff = name, address, timeout_s, backoff
        self._clock = clock
        self.up = True
        self._since = 0.0
        self._retry_at = 0.0
        self._delay = backoff.base_s
        self._probing = False
        self._last_error = ""
        self._last_error_at = 0.0
        self.calls = self.failures = self.timeouts = self.skipped = 0
        self.fail_open = self.fail_closed = 0
        self.warning = ""

    def begin(self) -> bool:
        """Before a call: True if it is the probe of a down dependency (pass it to ``end``);
        raises ``Unavailable`` when the call must not be attempted."""
        probe = False
        if not self.up:
            if self._probing or self._clock() < self._retry_at:
                self.skipped += 1
                raise Unavailable(self._last_error or f"{self.name} down")
            self._probing = probe = True
        self.calls += 1
        return probe

    def attempt(self) -> None:
        """Before a call that is made whatever the state (a service behind a cluster: the
        cluster's health checks and outlier detection decide, as in Envoy): counted only."""
        self.calls += 1

    def end(self, probe: bool) -> None:
        if probe:
            self._probing = False

    def failed(self, err: BaseException | None, timeout: bool) -> Unavailable:
        self.failures += 1
        if timeout:
            self.timeouts += 1
            msg = f"timed out after {self.timeout_s * 1000:.0f}ms"
        else:
            msg = f"{type(err).__name__}: {err}" if err is not None else "failed"
        self._last_error = msg[:300]
        self._last_error_at = time.time()
        if self.up:
            self.up = False
            self._since = self._last_error_at
            self._delay = self.backoff.base_s
        else:
            self._delay = min(self._delay * 2, self.backoff.max_s)
        self._retry_at = self._clock() + self._delay
        return Unavailable(self._last_error)

    def succeeded(self) -> None:
        if not self.up:
            self.up = True
            self._since = time.time()
            self._delay = self.backoff.base_s

    def count_policy(self, policy: FailurePolicy) -> None:
        if policy is FailurePolicy.FAIL_OPEN:
            self.fail_open += 1
        else:
            self.fail_closed += 1

    def status(self) -> DependencyStatus:
        return DependencyStatus(self.name, self.address, self.up, self._since, self._last_error,
                                self._last_error_at, self.calls, self.failures, self.timeouts,
                                self.skipped, self.fail_open, self.fail_closed, self.warning)
