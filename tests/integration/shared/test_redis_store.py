"""The Redis-backed replay cache and global rate limit against a real redis-server: two
replica processes share them; killing Redis gives the configured fail-open / fail-closed
answer at once (never a hung request); bringing it back recovers without a restart."""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from sidecar.config.stores import Backoff, FailurePolicy, RedisStoreConfig
from sidecar.shared.api import ReplayVerdict
from sidecar.shared.local import LocalReplay
from sidecar.shared.redis_store import RedisRateLimit, RedisReplayCache, RedisStore

HANG_GUARD_S = 5.0       # not a speed assertion: a call that takes this long has hung


def store_for(redis_server, timeout=0.2, base=0.05, prefix="t:") -> RedisStore:
    return RedisStore(RedisStoreConfig(name="main", host="127.0.0.1", port=redis_server.port,
                                       timeout_s=timeout, key_prefix=prefix,
                                       backoff=Backoff(base, 0.2)))


REPLICA = r"""
import asyncio, json, sys, time
from sidecar.config.stores import Backoff, FailurePolicy, RedisStoreConfig
from sidecar.shared.redis_store import RedisRateLimit, RedisReplayCache, RedisStore

async def main(port, op, args):
    store = RedisStore(RedisStoreConfig(name="main", port=port, timeout_s=1.0, key_prefix="t:"))
    out = []
    if op == "replay":
        cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
        for jti in args:
            out.append((await cache.check_and_add("iss", jti, time.time() + 60, time.time())).value)
    else:
        limit = RedisRateLimit(store, FailurePolicy.FAIL_CLOSED)
        name, n, hits = args
        start = time.time()
        for _ in range(int(hits)):
            out.append((await limit.hit(name, int(n), 60, start)).allowed)
    await store.close()
    print(json.dumps(out))

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
"""


def replica(redis_server, op, *args) -> subprocess.Popen:
    """Another sidecar replica: a separate process with its own Redis client."""
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-c", REPLICA, str(redis_server.port), op, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def result(proc) -> list:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_replayed_jti_refused_by_the_other_replica(redis_server):
    store = store_for(redis_server)
    cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
    now = time.time()
    assert await cache.check_and_add("iss", "token-a", now + 60, now) is ReplayVerdict.FRESH
    # the other replica sees token-a as used, and token-b as new
    assert result(replica(redis_server, "replay", "token-a", "token-b")) == ["replayed", "fresh"]
    # and this one refuses token-b, first used over there
    assert await cache.check_and_add("iss", "token-b", now + 60, now) is ReplayVerdict.REPLAYED
    # another issuer's identical jti is another token
    assert await cache.check_and_add("other", "token-a", now + 60, now) is ReplayVerdict.FRESH
    assert store.status().up and store.status().warning == ""     # noeviction: no warning
    await store.close()


async def test_jti_expires_with_its_token(redis_server):
    store = store_for(redis_server)
    cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
    now = time.time()
    assert await cache.check_and_add("iss", "short", now + 0.3, now) is ReplayVerdict.FRESH
    assert await cache.check_and_add("iss", "short", now + 0.3, now) is ReplayVerdict.REPLAYED
    await asyncio.sleep(0.5)                 # Redis expired the key (PXAT = the token's exp)
    later = time.time()
    assert await cache.check_and_add("iss", "short", later + 60, later) is ReplayVerdict.FRESH
    await store.close()


async def test_one_global_limit_across_replicas(redis_server):
    """Two replica processes and this one hit the same 60-second window concurrently: Redis
    counts each hit once, so exactly `limit` are allowed in total."""
    procs = [replica(redis_server, "limit", "shared-limit", "25", "20") for _ in range(2)]
    store = store_for(redis_server, timeout=1.0)
    limit = RedisRateLimit(store, FailurePolicy.FAIL_CLOSED)
    start = time.time()
    mine = [(await limit.hit("shared-limit", 25, 60, start)).allowed for _ in range(20)]
    theirs = [a for p in procs for a in result(p)]
    # all three replicas fall in one window unless the test straddles a minute boundary
    index_start, index_end = int(start // 60), int(time.time() // 60)
    allowed = sum(mine) + sum(theirs)
    if index_start == index_end:
        assert allowed == 25
    else:
        assert 25 <= allowed <= 50
    d = await limit.hit("shared-limit", 25, 60, time.time())
    assert not d.allowed and d.remaining == 0 and 1 <= d.reset_s <= 60 and d.from_store
    await store.close()


async def test_redis_killed_fail_closed_then_recovers(redis_server):
    store = store_for(redis_server)
    cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
    limit = RedisRateLimit(store, FailurePolicy.FAIL_CLOSED)
    now = time.time()
    assert await cache.check_and_add("iss", "before", now + 60, now) is ReplayVerdict.FRESH
    assert (await limit.hit("k", 100, 1, now)).allowed

    redis_server.kill()
    t0 = time.monotonic()
    v = await asyncio.wait_for(cache.check_and_add("iss", "during", now + 60, now), HANG_GUARD_S)
    first_failure_s = time.monotonic() - t0
    assert v is ReplayVerdict.UNAVAILABLE                       # fail closed: refuse
    d = await asyncio.wait_for(limit.hit("k", 100, 1, time.time()), HANG_GUARD_S)
    assert not d.allowed and not d.from_store
    st = store.status()
    assert not st.up and st.failures >= 1 and st.last_error and st.fail_closed == 2
    assert st.skipped >= 1                   # the second call did not even try (store down)
    print(f"first failure answered in {first_failure_s * 1000:.1f} ms (timeout 200 ms)")

    redis_server.start()                     # same port; nothing restarted on our side
    deadline = time.monotonic() + HANG_GUARD_S
    verdict = None
    while time.monotonic() < deadline:
        now = time.time()
        verdict = await cache.check_and_add("iss", "after", now + 60, now)
        if verdict is not ReplayVerdict.UNAVAILABLE:
            break
        await asyncio.sleep(0.05)
    assert verdict is ReplayVerdict.FRESH
    assert store.status().up
    now = time.time()
    assert await cache.check_and_add("iss", "after", now + 60, now) is ReplayVerdict.REPLAYED
    # the Lua script is reloaded into the new Redis on its own (NOSCRIPT -> load)
    assert (await limit.hit("k2", 1, 1, now)).allowed
    await store.close()


async def test_redis_killed_fail_open_keeps_local_replay_protection(redis_server):
    store = store_for(redis_server)
    local = LocalReplay(1000)
    cache = RedisReplayCache(store, FailurePolicy.FAIL_OPEN, local=local)
    limit = RedisRateLimit(store, FailurePolicy.FAIL_OPEN)
    redis_server.kill()
    now = time.time()
    # fail open: let through, but this sidecar still refuses a replay it saw itself
    v1 = await asyncio.wait_for(cache.check_and_add("iss", "x", now + 60, now), HANG_GUARD_S)
    v2 = await asyncio.wait_for(cache.check_and_add("iss", "x", now + 60, now), HANG_GUARD_S)
    assert (v1, v2) == (ReplayVerdict.FRESH, ReplayVerdict.REPLAYED)
    d = await asyncio.wait_for(limit.hit("k", 1, 1, now), HANG_GUARD_S)
    assert d.allowed and not d.from_store
    st = store.status()
    assert not st.up and st.fail_open == 3 and st.fail_closed == 0
    await store.close()


async def test_unreachable_store_never_hangs_a_request():
    """No Redis at all on the port (connection refused) and a blackhole-like slow peer are
    both answered by the policy."""
    from sidecar.shared.testing import free_port
    port = free_port()
    store = RedisStore(RedisStoreConfig(name="none", port=port, timeout_s=0.1))
    cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
    now = time.time()
    v = await asyncio.wait_for(cache.check_and_add("iss", "j", now + 60, now), HANG_GUARD_S)
    assert v is ReplayVerdict.UNAVAILABLE
    assert "Connection" in store.status().last_error or "refused" in store.status().last_error
    await store.close()


async def test_silent_peer_times_out(redis_server):
    """A peer that accepts and never answers (a stopped Redis: SIGSTOP) costs one timeout."""
    import signal
    store = store_for(redis_server, timeout=0.15)
    cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
    now = time.time()
    assert await cache.check_and_add("iss", "warm", now + 60, now) is ReplayVerdict.FRESH
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        v = await asyncio.wait_for(cache.check_and_add("iss", "j", now + 60, now), HANG_GUARD_S)
        assert v is ReplayVerdict.UNAVAILABLE
        st = store.status()
        assert st.timeouts == 1 and "timed out" in st.last_error
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    await store.close()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
async def test_evicting_policy_is_reported(redis_server, policy):
    store = store_for(redis_server)
    await store.client.config_set("maxmemory-policy", policy)
    cache = RedisReplayCache(store, FailurePolicy.FAIL_CLOSED)
    now = time.time()
    await cache.check_and_add("iss", "j", now + 60, now)
    assert policy in store.status().warning
    await store.close()
