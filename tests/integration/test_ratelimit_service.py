"""Envoy's global rate limit filter (``ratelimit``) through the sidecar (a real process with
its default worker count) against a real gRPC rate limit service (``sidecar.shared.testing_rls``
on grpcio, run in the test's loop so the test sees what it was asked) counting in a real
``redis-server``.

Checked: the descriptors each route sends (route, virtual host, include/override, every
supported action), one limit for the whole sidecar whichever worker serves, the 429 answer
(``x-envoy-ratelimited``, ``x-ratelimit-*``, the service's headers and body), the service's
request headers reaching the upstream, failure_mode_deny both ways (service killed, a slow
service past the timeout, nothing listening), and the counters."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from sidecar.config.stores import RedisStoreConfig
from sidecar.shared.redis_store import RedisStore
from sidecar.shared.testing import RedisServer
from sidecar.shared.testing_rls import RateLimitService, serve
from sidecar.testing import ProxyProcess, Upstream, free_port, wait_for_port

LIMITS = {
    "domain": "edge",
    "descriptors": [
        {"key": "remote_address", "rate_limit": {"unit": "hour", "requests_per_unit": 3}},
        {"key": "user", "rate_limit": {"unit": "hour", "requests_per_unit": 2,
                                       "name": "per-user"}},
        {"key": "generic_key", "value": "vh",
         "rate_limit": {"unit": "hour", "requests_per_unit": 100}},
    ],
    "response_headers_to_add": {"x-rls": "seen"},
    "request_headers_to_add": {"x-rls-checked": "yes"},
    "over_limit_body": "slow down",
}


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()


class Rls:
    """The rate limit service in the test's loop (grpc.aio), on a fixed port so it can be
    stopped and started again."""

    def __init__(self, redis: RedisServer, limits: dict, prefix: str = "rls:"):
        self.port = free_port()
        host, _, port = redis.address.rpartition(":")
        self.store = RedisStore(RedisStoreConfig(name="rls", host=host, port=int(port),
                                                 timeout_s=0.5, key_prefix=prefix))
        self.service = RateLimitService(limits, self.store)
        self.server = None

    async def start(self) -> "Rls":
        self.server = await serve(self.port, self.service)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None

    def descriptors(self) -> list[list[tuple[str, str]]]:
        """The descriptors of the last request the service got."""
        return [[(e.key, e.value) for e in d.entries] for d in self.service.seen[-1].descriptors]


def sidecar_config(ports: dict[str, int], admin: int, upstream: str, rls: int, slow: int,
                   closed: int) -> dict:
    rl = {"domain": "edge", "cluster": "rls", "timeout": "500ms"}
    by_ip = [{"actions": [{"remote_address": {}}]}]
    by_user = {"actions": [{"request_headers": {"header_name": "x-user",
                                                "descriptor_key": "user"}}]}
    every_action = {"actions": [
        {"request_headers": {"header_name": "x-tenant", "descriptor_key": "tenant",
                             "skip_if_absent": True}},
        {"request_headers": {"header_name": ":path", "descriptor_key": "path"}},
        {"remote_address": {}},
        {"generic_key": {"descriptor_value": "api", "descriptor_key": "tier"}},
        {"header_value_match": {"descriptor_value": "beta",
                                "headers": [{"name": "x-beta", "present_match": True}]}},
        {"destination_cluster": {}},
        {"source_cluster": {}},
    ]}

    def listener(name: str, filter_cfg: dict, routes: list) -> dict:
        return {"name": name, "address": "127.0.0.1", "port": ports[name],
                "filters": [{"ratelimit": filter_cfg}], "routes": routes}

    main = listener("main", rl, [])
    del main["routes"]
    main["virtual_hosts"] = [{
        "name": "main", "domains": ["*"],
        "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}],
        "routes": [
            {"match": {"prefix": "/ip"}, "cluster": "svc", "rate_limits": by_ip},
            {"match": {"prefix": "/user"}, "cluster": "svc", "rate_limits": [by_user],
             "include_vh_rate_limits": True},
            {"match": {"prefix": "/every"}, "cluster": "svc", "rate_limits": [every_action]},
            {"match": {"prefix": "/vh"}, "cluster": "svc"},         # the virtual host's only
            {"match": {"prefix": "/direct"}, "direct_response": {"status": 204}},
        ]}]
    return {
        "admin": {"address": "127.0.0.1", "port": admin},
        "listeners": [
            main,
            # a service that answers too late: fail open (the default), then fail closed
            listener("slow_open", {**rl, "cluster": "rls_slow", "timeout": "100ms"},
                     [{"match": {"prefix": "/"}, "cluster": "svc", "rate_limits": by_ip}]),
            listener("slow_deny", {**rl, "cluster": "rls_slow", "timeout": "100ms",
                                   "failure_mode_deny": True},
                     [{"match": {"prefix": "/"}, "cluster": "svc", "rate_limits": by_ip}]),
            # nothing listens: fail closed with a custom status
            listener("closed_deny", {**rl, "cluster": "rls_closed", "failure_mode_deny": True,
                                     "status_on_error": 503},
                     [{"match": {"prefix": "/"}, "cluster": "svc", "rate_limits": by_ip}]),
        ],
        "clusters": [{"name": "svc", "endpoints": [upstream]},
                     {"name": "rls", "endpoints": [f"127.0.0.1:{rls}"], "protocol": "http2"},
                     {"name": "rls_slow", "endpoints": [f"127.0.0.1:{slow}"],
                      "protocol": "http2"},
                     {"name": "rls_closed", "endpoints": [f"127.0.0.1:{closed}"],
                      "protocol": "http2"}],
    }


LISTENERS = ("main", "slow_open", "slow_deny", "closed_deny")


class Sidecar:
    def __init__(self, proc: ProxyProcess, ports: dict[str, int], admin: int):
        self.proc, self.ports, self.admin = proc, ports, admin

    async def get(self, path: str, listener: str = "main", headers: dict | None = None
                  ) -> tuple[int, dict, str]:
        """One request on a new connection (either worker may take it)."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.get(f"http://127.0.0.1:{self.ports[listener]}{path}",
                             headers=headers or {}) as r:
                return r.status, r.headers.copy(), await r.text()

    async def metric(self, outcome: str, cluster: str = "svc") -> float:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.admin}/stats/prometheus") as r:
                text = await r.text()
        series = f'sidecar_ratelimit_total{{cluster="{cluster}",outcome="{outcome}",stat_prefix=""}}'
        m = re.search("^" + re.escape(series) + r" (\S+)", text, re.M)
        return float(m.group(1)) if m else 0.0


@pytest.fixture
async def env(tmp_path, redis_server):
    rls = await Rls(redis_server, LIMITS).start()
    slow = await Rls(redis_server, {**LIMITS, "delay_s": 1.0}, prefix="slow:").start()
    async with Upstream() as up:
        ports = {name: free_port() for name in LISTENERS}
        admin = free_port()
        proc = ProxyProcess(sidecar_config(ports, admin, up.address, rls.port, slow.port,
                                           free_port()),
                            str(tmp_path), args=("--concurrency", "0"))   # the default: 2 here
        proc.start()
        try:
            for p in (admin, *ports.values()):
                await asyncio.to_thread(wait_for_port, p, 20, proc)
            yield Sidecar(proc, ports, admin), rls, up
        finally:
            proc.stop()
            await rls.stop()
            await slow.stop()
            await rls.store.close()
            await slow.store.close()


async def test_one_limit_for_the_sidecar_and_envoys_429(env):
    sc, rls, up = env
    got = [await sc.get("/ip") for _ in range(6)]
    assert [s for s, _, _ in got] == [200, 200, 200, 429, 429, 429]
    assert rls.descriptors() == [[("remote_address", "127.0.0.1")]]
    for status, h, body in got:
        assert h.getall("x-rls") == ["seen"]                   # the service's headers, always
        if status == 200:
            assert "x-envoy-ratelimited" not in h
            assert body.startswith("{")
        else:
            assert h["x-envoy-ratelimited"] == "true"
            assert body == "slow down"                          # the service's raw_body
            assert h["content-type"] == "text/plain"
    # the native filter sends x-ratelimit-* by default: 3 per hour, the least remaining
    assert [h["x-ratelimit-remaining"] for _, h, _ in got] == ["2", "1", "0", "0", "0", "0"]
    assert {h["x-ratelimit-limit"] for _, h, _ in got} == {"3, 3;w=3600"}
    assert all(0 < int(h["x-ratelimit-reset"]) <= 3600 for _, h, _ in got)
    # the upstream saw the service's request headers on the three it got
    assert [r.headers.get("x-rls-checked") for r in up.requests] == ["yes"] * 3
    assert await sc.metric("ok") == 3 and await sc.metric("over_limit") == 3
    assert await sc.metric("error") == 0


async def test_route_and_virtual_host_descriptors(env):
    sc, rls, _ = env
    # /vh has no rate_limits of its own: the virtual host's (override)
    assert (await sc.get("/vh"))[0] == 200
    assert rls.descriptors() == [[("generic_key", "vh")]]
    # /user asks for both (include_vh_rate_limits): the route's first
    for _ in range(2):
        assert (await sc.get("/user", headers={"x-user": "ann"}))[0] == 200
    assert rls.descriptors() == [[("user", "ann")], [("generic_key", "vh")]]
    status, h, _ = await sc.get("/user", headers={"x-user": "ann"})
    assert status == 429
    # the descriptor closest to its limit gives remaining and reset; every policy is listed
    assert h["x-ratelimit-limit"] == '2, 2;w=3600;name="per-user", 100;w=3600'
    assert h["x-ratelimit-remaining"] == "0"
    assert (await sc.get("/user", headers={"x-user": "bob"}))[0] == 200   # one count per user
    # without x-user the route's descriptor is dropped, the virtual host's stays
    n = len(rls.service.seen)
    assert (await sc.get("/user"))[0] == 200
    assert len(rls.service.seen) == n + 1 and rls.descriptors() == [[("generic_key", "vh")]]
    # a direct response has no route entry: no call
    n = len(rls.service.seen)
    assert (await sc.get("/direct"))[0] == 204
    assert len(rls.service.seen) == n


async def test_every_action(env):
    sc, rls, _ = env
    await sc.get("/every?q=1", headers={"x-tenant": "t1", "x-beta": "1"})
    assert rls.descriptors() == [[
        ("tenant", "t1"), ("path", "/every?q=1"), ("remote_address", "127.0.0.1"),
        ("tier", "api"), ("header_match", "beta"), ("destination_cluster", "svc"),
        ("source_cluster", "")]]
    # skip_if_absent drops its entry only; a header_value_match that fails drops the descriptor
    n = len(rls.service.seen)
    assert (await sc.get("/every", headers={"x-beta": "1"}))[0] == 200
    assert rls.descriptors()[0][0] == ("path", "/every")
    assert (await sc.get("/every"))[0] == 200
    assert len(rls.service.seen) == n + 1                       # no descriptor: no call


async def test_service_failures_follow_failure_mode_deny(env):
    sc, rls, _ = env
    # a service slower than the timeout: let through (default), or 500 with RLSE
    t = time.monotonic()
    assert (await sc.get("/", "slow_open"))[0] == 200
    status, h, body = await sc.get("/", "slow_deny")
    print(f"slow service answered by policy within {time.monotonic() - t:.3f}s (100ms timeout)")
    assert status == 500 and body == "" and "x-envoy-ratelimited" not in h
    # nothing listening: status_on_error
    assert (await sc.get("/", "closed_deny"))[0] == 503
    # the main service killed: fail open; back on the same port: counted again
    await rls.stop()
    assert [(await sc.get("/ip"))[0] for _ in range(4)] == [200] * 4
    assert await sc.metric("failure_mode_allowed") >= 4
    await rls.start()
    statuses = []
    for _ in range(40):                      # the client probes the service after its backoff
        statuses.append((await sc.get("/ip"))[0])
        if statuses[-1] == 429:
            break
        await asyncio.sleep(0.1)
    assert statuses[-1] == 429
    assert await sc.metric("error") >= 4
