"""The JWT replay cache shared by every worker: a jti used once is refused whichever worker
sees it again.

Structure: a fixed table of 8-way sets; a jti (the digest of namespace and jti, see ``SharedSegment.digest``)
may live in one of two sets chosen by its digest, and goes into the emptier one ("two
choices": the fullest set stays close to the average, so refusals begin only when the table
is nearly all live entries). The table holds ``replay_entries`` x 1.25 slots.

Atomicity: insert-if-absent runs under the table's mutex, so two workers presenting
the same jti at once serialize: one gets FRESH, the other REPLAYED. One lock for the table,
not one per set: a jti touches two sets, and two lock calls cost more than the critical
section they protect (about a microsecond); inserts are then serialized across workers, a
ceiling of several hundred thousand per second, far above what the sidecar can serve.

Eviction rule: an entry leaves only when it has expired (its token's ``exp`` plus the clock
skew allowed). A live entry is never dropped to make room: when both sets of a new jti are
full of live entries the answer is FULL, which the JWT filter refuses (and counts), exactly
as the in-process cache refuses when it holds ``max_entries``. A digest collision (a fresh jti refused
as a replay: never a replay accepted) has 2^-64 odds per live entry.

Crash safety: the kernel releases the mutex of a killed worker. A slot is written digest first, expiry
second, and only a slot whose expiry has passed is ever overwritten, so a write cut short
leaves an expired-looking slot: the jti being recorded is not remembered, and its request
never completed either (the worker died).
"""

from __future__ import annotations

import struct

from sidecar.shared.api import ReplayVerdict
from sidecar.shared.segment import LOCK_REPLAY, REPLAY_WAYS, SharedSegment

_WAYS = REPLAY_WAYS
_SET_BYTES = _WAYS * 16
_SET = struct.Struct(f"<{_WAYS}d")
_HALVES = struct.Struct("<QQ")


class ShmReplay:
    __slots__ = ("_seg", "_sets", "_dig", "_exp")

    def __init__(self, seg: SharedSegment) -> None:
        lay = seg.layout
        self._seg = seg
        self._sets = lay.replay_sets
        self._dig = lay.replay_digests
        self._exp = lay.replay_expiry // 8        # index into the float64 view

    def check_and_add(self, namespace: str, jti: str, until: float, now: float) -> ReplayVerdict:
        seg = self._seg
        d = seg.digest(namespace, jti)
        h1, h2 = _HALVES.unpack(d)
        n = self._sets
        s1, s2 = h1 % n, h2 % n
        seg.lock(LOCK_REPLAY)
        try:
            return self._locked(d, s1, s2, until, now)
        finally:
            seg.unlock(LOCK_REPLAY)

    def _locked(self, d: bytes, s1: int, s2: int, until: float, now: float) -> ReplayVerdict:
        mm, fl, dig, exp = self._seg.mm, self._seg.floats, self._dig, self._exp
        for s in (s1, s2):
            start = dig + s * _SET_BYTES
            end = start + _SET_BYTES
            at = mm.find(d, start, end)
            while at >= 0 and (at - start) & 15:
                at = mm.find(d, at + 1, end)
            if at >= 0:
                slot = exp + s * _WAYS + ((at - start) >> 4)
                if fl[slot] >= now:
                    return ReplayVerdict.REPLAYED
                fl[slot] = until                  # its previous use expired: a new one
                return ReplayVerdict.FRESH
        e1 = _SET.unpack_from(mm, (exp + s1 * _WAYS) * 8)
        e2 = _SET.unpack_from(mm, (exp + s2 * _WAYS) * 8)
        # the emptier set first (a list's len: half the cost of sum over a map here)
        if len([e for e in e2 if e >= now]) < len([e for e in e1 if e >= now]):
            s1, s2, e1, e2 = s2, s1, e2, e1
        for s, exps in ((s1, e1), (s2, e2)):
            for way, e in enumerate(exps):
                if e < now:
                    a = dig + (s * _WAYS + way) * 16
                    mm[a:a + 16] = d                       # digest first,
                    fl[exp + s * _WAYS + way] = until      # then the expiry
                    return ReplayVerdict.FRESH
        return ReplayVerdict.FULL

    def live_entries(self, now: float) -> int:
        """How many jti are remembered now (a scan: for status pages, not the request path)."""
        fl = self._seg.floats
        exps = fl[self._exp:self._exp + self._sets * _WAYS].tolist()
        return sum(1 for e in exps if e >= now)

    @property
    def capacity(self) -> int:
        return self._sets * _WAYS
