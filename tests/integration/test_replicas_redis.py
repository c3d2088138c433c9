"""Limits shared by several sidecar replicas through one real ``redis-server``: two sidecar
processes (each with the default worker count) refuse a replayed token and hold one global
rate limit; Redis killed mid-test gives each filter's configured answer (fail closed for the
replay check, fail open for the rate limit), counted and shown on /ready; Redis brought back
on the same port is used again without any restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from sidecar.shared.testing import RedisServer
from sidecar.testing import ProxyProcess, Upstream, free_port, wait_for_port
from tests.jwt_helpers import mint, rsa_provider


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def replica_config(port: int, admin: int, upstream: str, redis: str) -> dict:
    jwt_cfg = {"providers": {"p": rsa_provider(replay_protection={
        "store": "main", "on_store_error": "fail_closed"})}}
    return {
        "admin": {"address": "127.0.0.1", "port": admin},
        "stores": {"main": {"redis": {"address": redis, "timeout": "250ms",
                                      "retry_backoff": {"base": "100ms", "max": "400ms"}}}},
        "listeners": [{"name": "in", "address": "127.0.0.1", "port": port,
                       # listener-wide: no limit; the /limited route has its own
                       "filters": [{"jwt_authn": jwt_cfg}, {"local_ratelimit": {"disabled": True}}],
                       "routes": [
                           {"match": {"prefix": "/jwt"}, "cluster": "svc",
                            "filters": {"jwt_authn": {"requires": "p"}}},
                           {"match": {"prefix": "/limited"}, "cluster": "svc",
                            "filters": {"local_ratelimit": {
                                "max_tokens": 10, "fill_interval": "1h", "store": "main",
                                "on_store_error": "fail_open"}}},
                       ]}],
        "clusters": [{"name": "svc", "endpoints": [upstream]}],
    }


class Replica:
    def __init__(self, proc: ProxyProcess, port: int, admin: int):
        self.proc, self.port, self.admin = proc, port, admin

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def admin_get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.admin}{path}") as r:
                return r.status, await r.text()


async def get(url: str, token: str | None = None) -> tuple[int, str, float]:
    """One request on a new connection; (status, body, seconds). The client timeout only
    guards against a hang: nothing is asserted on time."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    t = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(url, headers=headers) as r:
            return r.status, await r.text(), time.monotonic() - t


@pytest.fixture
async def replicas(tmp_path, redis_server):
    async with Upstream() as up:
        out = []
        for i in range(2):
            port, admin = free_port(), free_port()
            d = tmp_path / f"r{i}"
            d.mkdir()
            proc = ProxyProcess(replica_config(port, admin, up.address, redis_server.address),
                                str(d), args=("--concurrency", "0"))
            proc.start()
            out.append(Replica(proc, port, admin))
        try:
            for r in out:
                await asyncio.to_thread(wait_for_port, r.admin, 20, r.proc)
                await asyncio.to_thread(wait_for_port, r.port, 20, r.proc)
            yield out
        finally:
            for r in out:
                r.proc.stop()


async def warm(r: Replica) -> None:
    """The first call of each worker connects to Redis: on a loaded machine it may time out
    (and fail closed); wait until every worker has answered from Redis once."""
    for i in range(100):
        if (await get(r.url("/jwt"), mint(jti=f"warm-{r.port}-{i}")))[0] == 200:
            for j in range(4):
                await get(r.url("/jwt"), mint(jti=f"warm-{r.port}-{i}-{j}"))
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the replica never answered from Redis")


async def test_replicas_share_replay_cache_and_one_global_limit(replicas, redis_server):
    a, b = replicas
    await warm(a)
    await warm(b)
    # a token used on one replica is refused on the other (and on the first again)
    for i in range(5):
        tok = mint(jti=f"redis-once-{i}")
        first = a if i % 2 else b
        other = b if i % 2 else a
        assert (await get(first.url("/jwt"), tok))[0] == 200
        st, body, _ = await get(other.url("/jwt"), tok)
        assert (st, body) == (401, "Jwt has already been used")
        assert (await get(first.url("/jwt"), tok))[0] == 401
    # one bucket of 10 for both replicas (and all their workers)
    results = await asyncio.gather(*(get(r.url(f"/limited/{i}")) for i in range(15)
                                     for r in (a, b)))
    assert Counter(st for st, _, _ in results) == Counter({200: 10, 429: 20})


async def test_redis_down_fail_closed_and_open_then_recovers_by_itself(replicas, redis_server):
    a, b = replicas
    await warm(a)
    redis_server.kill()
    # the replay check fails closed, the rate limit fails open: each filter's choice
    tok = mint(jti="while-down")
    st, body, took = await get(a.url("/jwt"), tok)
    assert (st, body) == (401, "Jwt replay check is unavailable")
    print(f"fail_closed answer with Redis killed: {took * 1000:.0f} ms (timeout 250 ms)")
    statuses = [(await get(r.url(f"/limited/{i}")))[0] for i in range(12) for r in (a, b)]
    assert statuses == [200] * 24                 # fail open: no Redis, no limit
    status, ready = await a.admin_get("/ready")
    assert status == 200 and "main (redis://" in ready and "down since" in ready, ready
    _, text = await a.admin_get("/stats/prometheus")
    up = f'sidecar_dependency_up{{address="redis://{redis_server.address}/0",name="main"}} 0.0'
    assert up in text
    assert 'sidecar_dependency_policy_decisions_total{name="main",policy="fail_open"}' in text
    # Redis back on the same port: every worker of each replica finds it again by itself
    # (the next call after its backoff, or its own probe), with no restart
    redis_server.start()
    for r in (a, b):
        for _ in range(100):
            status, ready = await r.admin_get("/ready")
            if "down since" not in ready:
                break
            await asyncio.sleep(0.1)
        assert status == 200 and "down since" not in ready, ready
    tok2 = mint(jti="after")
    assert (await get(a.url("/jwt"), tok2))[0] == 200
    assert (await get(b.url("/jwt"), tok2))[:2] == (401, "Jwt has already been used")
    # the global limit counts again (a fresh Redis: a full bucket of 10)
    results = [(await get(r.url(f"/limited/x{i}")))[0] for i in range(8) for r in (a, b)]
    assert Counter(results) == Counter({200: 10, 429: 6})
