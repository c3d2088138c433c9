"""The RateLimitService client (unary gRPC through an HTTP/2 cluster: ``Cluster.send``)
against a real service (grpcio, Redis counts) run in its own process by the test."""

import asyncio
import time

import pytest

from sidecar.core.grpc import EnvoyGrpcService
from sidecar.shared.health import Unavailable
from sidecar.shared.rls import GrpcRateLimitService, RlsCode, RlsUnit, x_ratelimit_headers
from sidecar.shared.testing import RateLimitServiceProcess
from sidecar.testing import FilterTestEnv

HANG_GUARD_S = 5.0

LIMITS = {
    "domain": "edge",
    "descriptors": [
        {"key": "remote_address", "rate_limit": {"unit": "minute", "requests_per_unit": 3}},
        {"key": "generic_key", "value": "slow",
         "descriptors": [{"key": "path", "rate_limit": {"unit": "hour", "requests_per_unit": 2,
                                                        "name": "slow-path"}}]},
        {"key": "generic_key", "value": "free"},
    ],
}


@pytest.fixture
def rls(redis_server, tmp_path):
    p = RateLimitServiceProcess(redis_server.address, LIMITS, str(tmp_path)).start()
    yield p
    p.stop()


class Client:
    """The service behind a real HTTP/2 cluster, as the filter gets it."""

    def __init__(self, rls, timeout: float) -> None:
        self.env = FilterTestEnv(clusters={"rls": {"endpoints": [f"127.0.0.1:{rls.port}"],
                                                   "protocol": "http2"}})
        svc = self.env.rate_limit_service(EnvoyGrpcService("rls"))
        assert isinstance(svc, GrpcRateLimitService)
        self.svc = svc
        self.timeout = timeout

    async def should_rate_limit(self, domain, descriptors, hits_addend=0):
        return await self.svc.should_rate_limit(domain, descriptors, hits_addend, self.timeout)

    def status(self):
        return self.svc.status()

    def close(self) -> None:
        self.env.close()


def client(rls, timeout=0.5) -> Client:
    return Client(rls, timeout)


async def test_ok_then_over_limit_with_headers(rls):
    c = client(rls)
    desc = ((("remote_address", "10.1.1.1"),),)
    got = [await c.should_rate_limit("edge", desc) for _ in range(4)]
    assert [r.code for r in got] == [RlsCode.OK] * 3 + [RlsCode.OVER_LIMIT]
    assert [r.statuses[0].remaining for r in got] == [2, 1, 0, 0]
    s = got[0].statuses[0]
    assert s.limit.requests_per_unit == 3 and s.limit.unit is RlsUnit.MINUTE
    assert 1 <= s.reset_s <= 60
    h = dict(x_ratelimit_headers(got[1]))
    assert h["x-ratelimit-limit"] == "3, 3;w=60"
    assert h["x-ratelimit-remaining"] == "1"
    assert 1 <= int(h["x-ratelimit-reset"]) <= 60
    # another address has its own counter (a key without a value: one counter per value)
    other = await c.should_rate_limit("edge", ((("remote_address", "10.1.1.2"),),))
    assert other.code is RlsCode.OK and other.statuses[0].remaining == 2
    c.close()


async def test_nested_and_multiple_descriptors(rls):
    c = client(rls)
    slow = (("generic_key", "slow"), ("path", "/report"))
    free = (("generic_key", "free"),)
    r1 = await c.should_rate_limit("edge", (slow, free))
    assert r1.code is RlsCode.OK
    assert r1.statuses[1].limit is None                   # matched, but no limit: OK
    h = dict(x_ratelimit_headers(r1))
    assert h["x-ratelimit-limit"] == '2, 2;w=3600;name="slow-path"'
    await c.should_rate_limit("edge", (slow,))
    r3 = await c.should_rate_limit("edge", (free, slow))
    assert r3.code is RlsCode.OVER_LIMIT                   # any descriptor over: over
    assert [s.code for s in r3.statuses] == [RlsCode.OK, RlsCode.OVER_LIMIT]
    unknown = await c.should_rate_limit("edge", ((("user", "x"),),))
    assert unknown.code is RlsCode.OK and x_ratelimit_headers(unknown) == ()
    # hits_addend counts several hits at once
    r = await c.should_rate_limit("edge", ((("remote_address", "10.9.9.9"),),), hits_addend=3)
    assert r.code is RlsCode.OK and r.statuses[0].remaining == 0
    c.close()


async def test_service_down_then_recovers(rls):
    c = client(rls, timeout=0.3)
    desc = ((("remote_address", "10.2.2.2"),),)
    window = int(time.time() // 60)         # the service counts in fixed one-minute windows
    assert (await c.should_rate_limit("edge", desc)).code is RlsCode.OK
    rls.kill()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(c.should_rate_limit("edge", desc), HANG_GUARD_S)
    with pytest.raises(Unavailable):     # every call is made (Envoy): the cluster decides
        await asyncio.wait_for(c.should_rate_limit("edge", desc), HANG_GUARD_S)
    st = c.status()
    assert not st.up and st.calls == 3 and st.failures == 2 and st.last_error
    rls.start()                                          # same port
    deadline = time.monotonic() + HANG_GUARD_S
    got = None
    while time.monotonic() < deadline:
        try:
            got = await c.should_rate_limit("edge", desc)
            break
        except Unavailable:
            await asyncio.sleep(0.05)
    # the count survived the outage (2 used of 3), unless a new minute window began meanwhile
    same_window = int(time.time() // 60) == window
    assert got is not None and got.code is RlsCode.OK
    assert got.statuses[0].remaining == (1 if same_window else 2)
    assert c.status().up
    c.close()


async def test_service_without_redis_is_unavailable(rls, redis_server):
    c = client(rls)
    redis_server.kill()
    with pytest.raises(Unavailable) as e:
        await asyncio.wait_for(c.should_rate_limit("edge", ((("remote_address", "1"),),)),
                               HANG_GUARD_S)
    assert "UNAVAILABLE" in str(e.value) or "redis" in str(e.value)
    c.close()
