"""Cross-worker counters in the shared segment: a cluster's breaker gauges, an endpoint's
in-flight requests and outcome counts, and the health board (one writer, every worker reads).

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
    H_WRITER,
    LOCK_WRITER,
    Directory,
    SharedSegment,
)

# endpoint words
ACTIVE, TOTAL, SUCCESS, E5XX, GATEWAY, LOCAL, M5XX, MGATEWAY, MLOCAL = range(ENDPOINT_WORDS)
_STREAK_WORDS = {Streak.CONSECUTIVE_5XX: (E5XX, M5XX),
                 Streak.CONSECUTIVE_GATEWAY: (GATEWAY, MGATEWAY),
                 Streak.CONSECUTIVE_LOCAL_ORIGIN: (LOCAL, MLOCAL)}
_BOARD = struct.Struct("<qdqq")        # healthy, ejected_until, ejections, epoch (after seq)
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

    def release(self, priority: Priority, resource: Resource) -> None:
        own = self._own + priority * 4 + resource
        if self._words[own] > 0:
            self._words[own] -= 1
        if self._closing:
            self._released()

    def snapshot(self, priority: Priority) -> BreakerSnapshot:
        words, k = self._words, priority * 4
        s = [0, 0, 0, 0]
        for b in self._bases:
            for r in range(4):
                s[r] += words[b + k + r]
        return BreakerSnapshot(*s)


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

    def _sum(self, k: int) -> int:
        words, total = self._words, 0
        for b in self._bases:
            total += words[b + k]
        return total

    def record(self, outcome: Outcome) -> None:
        if self._closing and self._own_gauges_zero():
            return                              # detached: the row may belong to another name
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

    def streak(self, which: Streak) -> int:
        count, mark = _STREAK_WORDS[which]
        words, total, latest = self._words, 0, 0
        for b in self._bases:
            total += words[b + count]
            m = words[b + mark]
            if m > latest:
                latest = m
        return total - latest if total > latest else 0

    def totals(self) -> OutcomeTotals:
        return OutcomeTotals(self._sum(TOTAL), self._sum(SUCCESS), self._sum(E5XX),
                             self._sum(GATEWAY), self._sum(LOCAL))

    def health(self) -> EndpointHealth:
        return read_board(self._seg, self._board)


def read_board(seg: SharedSegment, at: int) -> EndpointHealth:
    """Seqlock read: retry while the writer is mid-publication (odd sequence) or published
    meanwhile; x86-64 keeps loads in order, so seq-fields-seq is enough."""
    words, mm, i = seg.words, seg.mm, at // 8
    fields = _BOARD.unpack_from(mm, at + 8)
    for _ in range(SEQLOCK_SPINS):
        s1 = words[i]
        fields = _BOARD.unpack_from(mm, at + 8)
        if not s1 & 1 and words[i] == s1:
            break
    healthy, ejected_until, ejections, epoch = fields
    return EndpointHealth(bool(healthy), ejected_until, ejections, epoch)


class ShmHealthWriter:
    """The single writer of the health board. Claimed by one worker (the one that runs the
    health checker and the outlier detector); a second live claimer is refused. The claim
    dies with the worker (``SharedSegment.reclaim``), so its replacement claims again."""

    __slots__ = ("_seg", "_worker", "_rows")

    def __init__(self, seg: SharedSegment, worker: int) -> None:
        seg.lock(LOCK_WRITER)
        try:
            holder = seg.words[H_WRITER]
            if holder not in (0, worker + 1):
                raise RuntimeError(f"worker {holder - 1} already publishes health; "
                                   f"worker {worker} may only read it")
            seg.words[H_WRITER] = worker + 1
        finally:
            seg.unlock(LOCK_WRITER)
        self._seg, self._worker = seg, worker
        self._rows: dict[tuple[str, str], int] = {}

    def publish(self, cluster: str, address: str, health: EndpointHealth) -> bool:
        """Publish one endpoint's verdict; False when the endpoint table is full."""
        seg = self._seg
        row = self._rows.get((cluster, address))
        if row is None:
            row = seg.attach(seg.layout.endpoint_dir, seg.digest(cluster, address), self._worker)
            if row < 0:
                return False
            self._rows[(cluster, address)] = row
        at = seg.layout.board + row * BOARD_WORDS * 8
        words, i = seg.words, at // 8
        seq = words[i]
        epoch = _BOARD.unpack_from(seg.mm, at + 8)[3] + 1
        words[i] = seq + 1                                 # odd: writing
        _BOARD.pack_into(seg.mm, at + 8, 1 if health.healthy else 0, health.ejected_until,
                         health.ejections, epoch)
        words[i] = seq + 2                                 # even: stable
        words[H_EPOCH] += 1
        return True

    def forget(self, cluster: str, address: str) -> None:
        row = self._rows.pop((cluster, address), None)
        if row is not None:
            self._seg.detach(self._seg.layout.endpoint_dir, row, self._worker)

    def epoch(self) -> int:
        return self._seg.words[H_EPOCH]
