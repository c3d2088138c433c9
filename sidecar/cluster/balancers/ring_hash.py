"""Consistent hashing (Envoy's RING_HASH; MAGLEV is served by the same ring).

The ring is built once per eligible-host change: every host gets ``P x weight`` points, each the
first 32 bits of ``blake2b("<address>_<i>")``, so the ring is the same in every sidecar and
across restarts. ``P`` is the largest power of two <= ring_size / total weight: it changes only
when the total weight crosses a power of two, so removing a host normally moves only that
host's keys (Envoy rescales every host's share of the ring instead, moving a few more). A request's ``ctx.hash_key`` (computed
by the router from the route's ``hash_policy``: header, cookie, query parameter or source IP)
is mixed (murmur3's 32-bit finaliser) and looked up with a binary search: the first point at or
after it owns the request. Adding or removing one host moves only the keys of its own points.

Requests without a hash key go to a random host. A retry skips hosts this request already
tried by walking the ring forward to the next untried host.

``LbConfig.ring_size`` (Envoy's minimum_ring_size, default 1024) is clamped to 1..65536: more
points only smooth the spread further and would make rebuilds slow in Python. The ring then
holds between ring_size/2 and ring_size points (more when weights force one point per unit).
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left
from collections.abc import Sequence

from sidecar.cluster.balancers.base import LoadBalancer
from sidecar.cluster.endpoint import EndpointState
from sidecar.config.cluster import LbConfig
from sidecar.core.context import HostInfo, PickContext

MAX_RING_SIZE = 65536


def mix32(h: int) -> int:
    """murmur3 fmix32: spread a 32-bit hash (crc32 of similar strings is not well spread)."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def points_per_weight(ring_size: int, total_weight: int) -> int:
    """The largest power of two <= ring_size / total_weight (at least 1)."""
    q = max(1, ring_size // max(total_weight, 1))
    return 1 << (q.bit_length() - 1)


def point_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")


class RingHashBalancer(LoadBalancer):
    __slots__ = ("_keys", "_owners", "size")

    def __init__(self, cfg: LbConfig):
        super().__init__(cfg)
        self.size = min(max(cfg.ring_size, 1), MAX_RING_SIZE)
        self._keys: list[int] = []
        self._owners: list[EndpointState] = []

    def rebuild(self, hosts: Sequence[EndpointState]) -> None:
        self.hosts = hosts
        if not hosts:
            self._keys, self._owners = [], []
            return
        total = sum(max(h.endpoint.weight, 1) for h in hosts)
        per_weight = points_per_weight(self.size, total)
        points = []
        for h in hosts:
            n = per_weight * max(h.endpoint.weight, 1)
            ep = h.endpoint
            name = f"{ep.hostname}:{ep.port}" if ep.hostname else h.address
            for i in range(n):
                points.append((point_hash(f"{name}_{i}"), name, h))
        points.sort(key=lambda p: (p[0], p[1]))
        self._keys = [p[0] for p in points]
        self._owners = [p[2] for p in points]

    def pick(self, ctx: PickContext | None,
             exclude: Sequence[HostInfo] = ()) -> EndpointState | None:
        hosts = self.hosts
        if not hosts:
            return None
        key = ctx.hash_key if ctx is not None else None
        if key is None:
            h = random.choice(hosts)
            return self._avoid(h, exclude) if exclude else h
        keys = self._keys
        i = bisect_left(keys, mix32(key))
        if i == len(keys):
            i = 0
        owners = self._owners
        h = owners[i]
        if exclude and h in exclude:
            n = len(owners)
            for step in range(1, n):
                c = owners[(i + step) % n]
                if c not in exclude:
                    return c
        return h
