"""gRPC in the route layers, without sockets: local replies shaped as Envoy shapes them,
grpc-timeout under ``max_stream_duration`` (manual clock), retries on gRPC status codes and
``x-envoy-retry-grpc-on``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict

from sidecar.cluster.cluster import Cluster, ClusterState
from sidecar.config.cluster import Cluster as ClusterConfig
from sidecar.config.route import RetryPolicy, RouteAction, StreamDuration
from sidecar.core.context import RequestContext
from sidecar.core.errors import UpstreamTimeout
from sidecar.core.message import Request, Response, local_reply
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.route.observe import grpc_local_reply, grpc_message, grpc_status_of
from sidecar.route.retry import RetryLayer, grpc_is_retriable, request_overrides
from sidecar.route.timeout import TimeoutLayer, parse_grpc_timeout, stream_duration


def grpc_req(headers=(), body: bytes = b"\x00\x00\x00\x00\x00") -> Request:
    h = MultiDict([("content-type", "application/grpc"), ("te", "trailers"), *headers])
    ctx = RequestContext("l", ("127.0.0.1", 1), 0.0)
    ctx.grpc = True
    gt = h.get("grpc-timeout")
    ctx.grpc_timeout = parse_grpc_timeout(gt) if gt else None
    return Request("POST", "/pkg.Svc/M", "", h, body, ctx, "2")


# ---- local replies -----------------------------------------------------------------------------

@pytest.mark.parametrize("status,body,grpc", [
    (404, "", "12"), (503, "no healthy upstream", "14"), (504, "upstream request timeout", "14"),
    (429, "local_rate_limited", "14"), (401, "Jwt is missing", "16"), (403, "RBAC: access denied", "7"),
    (400, "bad", "13"), (500, "internal error", "2"), (502, "x", "14"),
])
def test_local_reply_mapping(status, body, grpc):
    """Envoy's Grpc::Utility::httpToGrpcStatus; the body becomes grpc-message; other headers
    of the reply stay (www-authenticate, x-envoy-overloaded)."""
    ctx = RequestContext("l", None, 0.0)
    r = local_reply(ctx, status, body, None, MultiDict({"www-authenticate": "Bearer"}))
    g = grpc_local_reply(r)
    assert (g.status, g.body, g.local) == (200, b"", True)
    assert g.headers["content-type"] == "application/grpc" and g.headers["grpc-status"] == grpc
    assert g.headers.get("grpc-message") == (body or None)
    assert g.headers["www-authenticate"] == "Bearer" and "content-length" not in g.headers


def test_grpc_message_percent_encoding():
    assert grpc_message("plain text: ok") == "plain text: ok"
    assert grpc_message("50% d\u00e9j\u00e0\n") == "50%25 d%C3%A9j%C3%A0%0A"


@given(st.text(max_size=50))
def test_grpc_message_is_printable_ascii(text):
    out = grpc_message(text)
    assert all(" " <= c <= "~" for c in out)


def test_grpc_status_in_headers_or_trailers():
    r = Response(200, MultiDict({"grpc-status": "5"}))
    assert grpc_status_of(r) == "5"
    r = Response(200, MultiDict(), b"x")
    r.trailers = MultiDict({"grpc-status": "0"})
    assert grpc_status_of(r) == "0"
    assert grpc_status_of(Response(200)) is None


# ---- grpc-timeout ------------------------------------------------------------------------------

@pytest.mark.parametrize("v,secs", [("3S", 3.0), ("200m", 0.2), ("1H", 3600.0), ("5M", 300.0),
                                    ("100u", 1e-4), ("7n", 7e-9), ("0S", 0.0)])
def test_parse_grpc_timeout(v, secs):
    assert parse_grpc_timeout(v) == pytest.approx(secs)


@pytest.mark.parametrize("v", ["", "S", "12", "123456789S", "1x", "-1S", "1.5S", "١S"])
def test_parse_grpc_timeout_invalid(v):
    assert parse_grpc_timeout(v) is None


def test_stream_duration_caps_and_offsets():
    d = StreamDuration(grpc_header_max_s=5.0, grpc_header_offset_s=0.5)
    assert stream_duration(d, grpc_req([("grpc-timeout", "2S")])) == pytest.approx(1.5)
    assert stream_duration(d, grpc_req([("grpc-timeout", "60S")])) == pytest.approx(4.5)
    assert stream_duration(d, grpc_req()) is None       # no header: max_stream_duration applies
    assert stream_duration(StreamDuration(0.0), grpc_req([("grpc-timeout", "9S")])) == 9.0
    assert stream_duration(StreamDuration(), grpc_req([("grpc-timeout", "9S")])) is None
    plain = grpc_req([("grpc-timeout", "2S")])
    plain.ctx.grpc = False
    assert stream_duration(d, plain) is None            # only gRPC requests use the header


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_timeout_layer_with_max_stream_duration():
    clock = Clock()
    seen: list[tuple[float | None, str | None]] = []

    async def slow(req: Request) -> Response:
        seen.append((req.ctx.deadline, req.headers.get("x-envoy-expected-rq-timeout-ms")))
        clock.now += 1.0
        raise UpstreamTimeout()

    action = RouteAction(cluster="c", timeout_s=15.0,
                         max_stream_duration=StreamDuration(grpc_header_max_s=5.0))
    layer = TimeoutLayer(action, slow, True, clock)
    req = grpc_req([("grpc-timeout", "200m")])
    resp = await layer(req)
    # the route timeout no longer applies (no expected-timeout header), the grpc-timeout does,
    # and the codec's sweep bounds the rest of the stream with it
    assert seen == [(pytest.approx(100.2), None)]
    assert req.ctx.max_stream_duration == pytest.approx(0.2)
    assert resp.status == 200 and resp.headers["grpc-status"] == "4"
    assert resp.headers["grpc-message"] == "downstream duration timeout" and resp.local

    async def ok(req: Request) -> Response:
        seen.append((req.ctx.deadline, None))
        return Response(200)

    seen.clear()
    await TimeoutLayer(action, ok, True, clock)(grpc_req())
    assert seen == [(None, None)]       # no header, no max: unbounded (Envoy)
    seen.clear()
    req = grpc_req()
    req.ctx.max_stream_duration = 2.0     # the route's max_stream_duration (route.action sets it)
    await TimeoutLayer(action, ok, True, clock)(req)
    assert seen == [(pytest.approx(clock.now + 2.0), None)]


async def test_duration_timeout_reply_for_plain_http():
    """Envoy: 504 once the whole request had arrived, 408 while it was still arriving."""
    from sidecar.core.body import BodyStream
    from sidecar.route.timeout import duration_timeout_reply
    req = grpc_req()
    req.ctx.grpc = False
    assert duration_timeout_reply(req).status == 504
    req.body = BodyStream(lambda: None, lambda: None)
    assert duration_timeout_reply(req).status == 408


# ---- retries -------------------------------------------------------------------------------------

def test_grpc_retry_decision():
    p = RetryPolicy(retry_on=frozenset({"unavailable", "deadline-exceeded"}))
    assert grpc_is_retriable(p, MultiDict({"grpc-status": "14"}))
    assert grpc_is_retriable(p, MultiDict({"grpc-status": "4"}))
    assert not grpc_is_retriable(p, MultiDict({"grpc-status": "13"}))
    assert not grpc_is_retriable(p, MultiDict())
    assert not grpc_is_retriable(RetryPolicy(retry_on=frozenset({"5xx"})), MultiDict({"grpc-status": "14"}))


def test_retry_grpc_on_header():
    h = MultiDict({"x-envoy-retry-grpc-on": "internal, cancelled,bogus"})
    n, policy, _ = request_overrides(h, RetryPolicy(retry_on=frozenset({"5xx"})))
    assert policy.retry_on == frozenset({"5xx", "internal", "cancelled"})
    assert "x-envoy-retry-grpc-on" not in h


async def test_retry_layer_retries_trailers_only_grpc_failures():
    answers = ["14", "8", "0"]

    async def upstream(req: Request) -> Response:
        code = answers.pop(0)
        return Response(200, MultiDict({"content-type": "application/grpc", "grpc-status": code}))

    state = ClusterState("c", StatsCache(Metrics(enabled=False)).cluster("c"))
    stats = StatsCache(Metrics(enabled=False)).cluster("c")
    policy = RetryPolicy(retry_on=frozenset({"unavailable", "resource-exhausted"}), num_retries=3,
                         backoff_base_s=0.0, backoff_max_s=0.0, retry_non_idempotent=True)

    async def no_sleep(d: float) -> None:
        return None

    layer = RetryLayer(policy, upstream, state, stats, False, sleep=no_sleep)
    state.current = Cluster(ClusterConfig(name="c"), state, (), None)   # the retry breaker's
    resp = await layer(grpc_req())
    assert resp.headers["grpc-status"] == "0" and answers == []
