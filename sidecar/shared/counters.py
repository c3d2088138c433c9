"""Cross-worker counters in the shared segment: a cluster's breaker gauges, an endpoint's
in-flight requests and outcome counts, and the health board (writes serialized by one
lock, since they are rare: a verdict change, an ejection; reads lock-free by a seqlock).

Every counter word has one writer: the worker that owns the slab. Readers sum the slabs.

Admission (``try_acquire``) is *announce, then check*: the worker adds its unit to its own
slab first, then sums every slab, and takes the unit back if the sum is over the limit. Two
workers racing for the last unit may both see the other's announcement and both back off (a
spurious refusal, never an extra admission): the sum any admitted request saw includes every
unit admitted before it. That argument needs each announcement to be visible before the same
worker's reads of the other slabs. x86-64 may hold a store in its store buffer past later
loads; between the announcement and the reads the interpreter executes hundreds of other
stores, more than the buffer holds, so in practice it has drained. The guaranteed bound, which
does not depend on that, is the old one: a worker has at most one admission in flight (the
check is synchronous on a single-threaded loop), so the cluster exceeds a limit by at most N-1
(N workers). Envoy's own breakers check then increment, with the same N-1 bound across its
worker threads.

Consecutive-failure streaks (outlier detection) are kept without a shared read-modify-write:
each worker counts failures per kind in its own slab and, when it sees a success, stamps
``mark = the sidecar-wide failure count now``. The streak is ``sum(failures) - max(marks)``:
the failures since the latest success anywhere. A failure counted by another worker while a
success is being stamped may land on either side of the stamp (at most N-1 off).
"""

from __future__ import annotations

import struct

from sidecar.shared.api import (
    BreakerSnapshot,
    EndpointCounters,
    EndpointHealth,
    Outcome,
    OutcomeTotals,
    Priority,
    Resource,
    Streak,
    retry_limit,
)
from sidecar.shared.segment import (
    BOARD_WORDS,
    BREAKER_WORDS,
    ENDPOINT_WORDS,
    H_EPOCH,
    LOCK_WRITER,
    Directory,
    SharedSegment,
)

# endpoint words
ACTIVE, TOTAL, SUCCESS, E5XX, GATEWAY, LOCAL, M5XX, MGATEWAY, MLOCAL = range(ENDPOINT_WORDS)
_STREAK_WORDS = {Streak.CONSECUTIVE_5XX: (E5XX, M5XX),
                 Streak.CONSECUTIVE_GATEWAY: (GATEWAY, MGATEWAY),
                 Streak.CONSECUTIVE_LOCAL_ORIGIN: (LOCAL, MLOCAL)}
_BOARD = struct.Struct("<qdqqq")       # healthy, ejected_until, ejections, multiplier, epoch
SEQLOCK_SPINS = 64                     # then the last value read stands (writer died mid-way)


class _Handle:
    """A row attached by this worker; detached on close once this worker's own gauges are
    back to zero (a request still in flight keeps it)."""

    __slots__ = ("_seg", "_dir", "_row", "_worker", "_words", "_bases", "_own", "_closing",
                 "_gauges")

    def __init__(self, seg: SharedSegment, d: Directory, row: int, worker: int,
                 table: int, words_per_row: int, gauges: tuple[int, ...]) -> None:
        lay = seg.layout
        self._seg, self._dir, self._row, self._worker = seg, d, row, worker
        self._words = seg.words
        self._bases = tuple(table // 8 + (w * lay.counter_rows + row) * words_per_row
                            for w in range(lay.workers))
        self._own = self._bases[worker]
        self._closing = False
        self._gauges = gauges

    def _own_gauges_zero(self) -> bool:
        w, o = self._words, self._own
        return all(w[o + k] == 0 for k in self._gauges)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._own_gauges_zero():
            self._seg.detach(self._dir, self._row, self._worker)

    def _released(self) -> None:
        if self._closing and self._own_gauges_zero():
            self._seg.detach(self._dir, self._row, self._worker)


class ShmBreaker(_Handle):
    __slots__ = ()

    def __init__(self, seg: SharedSegment, row: int, worker: int) -> None:
        super().__init__(seg, seg.layout.breaker_dir, row, worker, seg.layout.breakers,
                         BREAKER_WORDS, tuple(range(BREAKER_WORDS)))

    def try_acquire(self, priority: Priority, resource: Resource, limit: int) -> bool:
        k = priority * 4 + resource
        words = self._words
        own = self._own + k
        words[own] += 1                         # announce
        total = 0
        for b in self._bases:                   # then check
            total += words[b + k]
        if total > limit:
            words[own] -= 1
            return False
        return True

    def try_acquire_retry(self, priority: Priority, max_retries: int,
                          budget_percent: float | None, min_retry_concurrency: int) -> bool:
        limit = max_retries
        if budget_percent is not None:
            words, k = self._words, priority * 4
            active = 0
            for b in self._bases:
                active += words[b + k] + words[b + k + 1]       # requests + pending
            limit = retry_limit(active, max_retries, budget_percent, min_retry_concurrency)
        return self.try_acquire(priority, Resource.RETRIES, limit)

    def admit_request(self, limit: int, endpoint: EndpointCounters) -> bool:
        if not self.try_acquire(Priority.DEFAULT, Resource.REQUESTS, limit):
            return False
        endpoint.begin()
        return True

    def release_request(self, endpoint: EndpointCounters) -> None:
        endpoint.end()
        self.release(Priority.DEFAULT, Resource.REQUESTS)

    def release(self, priority: Priority, resource: Resource) -> None:
        own = self._own + priority * 4 + resource
        if self._words[own] > 0:
            self._words[own] -= 1
        if self._closing:
            self._released()

    def publish(self, priority: Priority, resource: Resource, value: int) -> None:
        self._words[self._own + priority * 4 + resource] = value

    def total(self, priority: Priority, resource: Resource) -> int:
        words, k, total = self._words, priority * 4 + resource, 0
        for b in self._bases:
            total += words[b + k]
        return total

    def snapshot(self, priority: Priority) -> BreakerSnapshot:
        words, k = self._words, priority * 4
        s = [0, 0, 0, 0]
        for b in self._bases:
            for r in range(4):
                s[r] += words[b + k + r]
        return BreakerSnapshot(*s)

    def own(self, priority: Priority) -> BreakerSnapshot:
        words, at = self._words, self._own + priority * 4
        return BreakerSnapshot(words[at], words[at + 1], words[at + 2], words[at + 3])


class ShmEndpoint(_Handle):
    __slots__ = ("_board",)

    def __init__(self, seg: SharedSegment, row: int, worker: int) -> None:
        super().__init__(seg, seg.layout.endpoint_dir, row, worker, seg.layout.endpoints,
                         ENDPOINT_WORDS, (ACTIVE,))
        self._board = seg.layout.board + row * BOARD_WORDS * 8      # byte offset

    def begin(self) -> None:
        self._words[self._own] += 1

    def end(self) -> None:
        own = self._own
        if self._words[own] > 0:
            self._words[own] -= 1
        if self._closing:
            self._released()

    def active(self) -> int:
        words, total = self._words, 0
        for b in self._bases:
            total += words[b]
        return total

    def own_active(self) -> int:
        return self._words[self._own]

    def _sum(self, k: int) -> int:
        words, total = self._words, 0
        for b in self._bases:
            total += words[b + k]
        return total

    def record(self, outcome: Outcome) -> None:
        if self._detached():
            return
        words, o = self._words, self._own
        words[o + TOTAL] += 1
        if outcome is Outcome.SUCCESS:
            words[o + SUCCESS] += 1
            e5 = gw = lo = 0
            for b in self._bases:
                e5 += words[b + E5XX]
                gw += words[b + GATEWAY]
                lo += words[b + LOCAL]
            if words[o + M5XX] != e5 or words[o + MGATEWAY] != gw or words[o + MLOCAL] != lo:
                words[o + M5XX] = e5
                words[o + MGATEWAY] = gw
                words[o + MLOCAL] = lo
        elif outcome is Outcome.LOCAL_ORIGIN:
            words[o + LOCAL] += 1
        else:
            words[o + E5XX] += 1
            if outcome is Outcome.GATEWAY:
                words[o + GATEWAY] += 1
            else:
                words[o + MGATEWAY] = self._sum(GATEWAY)
            words[o + MLOCAL] = self._sum(LOCAL)  # a response came: the host is reachable

    def streak(self, which: Streak) -> tuple[int, int]:
        count, mark = _STREAK_WORDS[which]
        words, total, latest = self._words, 0, 0
        for b in self._bases:
            total += words[b + count]
            m = words[b + mark]
            if m > latest:
                latest = m
        return (total - latest if total > latest else 0), latest

    def reset_streaks(self) -> None:
        words, o = self._words, self._own
        words[o + M5XX] = self._sum(E5XX)
        words[o + MGATEWAY] = self._sum(GATEWAY)
        words[o + MLOCAL] = self._sum(LOCAL)

    def totals(self) -> OutcomeTotals:
        return OutcomeTotals(self._sum(TOTAL), self._sum(SUCCESS), self._sum(E5XX),
                             self._sum(GATEWAY), self._sum(LOCAL))

    def health(self) -> EndpointHealth:
        return read_board(self._seg, self._board)

    # ---- the board: writers serialized by LOCK_WRITER, readers by the seqlock -------------
    def _write(self, healthy: int, ejected_until: float, ejections: int, multiplier: int) -> None:
        seg, at = self._seg, self._board
        words, i = seg.words, at // 8
        seq = words[i]
        epoch = _BOARD.unpack_from(seg.mm, at + 8)[4] + 1
        words[i] = seq + 1                                 # odd: writing
        _BOARD.pack_into(seg.mm, at + 8, healthy, ejected_until, ejections, multiplier, epoch)
        words[i] = seq + 2                                 # even: stable
        words[H_EPOCH] += 1

    def _detached(self) -> bool:
        """Closed and let go: the row may already carry another endpoint's name."""
        return self._closing and self._own_gauges_zero()

    def _update(self, healthy: bool | None = None, ejected_until: float | None = None,
                ejections: int | None = None, multiplier: int | None = None) -> None:
        if self._detached():
            return
        seg = self._seg
        seg.lock(LOCK_WRITER)
        try:
            h, e, n, m, _ = _BOARD.unpack_from(seg.mm, self._board + 8)
            self._write(h if healthy is None else int(healthy),
                        e if ejected_until is None else ejected_until,
                        n if ejections is None else ejections, m if multiplier is None else multiplier)
        finally:
            seg.unlock(LOCK_WRITER)

    def set_healthy(self, healthy: bool) -> None:
        if self.health().healthy != healthy:
            self._update(healthy=healthy)

    def eject(self, now: float, base_s: float, max_s: float) -> EndpointHealth | None:
        if self._detached():
            return None
        seg = self._seg
        seg.lock(LOCK_WRITER)
        try:
            h, e, n, m, _ = _BOARD.unpack_from(seg.mm, self._board + 8)
            if e > now:
                return None
            m += 1
            until = now + min(base_s * m, max(base_s, max_s))
            self._write(h, until, n + 1, m)
        finally:
            seg.unlock(LOCK_WRITER)
        return self.health()

    def uneject(self) -> None:
        if self.health().ejected_until:
            self._update(ejected_until=0.0)

    def decay_multiplier(self) -> None:
        hb = self.health()
        if hb.multiplier > 0:
            self._update(multiplier=hb.multiplier - 1)


def read_board(seg: SharedSegment, at: int) -> EndpointHealth:
    """Seqlock read: retry while a writer is mid-publication (odd sequence) or published
    meanwhile; x86-64 keeps loads in order, so seq-fields-seq is enough."""
    words, mm, i = seg.words, seg.mm, at // 8
    fields = _BOARD.unpack_from(mm, at + 8)
    for _ in range(SEQLOCK_SPINS):
        s1 = words[i]
        fields = _BOARD.unpack_from(mm, at + 8)
        if not s1 & 1 and words[i] == s1:
            break
    healthy, ejected_until, ejections, multiplier, epoch = fields
    return EndpointHealth(bool(healthy), ejected_until, ejections, multiplier, epoch)
