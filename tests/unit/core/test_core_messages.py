"""``sidecar.core`` without sockets: bodies (flow control, trailers, errors), Request/Response
buffering, local replies, the request context, upstream error flags and the reconnect backoff."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref

import pytest
from multidict import MultiDict

from sidecar.core import backoff as backoff_mod
from sidecar.core.backoff import Backoff, backoff_ceiling
from sidecar.core.body import (
    BodyAborted,
    BodyStream,
    BodyTooLarge,
    PrefixedStream,
    TransformedBody,
    body_length,
)
from sidecar.core.connection_id import ConnectionId
from sidecar.core.context import RequestContext
from sidecar.core.errors import (
    ConnectFailure,
    NoCluster,
    NoHealthyUpstream,
    Overflow,
    PendingTimeout,
    RouteTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from sidecar.core.message import Request, Response, local_reply


class Valve:
    """The producer side of flow control: counts pause/resume calls as a codec's transport would."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pause(self) -> None:
        self.pauses += 1
        self.paused = True

    def resume(self) -> None:
        self.resumes += 1
        self.paused = False


def stream(high_water: int = 10) -> tuple[BodyStream, Valve]:
    v = Valve()
    return BodyStream(v.pause, v.resume, high_water), v


def ctx() -> RequestContext:
    return RequestContext("ingress", ("10.0.0.7", 40000), 0.0, local_port=8080)


# ---- BodyStream -------------------------------------------------------------------------------

async def test_stream_pauses_past_high_water_once_and_resumes_when_read():
    s, v = stream(high_water=10)
    s.feed(b"x" * 10)
    assert (v.pauses, s.buffered) == (0, 10)          # at the mark: not past it
    s.feed(b"y")
    assert (v.pauses, v.paused, s.buffered) == (1, True, 11)
    s.feed(b"z" * 50)
    assert v.pauses == 1                               # already paused: not again
    data = await s.read()
    assert data == b"x" * 10 + b"y" + b"z" * 50        # everything waiting, joined
    assert (v.resumes, v.paused, s.buffered, s.total) == (1, False, 0, 61)
    s.feed(b"small")
    assert await s.read() == b"small"
    assert v.resumes == 1                              # never paused for it: no resume


async def test_stream_read_waits_for_the_producer_then_ends_with_trailers():
    s, _ = stream()
    reader = asyncio.ensure_future(s.read())
    await asyncio.sleep(0)
    assert not reader.done()
    s.feed(b"hello")
    assert await reader == b"hello"
    trailers = MultiDict({"grpc-status": "0"})
    end = asyncio.ensure_future(s.read())
    await asyncio.sleep(0)
    s.feed_eof(trailers)
    assert await end == b""
    assert s.trailers is trailers and s.ended and s.at_eof
    assert await s.read() == b""                       # the end is sticky


async def test_stream_ended_but_unread_is_not_at_eof():
    s, _ = stream()
    s.feed(b"tail")
    s.feed_eof()
    assert s.ended and not s.at_eof
    assert await s.read() == b"tail"
    assert s.at_eof


async def test_stream_error_reaches_the_reader_after_buffered_data():
    s, _ = stream()
    s.feed(b"partial")
    s.feed_error(BodyAborted("client went away"))
    assert s.failed
    assert await s.read() == b"partial"                # what arrived is still delivered
    with pytest.raises(BodyAborted) as e:
        await s.read()
    assert (e.value.status, e.value.flag) == (400, "DC")


async def test_stream_error_after_eof_is_ignored():
    s, _ = stream()
    s.feed(b"done")
    s.feed_eof()
    s.feed_error(ConnectionResetError("late reset"))
    assert not s.failed
    assert await s.read() == b"done"
    assert await s.read() == b""


async def test_stream_error_wakes_a_waiting_reader():
    s, _ = stream()
    reader = asyncio.ensure_future(s.read())
    await asyncio.sleep(0)
    s.feed_error(UpstreamTimeout())
    with pytest.raises(UpstreamTimeout):
        await reader


async def test_read_all_stops_past_the_limit():
    s, _ = stream(high_water=1 << 20)
    s.feed(b"a" * 6)
    s.feed_eof()
    with pytest.raises(BodyTooLarge):
        await s.read_all(5)
    s2, _ = stream(high_water=1 << 20)
    s2.feed(b"a" * 5)
    s2.feed_eof()
    assert await s2.read_all(5) == b"aaaaa"


async def test_async_iteration_yields_each_read_then_stops():
    s, _ = stream(high_water=1 << 20)

    async def produce():
        for part in (b"a", b"b", b"c"):
            s.feed(part)
            await asyncio.sleep(0)
        s.feed_eof()

    task = asyncio.ensure_future(produce())
    got = [chunk async for chunk in s]
    await task
    assert b"".join(got) == b"abc" and b"" not in got


async def test_prefixed_stream_replays_the_prefix_then_the_rest_and_its_trailers():
    rest, _ = stream()
    rest.feed(b"-rest")
    rest.feed_eof(MultiDict({"x-checksum": "abc"}))
    p = PrefixedStream([b"first", b"second"], rest)
    assert not p.at_eof
    assert await p.read() == b"firstsecond"
    assert await p.read() == b"-rest"
    assert await p.read() == b""
    assert p.trailers is not None and p.trailers["x-checksum"] == "abc"
    assert p.at_eof and p.total == 5       # total counts what the original source received


async def test_transformed_body_skips_empty_chunks_and_appends_finish():
    seen: list[bytes] = []

    def transform(chunk: bytes) -> bytes:
        seen.append(chunk)
        return b"" if chunk == b"drop" else chunk.upper()

    src, _ = stream(high_water=1 << 20)
    body = TransformedBody(src, transform, lambda: b"<end>")

    async def produce():     # one chunk per read of the source: feed them one at a time
        for part in (b"keep", b"drop", b"more"):
            src.feed(part)
            await asyncio.sleep(0)
        src.feed_eof(MultiDict({"t": "1"}))

    task = asyncio.ensure_future(produce())
    out = []
    while True:
        chunk = await body.read()
        if not chunk:
            break
        out.append(chunk)
    await task
    assert out == [b"KEEP", b"MORE", b"<end>"]       # "drop" became nothing: never a b"" mid-body
    assert body.at_eof and body.total == len(b"KEEPMORE<end>")
    assert body.trailers is not None and body.trailers["t"] == "1"
    assert seen == [b"keep", b"drop", b"more"]


def test_body_length_of_bytes_and_of_a_stream():
    s, _ = stream(high_water=1 << 20)
    s.feed(b"12345")
    assert body_length(b"abc") == 3
    assert body_length(s) == 5


# ---- Request / Response -----------------------------------------------------------------------

def request(body=b"", query: str = "") -> Request:
    return Request("POST", "/p%20q", query, MultiDict({"host": "svc.local", "x-a": "1"}), body, ctx())


async def test_request_read_body_replaces_the_stream_and_keeps_trailers():
    s, _ = stream(high_water=1 << 20)
    s.feed(b"pay")
    s.feed(b"load")
    s.feed_eof(MultiDict({"grpc-status": "0"}))
    req = request(s)
    assert req.authority == "svc.local" and req.url == "/p%20q"
    assert await req.read_body(100) == b"payload"
    assert req.body == b"payload"                      # replayable now
    assert req.trailers is not None and req.trailers["grpc-status"] == "0"
    assert await req.read_body(100) == b"payload"


async def test_request_read_body_refuses_a_complete_body_over_the_limit():
    with pytest.raises(BodyTooLarge):
        await request(b"x" * 11).read_body(10)


def test_request_url_carries_the_raw_query():
    assert request(query="a=1&b=%2F").url == "/p%20q?a=1&b=%2F"


async def test_response_read_body_and_release_once():
    s, _ = stream(high_water=1 << 20)
    s.feed(b"resp")
    s.feed_eof(MultiDict({"x-t": "v"}))
    r = Response(200, body=s)
    assert r.body_source() is s
    released: list[int] = []
    r.release = lambda: released.append(1)
    assert await r.read_body(10) == b"resp"
    assert r.body_source() is None and r.trailers is not None and r.trailers["x-t"] == "v"
    r.discard()
    r.discard()
    assert released == [1]                              # released exactly once


async def test_response_read_body_over_the_limit():
    s, _ = stream(high_water=1 << 20)
    s.feed(b"x" * 20)
    s.feed_eof()
    with pytest.raises(BodyTooLarge):
        await Response(200, body=s).read_body(10)


def test_response_defaults():
    r = Response(204)
    assert (r.status, dict(r.headers), r.body, r.local, r.trailers) == (204, {}, b"", False, None)


def test_local_reply_records_flag_and_details_and_defaults_content_type():
    c = ctx()
    r = local_reply(c, 503, "no healthy upstream", "UH", details="no_healthy_upstream")
    assert (r.status, r.body, r.local) == (503, b"no healthy upstream", True)
    assert r.headers["content-type"] == "text/plain"
    assert c.flags == ["UH"] and c.response_code_details == "no_healthy_upstream"


def test_local_reply_keeps_a_given_content_type_and_no_flag_leaves_flags_alone():
    c = ctx()
    r = local_reply(c, 403, '{"denied":true}', headers=MultiDict({"content-type": "application/json"}))
    assert r.headers.getall("content-type") == ["application/json"]
    assert c.flags == [] and c.response_code_details == ""


# ---- RequestContext / ConnectionId ------------------------------------------------------------

def test_request_context_defaults():
    c = ctx()
    assert (c.listener_name, c.local_port, c.remote_ip) == ("ingress", 8080, "10.0.0.7")
    assert (c.protocol, c.tls, c.peer_identity, c.route, c.connection) == ("HTTP/1.1", False, None, None, None)
    assert c.flags == [] and c.metadata == {} and c.tried_hosts == []
    c.flag("UF")
    c.flag("URX")
    assert c.flags == ["UF", "URX"]
    assert RequestContext("l", None, 0.0).remote_ip == ""


def test_request_context_is_slotted_no_string_keyed_state():
    c = ctx()
    with pytest.raises(AttributeError):
        c.some_new_field = 1  # type: ignore[attr-defined]


def test_request_contexts_do_not_share_mutable_state():
    a, b = ctx(), ctx()
    a.flag("NR")
    a.metadata.setdefault("envoy.filters.http.rbac", {})["shadow"] = "denied"
    assert b.flags == [] and b.metadata == {}


def test_connection_id_is_weakly_referenceable_and_goes_with_its_connection():
    cid = ConnectionId()
    c = ctx()
    c.connection = cid
    state: weakref.WeakKeyDictionary[ConnectionId, int] = weakref.WeakKeyDictionary()
    state[cid] = 5
    ref = weakref.ref(cid)
    del cid
    c.connection = None
    gc.collect()
    assert ref() is None and len(state) == 0
    with pytest.raises(AttributeError):
        ConnectionId().x = 1  # type: ignore[attr-defined]


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("err, flag, sent", [
    (ConnectFailure("refused"), "UF", False),
    (UpstreamReset("UC", "upstream connection termination"), "UC", True),
    (UpstreamReset("UR", "refused stream", sent=False), "UR", False),
    (UpstreamTimeout(), "UT", True),
    (PendingTimeout(), "UT", True),
    (RouteTimeout(), "UT", True),
    (UpstreamProtocolError("bad status line"), "UPE", True),
    (NoHealthyUpstream(), "UH", False),
    (Overflow("max_requests"), "UO", False),
    (NoCluster("gone"), "NC", False),
])
def test_each_upstream_error_carries_envoys_flag_and_whether_bytes_were_sent(err, flag, sent):
    assert isinstance(err, UpstreamError)
    assert (err.flag, err.sent) == (flag, sent)
    assert str(err) == err.reason


def test_error_reasons_and_hierarchy():
    assert NoCluster("payments").reason == "cluster not found: payments"
    assert Overflow("pending").reason == "overflow: pending"
    assert UpstreamTimeout().reason == "upstream request timeout"
    assert isinstance(PendingTimeout(), UpstreamTimeout) and isinstance(RouteTimeout(), UpstreamTimeout)
    assert isinstance(BodyAborted("x"), ConnectionError)
    assert (BodyAborted("bad chunk", 400, "DPE").flag, BodyAborted("x", 503).status) == ("DPE", 503)


# ---- Backoff (reconnect loops: equal jitter) ---------------------------------------------------

def test_backoff_equal_jitter_stays_in_the_upper_half_of_the_growing_ceiling(monkeypatch):
    rng = random.Random(7)
    monkeypatch.setattr(backoff_mod.random, "random", rng.random)
    b = Backoff(0.5, 8.0)
    for attempt in range(10):
        ceiling = backoff_ceiling(attempt, 0.5, 8.0)
        d = b.next()
        assert ceiling / 2 <= d < ceiling
    assert b.attempt == 10


def test_backoff_extremes_and_reset(monkeypatch):
    draws = iter([0.0, 0.999999, 0.0])
    monkeypatch.setattr(backoff_mod.random, "random", lambda: next(draws))
    b = Backoff(1.0, 4.0)
    assert b.next() == 0.5                          # ceiling 1: at least half of it
    assert b.next() == pytest.approx(2.0, rel=1e-5)  # ceiling 2: just under it
    b.reset()
    assert b.attempt == 0
    assert b.next() == 0.5                          # back to the first ceiling


def test_backoff_never_passes_the_cap_however_many_failures():
    b = Backoff(0.1, 3.0)
    b.attempt = 1000                                # the exponent is bounded: no overflow
    assert all(1.5 <= b.next() < 3.0 for _ in range(50))
