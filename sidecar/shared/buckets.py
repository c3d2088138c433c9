"""Token buckets shared by every worker: exact, each consume under its row's mutex.

A bucket is named by (scope, descriptor): ``scope`` is one filter config (its fingerprint,
plus the route for a per-route config), ``descriptor`` the entries that selected it (() for
the config's default bucket). Envoy semantics: up to ``max_tokens``, ``tokens_per_fill`` more
every ``fill_interval``, in whole fills on the monotonic clock (``CLOCK_MONOTONIC`` is one
clock for every process of the host).

Bounded: the table has ``bucket_rows`` rows. A config's own buckets are *pinned* (attached by
every worker that uses the config, released with ``release(scope)``) and never evicted.
Dynamic buckets (one per header value, client address...) are evicted when a new one needs the
row: first one that has refilled to max_tokens (a new bucket starts full, so nothing is lost),
else the least recently used one (its debt is forgotten: counted in ``lossy_evictions``).
When every row is pinned, a request whose bucket cannot be made is let through and counted
in ``untracked`` (the table is too small for the config; Envoy likewise lets through what it
cannot track).

Crash safety: the row's robust mutex is released by the kernel when a worker dies holding it.
A bucket row it was writing may be torn (tokens new, stamp old, or the reverse): ``refill`` clamps tokens to [0, max_tokens] and a
stamp from the future restarts the fill clock, so a tear costs at most one fill interval of
accuracy on that bucket.
"""

from __future__ import annotations

import struct

from sidecar.shared.api import BucketDecision, BucketSpec, refill, reset_after
from sidecar.shared.segment import BUCKET_FIELDS, LOCK_BUCKET_BASE, SharedSegment

_ROW = struct.Struct("<6d")       # tokens, last, interval, max_tokens, tokens_per_fill, touched
_STATE = struct.Struct("<2d")     # tokens, last


class ShmBuckets:
    __slots__ = ("_seg", "_worker", "_rows", "_pinned", "untracked")

    def __init__(self, seg: SharedSegment, worker: int) -> None:
        self._seg = seg
        self._worker = worker
        # (scope, descriptor) -> (row, digest, pinned). An unpinned row may have been given to
        # another bucket meanwhile: its name and spec are verified under the row lock on every
        # use. A pinned row cannot be (this worker's pin keeps it), so its use skips both.
        self._rows: dict[tuple, tuple[int, bytes, bool]] = {}
        self._pinned: dict[str, set[int]] = {}
        self.untracked = 0

    @property
    def lossy_evictions(self) -> int:
        return self._seg.lossy_evictions

    def consume(self, scope: str, descriptor: tuple[tuple[str, str], ...], spec: BucketSpec,
                now: float, pinned: bool = True) -> BucketDecision:
        key = (scope, descriptor)
        seg = self._seg
        hit = self._rows.get(key)
        if hit is not None:
            row, digest, was_pinned = hit
            decision = self._consume_pinned(row, spec, now) if was_pinned else \
                self._consume_at(row, digest, spec, now)
            if decision is not None:
                return decision
            del self._rows[key]                    # the row went to another bucket
        digest = seg.digest(scope, *(x for entry in descriptor for x in entry))
        row = seg.attach(seg.layout.bucket_dir, digest, self._worker, pin=pinned)
        if row < 0:
            self.untracked += 1
            return BucketDecision(True, spec.max_tokens, reset_after(now, spec, now))
        if pinned:
            self._pinned.setdefault(scope, set()).add(row)
        elif len(self._rows) >= 2 * seg.layout.bucket_rows:
            # bound this worker's map: forget where dynamic buckets are (found again by name)
            pins = {r for rows in self._pinned.values() for r in rows}
            self._rows = {k: v for k, v in self._rows.items() if v[0] in pins}
        self._rows[key] = (row, digest, pinned)
        decision = self._consume_at(row, digest, spec, now)
        if decision is None:                       # evicted between attach and use: rare
            self.untracked += 1
            return BucketDecision(True, spec.max_tokens, reset_after(now, spec, now))
        return decision

    def _consume_pinned(self, row: int, spec: BucketSpec, now: float) -> BucketDecision:
        """The hot path: a config's own bucket, already set up by ``_consume_at``. Reads 2
        fields and writes 2 under the lock (the name, the spec and the LRU stamp only matter
        to rows that can be evicted)."""
        seg = self._seg
        mm = seg.mm
        at = seg.layout.buckets + row * BUCKET_FIELDS * 8
        lock = LOCK_BUCKET_BASE + row
        seg.lock(lock)
        try:
            tokens, last = _STATE.unpack_from(mm, at)
            if tokens < 0.0:
                tokens = 0.0
            tokens, last = refill(tokens, last if last <= now else now, spec, now)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            _STATE.pack_into(mm, at, tokens, last)
        finally:
            seg.unlock(lock)
        return BucketDecision(allowed, int(tokens), reset_after(last, spec, now))

    def _consume_at(self, row: int, digest: bytes, spec: BucketSpec,
                    now: float) -> BucketDecision | None:
        seg = self._seg
        mm = seg.mm
        at = seg.layout.buckets + row * BUCKET_FIELDS * 8
        lock = LOCK_BUCKET_BASE + row
        seg.lock(lock)
        try:
            if seg.row_digest(seg.layout.bucket_dir, row) != digest:
                return None
            tokens, last, interval, mx, per, _ = _ROW.unpack_from(mm, at)
            if interval != spec.fill_interval_s or mx != spec.max_tokens \
                    or per != spec.tokens_per_fill:
                # a new row (all zero) or one whose config changed: start full
                tokens, last = float(spec.max_tokens), now
            else:
                if tokens < 0.0:
                    tokens = 0.0
                tokens, last = refill(tokens, last if last <= now else now, spec, now)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            _ROW.pack_into(mm, at, tokens, last, spec.fill_interval_s, float(spec.max_tokens),
                           float(spec.tokens_per_fill), now)
        finally:
            seg.unlock(lock)
        return BucketDecision(allowed, int(tokens), reset_after(last, spec, now))

    def release(self, scope: str) -> None:
        """The config ``scope`` is gone from this worker: unpin its buckets (they stay until
        another bucket needs the row, so a reload that brings the scope back keeps them)."""
        seg = self._seg
        for row in self._pinned.pop(scope, ()):
            seg.detach(seg.layout.bucket_dir, row, self._worker)
        for key in [k for k in self._rows if k[0] == scope]:
            del self._rows[key]
