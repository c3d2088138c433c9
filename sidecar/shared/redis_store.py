"""State shared across replicas through Redis: the JWT replay cache and a global rate limit.

``RedisStore`` is one named store (``stores.<name>.redis``): a ``redis.asyncio`` client whose
every call is bounded by the store's ``timeout`` (connect included), plus its health:

* a failed or timed-out call marks the store *down* and applies the caller's failure policy;
* while down, calls are not attempted (no request waits on a dead Redis); after a backoff
  (``retry_backoff.base``, doubling to ``.max``) the next call is the probe - one at a time -
  and its success marks the store up again: recovery needs no restart and no background task;
* ``status()`` is a frozen ``DependencyStatus`` (up/down, since when, last error, counters) for
  /ready's detail, the metrics and the dashboard.

Atomicity: the replay cache is ``SET key 1 NX PXAT exp`` (one command: insert-if-absent with
the token's expiry); the rate limit is a Lua script (INCRBY + EXPIRE of a fixed-window key,
run atomically by Redis). Replicas agree on windows because the window is in the key
(``floor(unix time / window)``), as envoyproxy/ratelimit does; hosts need synchronized clocks
(NTP) for that and for ``exp``.

Bounded size: replay keys expire with their token. Redis itself must not drop them early:
run it with ``maxmemory-policy noeviction`` (a full Redis then fails the write, which the
failure policy answers) - any evicting policy could silently forget a live jti, so the first
successful replay call checks the policy and reports it in ``DependencyStatus.warning``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from sidecar.config.stores import RedisStoreConfig
from sidecar.core.limits import BucketDecision, BucketSpec, FailurePolicy
from sidecar.shared.api import ReplayCache, ReplayVerdict
from sidecar.shared.health import DependencyStatus, HealthTracker, Unavailable

T = TypeVar("T")

# Envoy's token bucket (whole fills) on Redis's clock, so replicas need not agree on time:
# one token from each bucket in order, stopping at the first empty one, in one atomic step
_BUCKETS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last_i, last_tokens, last_reset = 0, 0, 0
for i, key in ipairs(KEYS) do
  local mx = tonumber(ARGV[3 * i - 2])
  local per = tonumber(ARGV[3 * i - 1])
  local iv = tonumber(ARGV[3 * i])
  local b = redis.call('HMGET', key, 't', 'l')
  local tokens, last = tonumber(b[1]), tonumber(b[2])
  if tokens == nil or last == nil then
    tokens, last = mx, now
  elseif now >= last + iv then
    local n = math.floor((now - last) / iv)
    tokens = math.min(mx, tokens + n * per)
    last = last + n * iv
  elseif now < last then
    last = now
  end
  local allowed = tokens >= 1
  if allowed then tokens = tokens - 1 end
  redis.call('HSET', key, 't', tokens, 'l', last)
  redis.call('PEXPIRE', key, math.ceil(mx / per) * iv + iv)
  last_i, last_tokens, last_reset = i, tokens, last + iv - now
  if not allowed then return {i, 0, tokens, last_reset} end
end
return {last_i, 1, last_tokens, last_reset}
"""

_WINDOW_LUA = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
"""


class RedisStore:
    def __init__(self, cfg: RedisStoreConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        user, password = cfg.credentials()
        self.client = aioredis.Redis(
            host=cfg.host, port=cfg.port, db=cfg.db, username=user, password=password,
            socket_timeout=cfg.timeout_s, socket_connect_timeout=cfg.timeout_s,
            retry=Retry(NoBackoff(), 0), max_connections=256, client_name="pysidecar")
        self._window = self.client.register_script(_WINDOW_LUA)
        self._buckets = self.client.register_script(_BUCKETS_LUA)
        self.health = HealthTracker(cfg.name, cfg.describe(), cfg.timeout_s, cfg.backoff, clock)

    @property
    def up(self) -> bool:
        return self.health.up

    def status(self) -> DependencyStatus:
        return self.health.status()

    async def run(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``op(client)`` within the timeout, or ``Unavailable`` (at once while down)."""
        health = self.health
        probe = health.begin()
        try:
            # the client's socket timeouts bound each read and connect; wait_for bounds the
            # whole call (several reads, a script reload after a Redis restart)
            result = await asyncio.wait_for(op(self.client), self.cfg.timeout_s)
        except TimeoutError:
            raise health.failed(None, True) from None
        except ResponseError:
            health.succeeded()          # Redis answered (with an error of the command)
            raise
        except (RedisError, OSError) as e:
            raise health.failed(e, isinstance(e, RedisTimeout)) from None
        finally:
            health.end(probe)
        health.succeeded()
        return result

    async def window_hit(self, key: str, window_s: int, hits: int) -> int:
        """Add ``hits`` to the fixed window ``key`` (expires with its window); the count."""
        script = self._window
        ms = str(int(window_s * 1000) + 1000)          # a second of slack past the window end

        async def op(client: aioredis.Redis) -> int:
            return int(await script(keys=[key], args=[hits, ms], client=client))
        return await self.run(op)

    async def buckets_take(self, keys: list[str], args: list[int]) -> list[int]:
        """Run the token-bucket script (see ``RedisBuckets``)."""
        script = self._buckets

        async def op(client: aioredis.Redis) -> list[int]:
            return [int(x) for x in await script(keys=keys, args=args, client=client)]
        return await self.run(op)

    async def ping(self) -> None:
        """A call for its answer alone (``Unavailable`` while down and not yet due a probe)."""
        async def op(client: aioredis.Redis) -> bool:
            return bool(await client.ping())
        await self.run(op)

    async def check_eviction_policy(self) -> None:
        async def op(client: aioredis.Redis) -> dict:
            return await client.config_get("maxmemory-policy")
        try:
            got = await self.run(op)
        except Unavailable:
            return
        except ResponseError:
            self.health.warning = "could not read maxmemory-policy (CONFIG refused)"
            return
        policy = got.get("maxmemory-policy", got.get(b"maxmemory-policy", b""))
        policy = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy != "noeviction":
            self.health.warning = (f"maxmemory-policy is {policy}: Redis may evict live jti keys "
                            "under memory pressure; use noeviction")
        else:
            self.health.warning = ""

    async def close(self) -> None:
        await self.client.aclose()


def jti_key(prefix: str, namespace: str, jti: str) -> str:
    """Same on every replica (unkeyed hash): 32 hex chars whatever the jti's length."""
    h = hashlib.blake2b(digest_size=16)
    h.update(namespace.encode("utf-8", "surrogatepass") + b"\0" +
             jti.encode("utf-8", "surrogatepass"))
    return f"{prefix}jti:{h.hexdigest()}"


class RedisReplayCache:
    """Replay cache on Redis. While the store cannot answer: ``fail_closed`` refuses
    (``UNAVAILABLE``); ``fail_open`` falls back to ``local`` (the sidecar's own cache: a
    replay within this sidecar is still refused) or, without one, accepts."""

    def __init__(self, store: RedisStore, policy: FailurePolicy,
                 local: ReplayCache | None = None) -> None:
        self.store = store
        self.policy = policy
        self.local = local
        self._policy_checked = False

    async def check_and_add(self, namespace: str, jti: str, until: float,
                            now: float) -> ReplayVerdict:
        store = self.store
        key = jti_key(store.cfg.key_prefix, namespace, jti)
        ms = int(until * 1000)
        if ms <= int(now * 1000):
            return ReplayVerdict.FRESH if self.local is None else \
                self.local.check_and_add(namespace, jti, until, now)

        async def op(client: aioredis.Redis) -> bool:
            return bool(await client.set(key, b"1", nx=True, pxat=ms))
        try:
            fresh = await store.run(op)
        except Unavailable:
            store.health.count_policy(self.policy)
            if self.policy is FailurePolicy.FAIL_CLOSED:
                return ReplayVerdict.UNAVAILABLE
            if self.local is not None:
                return self.local.check_and_add(namespace, jti, until, now)
            return ReplayVerdict.FRESH
        if not self._policy_checked:
            self._policy_checked = True
            await store.check_eviction_policy()
        return ReplayVerdict.FRESH if fresh else ReplayVerdict.REPLAYED


def bucket_key(prefix: str, name: str) -> str:
    h = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16)
    return f"{prefix}tb:{h.hexdigest()}"


class RedisBuckets:
    """Token buckets in Redis (``RemoteBuckets``), Envoy's whole-fill semantics on Redis's
    clock: exact across every replica using the store (Redis runs each script alone).
    While the store cannot answer: ``fail_open`` allows, ``fail_closed`` refuses (index -1),
    counted in the store's status."""

    def __init__(self, store: RedisStore, policy: FailurePolicy) -> None:
        self.store = store
        self.policy = policy
        self._keys: dict[str, str] = {}

    async def consume_all(self, buckets: tuple[tuple[str, BucketSpec], ...]
                          ) -> tuple[int, BucketDecision]:
        keys: list[str] = []
        args: list[int] = []
        cache, prefix = self._keys, self.store.cfg.key_prefix
        for name, spec in buckets:
            k = cache.get(name)
            if k is None:
                if len(cache) >= 65536:
                    cache.clear()
                k = cache[name] = bucket_key(prefix, name)
            keys.append(k)
            args += (spec.max_tokens, spec.tokens_per_fill,
                     max(1, int(spec.fill_interval_s * 1000)))
        try:
            i, allowed, tokens, reset_ms = await self.store.buckets_take(keys, args)
        except Unavailable:
            self.store.health.count_policy(self.policy)
            spec = buckets[-1][1]
            ok = self.policy is FailurePolicy.FAIL_OPEN
            return -1, BucketDecision(ok, spec.max_tokens if ok else 0,
                                      max(0, int(-(-spec.fill_interval_s // 1))))
        return i - 1, BucketDecision(bool(allowed), max(0, tokens),
                                     max(0, -(-reset_ms // 1000)))


@dataclass(frozen=True, slots=True)
class WindowDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    from_store: bool = True      # False: the store could not answer; the policy decided


class RedisRateLimit:
    """A global fixed-window limit (``limit`` hits per ``window_s``) shared by every replica
    using the store. Exact within a window: Redis counts every hit once, atomically. As with
    any fixed window, a client may get up to 2 x limit across a window boundary."""

    def __init__(self, store: RedisStore, policy: FailurePolicy) -> None:
        self.store = store
        self.policy = policy

    async def hit(self, name: str, limit: int, window_s: int, now: float,
                  hits: int = 1) -> WindowDecision:
        index = int(now // window_s)
        reset = max(1, int((index + 1) * window_s - now + 0.999))
        key = f"{self.store.cfg.key_prefix}rl:{name}:{window_s}:{index}"
        try:
            n = await self.store.window_hit(key, window_s, hits)
        except Unavailable:
            self.store.health.count_policy(self.policy)
            allowed = self.policy is FailurePolicy.FAIL_OPEN
            return WindowDecision(allowed, limit, limit if allowed else 0, reset, False)
        return WindowDecision(n <= limit, limit, max(0, limit - n), reset)
