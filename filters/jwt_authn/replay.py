"""The ``jti`` replay cache: seen token ids until their ``exp`` (+ skew), bounded. Full means
refuse (fail closed) rather than forget a one-time token that is still valid."""

from __future__ import annotations

import heapq

from filters.jwt_authn.status import REPLAY_FULL, REPLAYED, Status


class ReplayCache:
    __slots__ = ("seen", "heap", "max_entries")

    def __init__(self, max_entries: int):
        self.seen: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []
        self.max_entries = max_entries

    def check_and_add(self, jti: str, until: float, now: float) -> Status | None:
        self._purge(now)
        t = self.seen.get(jti)
        if t is not None and t >= now:
            return REPLAYED
        if len(self.seen) >= self.max_entries:
            return REPLAY_FULL
        self.seen[jti] = until
        heapq.heappush(self.heap, (until, jti))
        return None

    def resized(self, max_entries: int) -> ReplayCache:
        """The same seen ids under a new bound (a reload must not re-open replays)."""
        new = ReplayCache(max_entries)
        new.seen, new.heap = self.seen, self.heap
        return new

    def _purge(self, now: float) -> None:
        h = self.heap
        while h and h[0][0] < now:
            t, j = heapq.heappop(h)
            if self.seen.get(j) == t:
                del self.seen[j]
