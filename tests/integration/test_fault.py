"""Fault injection filter (envoy.filters.http.fault): config in both formats, and behaviour
through the real proxy to real upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import aiohttp
import pytest

import filters
from filters.fault import FaultConfig, from_envoy, from_native
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.testing import Upstream, native_config, running_proxy, to_snapshot

T_FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def sa(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def envoy_bootstrap(vhost: dict, clusters: dict, http_filters: list) -> dict:
    hcm = {"@type": T_HCM, "stat_prefix": "in",
           "route_config": {"name": "r", "virtual_hosts": [{"name": "vh", "domains": ["*"], **vhost}]},
           "http_filters": http_filters + [{"name": "envoy.filters.http.router",
                                            "typed_config": {"@type": T_ROUTER}}]}
    cl = [{"name": n, "type": "STATIC", "connect_timeout": "1s",
           "load_assignment": {"cluster_name": n, "endpoints": [
               {"lb_endpoints": [{"endpoint": {"address": sa(u.port)}}]}]}} for n, u in clusters.items()]
    return {"admin": {"address": sa(0)},
            "static_resources": {"listeners": [{"name": "l", "address": sa(0), "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                              "typed_config": hcm}]}]}], "clusters": cl}}


def metric(proxy, name: str, **labels) -> float:
    v = proxy.app.metrics.registry.get_sample_value(name, labels)
    return v or 0.0


async def wait_lines(path, n: int, timeout: float = 2.0) -> None:
    """The access log line is written just after the response: wait for it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        await asyncio.sleep(0.01)


async def timed_get(s, url, **kw):
    t = time.monotonic()
    async with s.get(url, **kw) as r:
        body = await r.text()
        return r.status, body, time.monotonic() - t, r.headers


# ---- config ---------------------------------------------------------------------------------

def test_native_config():
    c = from_native({"delay": {"fixed": "2s", "percent": 10}, "abort": {"status": 503, "percent": 5},
                     "upstream_cluster": "v2", "headers": {"x-fault": "on"},
                     "downstream_nodes": ["frontend"], "max_active_faults": 7}, "f")
    assert c.delay.fixed_s == 2.0 and c.delay.percent.fraction == pytest.approx(0.10)
    assert c.abort.http_status == 503 and c.abort.percent.fraction == pytest.approx(0.05)
    assert c.upstream_cluster == "v2" and c.downstream_nodes == frozenset({"frontend"})
    assert c.max_active_faults == 7 and c.headers[0].name == "x-fault"
    # short forms, default 100 %
    c = from_native({"delay": "250ms", "abort": 418}, "f")
    assert c.delay.fixed_s == 0.25 and c.delay.percent.fraction == 1.0
    assert c.abort.http_status == 418
    c = from_native({"delay": {"header": True}, "abort": {"grpc_status": 14, "percent": 50}}, "f")
    assert c.delay.header and c.abort.grpc_status == 14


@pytest.mark.parametrize("cfg,path", [
    ({"delay": {"fixed": "1s", "header": True}}, "f.delay"),
    ({"abort": {"status": 99}}, "f.abort.status"),
    ({"abort": {"status": 503, "percent": 101}}, "f.abort.percent"),
    ({"delay": {"fixed": "0s"}}, "f.delay.fixed"),
    ({"delay": {"fixed": "1s", "pct": 3}}, "f.delay.pct"),
    ({"abort": {"status": 503}, "rate": 1}, "f.rate"),
    ({"abort": {"status": 503}, "max_active_faults": -1}, "f.max_active_faults"),
])
def test_native_config_errors(cfg, path):
    with pytest.raises(ConfigError) as e:
        from_native(cfg, "f")
    assert e.value.path == path


def test_envoy_config():
    c = from_envoy({"delay": {"fixed_delay": "0.5s", "percentage": {"numerator": 25, "denominator": "TEN_THOUSAND"}},
                    "abort": {"http_status": 500, "percentage": {"numerator": 100}},
                    "headers": [{"name": "x-fault", "exact_match": "1"}],
                    "downstream_nodes": ["a", "b"], "max_active_faults": 3,
                    "upstream_cluster": "v1"}, "t")
    assert c.delay.fixed_s == 0.5 and c.delay.percent.fraction == pytest.approx(0.0025)
    assert c.delay.percent.denominator == 10_000
    assert c.abort.http_status == 500 and c.abort.percent.fraction == 1.0
    assert c.max_active_faults == 3 and len(c.headers) == 1
    # Envoy's default percentage is 0
    c = from_envoy({"abort": {"header_abort": {}}}, "t")
    assert c.abort.header and c.abort.percent.fraction == 0.0
    c = from_envoy({"abort": {"grpc_status": 8, "percentage": {"numerator": 1}},
                    "delay": {"header_delay": {}, "percentage": {"numerator": 1}}}, "t")
    assert c.abort.grpc_status == 8 and c.delay.header


@pytest.mark.parametrize("cfg,path,msg", [
    ({"response_rate_limit": {"fixed_limit": {"limit_kbps": 1}}}, "t.response_rate_limit", "not supported"),
    ({"abort_percent_runtime": "x"}, "t.abort_percent_runtime", "runtime"),
    ({"abort": {"http_status": 600}}, "t.abort.http_status", "200..599"),
    ({"abort": {"http_status": 503, "grpc_status": 1}}, "t.abort", "only one"),
    ({"delay": {"percentage": {"numerator": 1}}}, "t.delay", "one of"),
    ({"delay": {"fixed_delay": "1s", "type": "FIXED"}}, "t.delay.type", "unknown"),
    ({"bogus": 1}, "t.bogus", "unknown"),
    ({"abort": {"http_status": 503, "percentage": {"numerator": 1, "denominator": "THOUSAND"}}},
     "t.abort.percentage.denominator", "one of"),
])
def test_envoy_config_errors(cfg, path, msg):
    with pytest.raises(ConfigError) as e:
        from_envoy(cfg, "t")
    assert e.value.path == path and msg in e.value.message


def test_registry_and_snapshot_errors_have_paths():
    spec = filters.lookup("fault")
    assert spec is filters.lookup("envoy.filters.http.fault")
    assert spec.type_url == T_FAULT and spec.per_route_type_url == T_FAULT
    with pytest.raises(ConfigErrors) as e:
        to_snapshot(native_config(clusters={"a": ["127.0.0.1:1"]},
                                  routes=[{"match": {"prefix": "/"}, "cluster": "a"}],
                                  filters=[{"fault": {"abort": {"status": 1}}}]))
    assert "listeners[0].filters[0].fault.abort.status" in str(e.value)


# ---- behaviour ------------------------------------------------------------------------------

async def test_fixed_delay_does_not_block_the_loop(tmp_path):
    log = tmp_path / "access.log"
    async with Upstream() as up:
        cfg = native_config(
            clusters={"svc": [up.address]},
            routes=[{"match": {"prefix": "/slow"}, "cluster": "svc",
                     "filters": {"fault": {"delay": {"fixed": "300ms"}}}},
                    {"match": {"prefix": "/"}, "cluster": "svc"}],
            filters=[{"fault": {}}],
            listener={"access_log": {"path": str(log), "format": "json"}})
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            st, _, dt, _ = await timed_get(s, p.url("/slow"))
            assert st == 200 and 0.28 <= dt < 2.0
            # ten delayed requests at once plus a fast one: the loop keeps serving
            t0 = time.monotonic()
            slow = [asyncio.ensure_future(timed_get(s, p.url("/slow"))) for _ in range(10)]
            await asyncio.sleep(0.05)
            st, _, fast_dt, _ = await timed_get(s, p.url("/fast"))
            assert st == 200 and fast_dt < 0.2
            res = await asyncio.gather(*slow)
            assert all(r[0] == 200 and r[2] >= 0.28 for r in res)
            assert time.monotonic() - t0 < 1.5          # concurrent, not serialised
            assert metric(p, "sidecar_fault_injected_total", kind="delay") == 11
            assert metric(p, "sidecar_fault_active") == 0
            await wait_lines(log, 12)
        assert len(up.requests) == 12
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    flags = [x["response_flags"] for x in lines]
    assert flags.count("DI") == 11 and flags.count("-") == 1


async def test_abort_never_reaches_upstream_and_flags_fi(tmp_path):
    log = tmp_path / "access.log"
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            filters=[{"fault": {"abort": {"status": 503}}}],
                            listener={"access_log": {"path": str(log), "format": "json"}})
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            for _ in range(5):
                st, body, _, _ = await timed_get(s, p.url("/x"))
                assert st == 503 and body == "fault filter abort"
            assert metric(p, "sidecar_fault_injected_total", kind="abort") == 5
            await wait_lines(log, 5)
        assert up.requests == []
    assert all(json.loads(x)["response_flags"] == "FI" for x in log.read_text().splitlines())


async def test_delay_then_abort_and_percentages():
    async with Upstream() as up:
        cfg = native_config(
            clusters={"svc": [up.address]},
            routes=[{"match": {"prefix": "/both"}, "cluster": "svc",
                     "filters": {"fault": {"delay": "100ms", "abort": 429}}},
                    {"match": {"prefix": "/"}, "cluster": "svc"}],
            filters=[{"fault": {"abort": {"status": 500, "percent": 30}}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            st, _, dt, _ = await timed_get(s, p.url("/both"))
            assert st == 429 and dt >= 0.09
            statuses = await asyncio.gather(*(timed_get(s, p.url("/p")) for _ in range(400)))
            n500 = sum(1 for x in statuses if x[0] == 500)
            assert 80 <= n500 <= 160, n500       # binomial(400, .3): mean 120, sd 9.2
            assert len(up.requests) == 400 - n500


async def test_header_controlled_faults_only_when_enabled():
    async with Upstream() as up:
        cfg = native_config(
            clusters={"svc": [up.address]},
            routes=[{"match": {"prefix": "/on"}, "cluster": "svc",
                     "filters": {"fault": {"delay": {"header": True}, "abort": {"header": True, "percent": 50}}}},
                    {"match": {"prefix": "/"}, "cluster": "svc"}],
            filters=[{"fault": {"abort": {"status": 503, "percent": 0}}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            h = {"x-envoy-fault-abort-request": "418", "x-envoy-fault-delay-request": "200"}
            # not enabled on this route: headers ignored
            st, _, dt, _ = await timed_get(s, p.url("/off"), headers=h)
            assert st == 200 and dt < 0.15
            # enabled: delay from the header; abort percentage header capped at 50
            st, _, dt, _ = await timed_get(s, p.url("/on"), headers={"x-envoy-fault-delay-request": "200"})
            assert st == 200 and dt >= 0.18
            hp = {"x-envoy-fault-abort-request": "418", "x-envoy-fault-abort-request-percentage": "100"}
            res = await asyncio.gather(*(timed_get(s, p.url("/on"), headers=hp) for _ in range(300)))
            n = sum(1 for r in res if r[0] == 418)
            assert 110 <= n <= 190, n             # capped at 50 %: mean 150, sd 8.7
            hp0 = {"x-envoy-fault-abort-request": "418", "x-envoy-fault-abort-request-percentage": "0"}
            res = await asyncio.gather(*(timed_get(s, p.url("/on"), headers=hp0) for _ in range(50)))
            assert all(r[0] == 200 for r in res)
            # invalid status: no abort
            st, *_ = await timed_get(s, p.url("/on"), headers={"x-envoy-fault-abort-request": "700"})
            assert st == 200
            # gRPC abort from a header: trailers-only responses (for about half, as capped)
            hg = {"x-envoy-fault-abort-grpc-request": "14", "x-envoy-fault-abort-request-percentage": "100"}
            res = await asyncio.gather(*(timed_get(s, p.url("/on"), headers=hg) for _ in range(30)))
            assert all(r[0] == 200 for r in res)
            grpc = [r[3] for r in res if "grpc-status" in r[3]]
            assert 1 <= len(grpc) < 30
            assert all(h["grpc-status"] == "14" and h["content-type"] == "application/grpc" for h in grpc)


async def test_grpc_status_abort():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            filters=[{"fault": {"abort": {"grpc_status": 14}}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            st, body, _, rh = await timed_get(s, p.url("/pkg.Svc/Call"))
            assert st == 200 and rh["grpc-status"] == "14" and rh["content-type"] == "application/grpc"
            assert rh["grpc-message"] == "fault filter abort"
        assert up.requests == []


async def test_restrictions_headers_nodes_upstream_cluster():
    async with Upstream() as a, Upstream() as b:
        cfg = native_config(
            clusters={"a": [a.address], "b": [b.address]},
            routes=[{"match": {"prefix": "/a"}, "cluster": "a"},
                    {"match": {"prefix": "/b"}, "cluster": "b"},
                    {"match": {"prefix": "/w"}, "weighted": {"a": 50, "b": 50}}],
            filters=[{"fault": {"abort": 503, "upstream_cluster": "b",
                                "headers": {"x-chaos": "yes"}, "downstream_nodes": ["frontend"]}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            good = {"x-chaos": "yes", "x-envoy-downstream-service-node": "frontend"}
            assert (await timed_get(s, p.url("/b"), headers=good))[0] == 503
            assert (await timed_get(s, p.url("/a"), headers=good))[0] == 200      # other cluster
            assert (await timed_get(s, p.url("/b"), headers={"x-chaos": "yes"}))[0] == 200  # no node
            assert (await timed_get(s, p.url("/b"), headers={
                "x-chaos": "no", "x-envoy-downstream-service-node": "frontend"}))[0] == 200
            assert (await timed_get(s, p.url("/b"), headers={
                "x-chaos": "yes", "x-envoy-downstream-service-node": "backend"}))[0] == 200
            # weighted route: only the requests the router sends to b are aborted
            a_before, b_before = len(a.requests), len(b.requests)
            res = await asyncio.gather(*(timed_get(s, p.url("/w"), headers=good) for _ in range(200)))
            n503 = sum(1 for r in res if r[0] == 503)
            assert 60 <= n503 <= 140
            assert len(b.requests) == b_before            # b never reached
            assert len(a.requests) - a_before == 200 - n503


async def test_max_active_faults_overflow():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            filters=[{"fault": {"delay": "400ms", "max_active_faults": 2}}])
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            res = await asyncio.gather(*(timed_get(s, p.url("/")) for _ in range(6)))
            delayed = sum(1 for r in res if r[2] >= 0.38)
            assert delayed == 2
            assert metric(p, "sidecar_fault_overflow_total") == 4
            assert metric(p, "sidecar_fault_active") == 0


async def test_per_route_override_and_disable_envoy_format():
    async with Upstream() as up:
        vhost = {
            "typed_per_filter_config": {"envoy.filters.http.fault": {
                "@type": T_FAULT, "abort": {"http_status": 502, "percentage": {"numerator": 100}}}},
            "routes": [
                {"match": {"prefix": "/override"}, "route": {"cluster": "svc"},
                 "typed_per_filter_config": {"envoy.filters.http.fault": {
                     "@type": T_FAULT, "abort": {"http_status": 418, "percentage": {"numerator": 100}}}}},
                {"match": {"prefix": "/off"}, "route": {"cluster": "svc"},
                 "typed_per_filter_config": {"envoy.filters.http.fault": {
                     "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}},
                {"match": {"prefix": "/delay"}, "route": {"cluster": "svc"},
                 "typed_per_filter_config": {"envoy.filters.http.fault": {
                     "@type": T_FAULT, "delay": {"fixed_delay": "0.2s", "percentage": {"numerator": 100}}}}},
                {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
            ]}
        http_filters = [{"name": "envoy.filters.http.fault", "typed_config": {
            "@type": T_FAULT, "abort": {"http_status": 500, "percentage": {"numerator": 100}}}}]
        cfg = envoy_bootstrap(vhost, {"svc": up}, http_filters)
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            assert (await timed_get(s, p.url("/override")))[0] == 418
            assert (await timed_get(s, p.url("/off")))[0] == 200
            assert (await timed_get(s, p.url("/x")))[0] == 502        # virtual host level
            st, _, dt, _ = await timed_get(s, p.url("/delay"))
            assert st == 200 and dt >= 0.18
        assert len(up.requests) == 2


async def test_envoy_header_abort_with_default_percentage_is_off():
    async with Upstream() as up:
        http_filters = [{"name": "envoy.filters.http.fault", "typed_config": {
            "@type": T_FAULT, "abort": {"header_abort": {}}}}]
        cfg = envoy_bootstrap({"routes": [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]},
                              {"svc": up}, http_filters)
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            st, *_ = await timed_get(s, p.url("/"), headers={"x-envoy-fault-abort-request": "503"})
            assert st == 200      # Envoy: percentage absent = 0 %


def test_fault_config_is_frozen():
    c = FaultConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.upstream_cluster = "x"   # type: ignore[misc]
