"""gRPC through the proxy under test, compared with Envoy 1.40 (configs/grpc.yaml).

Real grpcio clients and servers: the four call kinds with custom metadata and trailers,
trailers-only errors, large messages, many concurrent calls; every gRPC-shaped local reply
(over HTTP/2 and over HTTP/1.1, byte-level view of the response); grpc-timeout with
max_stream_duration; retry_on gRPC codes; circuit breakers counting requests; gRPC health
checking of endpoints.
"""

from __future__ import annotations

import hashlib
import queue
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from h2conf_grpc import (
    call_outcome,
    channel,
    clean_headers,
    raw_grpc_h1,
    raw_grpc_h2,
    stubs,
    wait_until,
)
from h2conf_peers import SERVICE, grpc_messages

# ---- the four call kinds ---------------------------------------------------------------------


def _unary(proxy, md=(), message=b"hello", timeout=10.0):
    with channel(proxy.port()) as ch:
        return call_outcome(lambda: stubs(ch)["Unary"].with_call(
            message, metadata=list(md), timeout=timeout))


def test_unary_with_metadata_and_trailers(grpc_pair):
    """Custom initial and trailing metadata (text and -bin) pass both ways."""
    md = [("x-initial", "x-first=1"), ("x-trailing", "x-t1=a;x-t2=b"),
          ("x-custom-bin", b"\x00\x01\xff")]
    out = grpc_pair.same("unary-metadata", lambda p: _unary(p, md))
    assert out["code"] == "OK" and out["value"] == b"hello"
    assert ("x-t1", "a") in out["trailing"] and ("x-first", "1") in out["initial"]


def test_unary_request_as_the_upstream_sees_it(grpc_pair):
    """The request metadata the gRPC server receives (proxy-added headers included)."""
    def seen(p):
        key = str(uuid.uuid4())
        out = _unary(p, [("x-key", key), ("x-custom", "v")])
        call = grpc_pair.peers.grpc.calls_with("x-key", key)[0]
        return {"outcome": out["code"],
                "metadata": clean_headers([(k, v) for k, v in call.metadata
                                           if isinstance(v, str) and k != "user-agent"])}
    out = grpc_pair.same("unary-upstream-view", seen)
    assert out["outcome"] == "OK"


def test_server_streaming(grpc_pair):
    def run(p):
        with channel(p.port()) as ch:
            it = stubs(ch)["ServerStream"](b"200:1000", metadata=[("x-trailing", "x-done=yes")],
                                          timeout=20)
            msgs = list(it)
            return {"count": len(msgs), "digest": hashlib.md5(b"".join(msgs)).hexdigest(),
                    "code": it.code().name, "trailing": clean_headers(it.trailing_metadata())}
    out = grpc_pair.same("server-streaming", run)
    assert out["count"] == 200 and out["code"] == "OK"


def test_server_streaming_error_after_messages(grpc_pair):
    """grpc-status in real trailers after some messages (not trailers-only)."""
    def run(p):
        with channel(p.port()) as ch:
            it = stubs(ch)["ServerStream"](b"10:10", metadata=[("x-fail-after", "3")], timeout=20)
            got: list[bytes] = []
            try:
                got.extend(it)
            except grpc.RpcError:
                pass
            return {"count": len(got), "code": it.code().name, "details": it.details()}
    out = grpc_pair.same("server-streaming-error", run)
    assert out == {"count": 3, "code": "ABORTED", "details": "stopped after 3"}


def test_client_streaming(grpc_pair):
    msgs = [bytes([i % 256]) * (i * 37 % 5000) for i in range(300)]

    def run(p):
        with channel(p.port()) as ch:
            return call_outcome(lambda: stubs(ch)["ClientStream"].with_call(iter(msgs),
                                                                            timeout=20))
    out = grpc_pair.same("client-streaming", run)
    total = sum(len(m) for m in msgs)
    assert out["value"] == f"300:{total}:{hashlib.md5(b''.join(msgs)).hexdigest()}".encode()


def test_bidi_ping_pong(grpc_pair):
    """Each message is answered before the next is sent: nothing is buffered to the end."""
    def run(p):
        outbox: queue.Queue = queue.Queue()

        def requests():
            while True:
                m = outbox.get()
                if m is None:
                    return
                yield m

        replies = []
        with channel(p.port()) as ch:
            it = stubs(ch)["Bidi"](requests(), timeout=20)
            for i in range(50):
                outbox.put(b"m%d" % i)
                replies.append(next(it))
            outbox.put(None)
            rest = list(it)
            return {"replies": replies, "rest": rest, "code": it.code().name}
    out = grpc_pair.same("bidi", run)
    assert out["replies"] == [b"echo:m%d" % i for i in range(50)] and out["code"] == "OK"


def test_trailers_only_error(grpc_pair):
    """An error with no message: one HEADERS frame with END_STREAM (trailers-only), on the
    wire and to a grpcio client."""
    extra = [("x-fail", "NOT_FOUND"), ("x-fail-message", "no such thing"),
             ("x-trailing", "x-why=missing")]
    wire = grpc_pair.same("trailers-only-wire", lambda p: raw_grpc_h2(p.port(), "x", extra=extra))
    assert wire["trailers_only"] and ("grpc-status", "5") in wire["headers"]
    out = grpc_pair.same("trailers-only-client", lambda p: _unary(p, extra))
    assert (out["code"], out["details"]) == ("NOT_FOUND", "no such thing")


@pytest.mark.parametrize("direction", ["request", "response"])
def test_large_messages(grpc_pair, direction):
    size = 8 << 20
    md = [("x-size", str(size))] if direction == "response" else []
    message = b"x" * size if direction == "request" else b"small"

    def run(p):
        out = _unary(p, md, message=message, timeout=30)
        value = out.pop("value")
        out["len"] = len(value or b"")
        out["md5"] = hashlib.md5(value or b"").hexdigest()
        return out
    out = grpc_pair.same(f"large-{direction}", run)
    assert out["code"] == "OK" and out["len"] == size


def test_many_concurrent_calls(grpc_pair):
    """300 concurrent unary calls on one channel (one HTTP/2 connection)."""
    def run(p):
        with channel(p.port()) as ch:
            unary = stubs(ch)["Unary"]
            futures = [unary.future(b"n%d" % i, metadata=[("x-delay", "0.05")], timeout=30)
                       for i in range(300)]
            values = [f.result() for f in futures]
        return {"ok": values == [b"n%d" % i for i in range(300)]}
    assert grpc_pair.same("concurrent-calls", run) == {"ok": True}


# ---- local replies -------------------------------------------------------------------------

LOCAL_REPLIES = [
    # name, route (x-route), path, extra request headers
    ("no-route", "x", "/other.Service/Method", ()),
    ("no-healthy-upstream", "nohealthy", None, ()),
    ("connect-failure", "refused", None, ()),
    ("route-timeout", "timeout", None, (("x-delay", "3"),)),
    ("jwt-missing", "jwt", None, ()),
    ("jwt-invalid", "jwt", None, (("authorization", "Bearer not.a.jwt"),)),
    ("rbac-deny", "rbac", None, ()),
    ("fault-abort-grpc-status", "fault-grpc", None, ()),
    ("fault-abort-http-status", "fault-http", None, ()),
    ("no-healthy-upstream-by-health-check", "hc-down", None, ()),
    ("grpc-timeout-max-stream-duration", "deadline-local", None,
     (("grpc-timeout", "200m"), ("x-delay", "3"))),
]


@pytest.mark.parametrize("via", ["h2", "http1"])
@pytest.mark.parametrize("name,route,path,extra", LOCAL_REPLIES, ids=[r[0] for r in LOCAL_REPLIES])
def test_local_reply(grpc_pair, via, name, route, path, extra):
    """How a local reply to a gRPC request looks on the wire, exactly as Envoy shapes it."""
    fn = raw_grpc_h2 if via == "h2" else raw_grpc_h1
    kw = {"path": path} if path else {}
    out = grpc_pair.same(f"local-reply/{name}/{via}", lambda p: fn(p.port(), route, extra=extra, **kw))
    assert out["status"] == 200 and out["body"] == b""
    assert any(k == "grpc-status" and v != "0" for k, v in out["headers"])


def test_local_reply_valid_jwt_passes(grpc_pair):
    token = grpc_pair.peers.token()
    out = grpc_pair.same("jwt-valid", lambda p: raw_grpc_h2(
        p.port(), "jwt", extra=[("authorization", f"Bearer {token}")]))
    assert ("grpc-status", "0") in out["trailers"]


@pytest.mark.parametrize("via", ["h2", "http1"])
def test_local_reply_rate_limited(grpc_pair, via):
    """The route's bucket holds one token: the second call is always limited."""
    fn = raw_grpc_h2 if via == "h2" else raw_grpc_h1

    def run(p):
        fn(p.port(), "ratelimit")
        return fn(p.port(), "ratelimit")
    out = grpc_pair.same(f"local-reply/rate-limited/{via}", run)
    assert ("grpc-status", "14") in out["headers"]


def _hold_then(p, backend, route: str, n_hold: int, probe):
    """Park ``n_hold`` calls on ``backend`` through ``route``, wait (bounded) until they are
    all at the server, run ``probe()``, release them; returns (parked count, probe result,
    the parked calls' codes)."""
    backend.rearm()
    with channel(p.port()) as ch:
        unary = stubs(ch)["Unary"]
        futures = [unary.future(b"held", metadata=[("x-route", route), ("x-hold", "1")],
                                timeout=30) for _ in range(n_hold)]
        try:
            wait_until(lambda: backend.active_holds >= n_hold, timeout=10)
            parked = backend.active_holds
            result = probe()
        finally:
            backend.release()
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)
    wait_until(lambda: backend.active_holds == 0, timeout=10)
    return parked, result, codes


@pytest.mark.parametrize("via", ["h2", "http1"])
def test_local_reply_circuit_breaker_overflow(grpc_pair, via):
    """max_requests: 1 on an HTTP/2 cluster: a second concurrent request overflows."""
    fn = raw_grpc_h2 if via == "h2" else raw_grpc_h1

    def run(p):
        parked, reply, codes = _hold_then(p, grpc_pair.peers.grpc_hold, "breaker", 1,
                                          lambda: fn(p.port(), "breaker"))
        return {"parked": parked, "reply": reply, "held_calls": codes}
    out = grpc_pair.same(f"local-reply/breaker-overflow/{via}", run)
    assert out["parked"] == 1 and out["held_calls"] == ["OK"]
    assert ("grpc-status", "14") in out["reply"]["headers"]


def test_breaker_counts_requests_not_connections(grpc_pair):
    """max_connections: 1, max_pending_requests: 1, max_requests: 100 on an HTTP/2 cluster:
    once the connection is up, ten calls are at the server at once (multiplexed on the one
    connection), none waits for another. (Before it is up, requests are pending and the
    pending limit applies: hence the warm-up call.)"""
    def run(p):
        assert _unary(p, [("x-route", "oneconn")])["code"] == "OK"
        parked, _, codes = _hold_then(p, grpc_pair.peers.grpc_hold, "oneconn", 10, lambda: None)
        return {"parked": parked, "codes": codes}
    assert grpc_pair.same("breaker-requests", run) == {"parked": 10, "codes": ["OK"] * 10}


# ---- grpc-timeout, retries -----------------------------------------------------------------

def test_grpc_timeout_forwarded(grpc_pair):
    """With max_stream_duration.grpc_timeout_header_max the grpc-timeout header bounds the
    call; what reaches the upstream (grpc-timeout, x-envoy-expected-rq-timeout-ms)."""
    def run(p):
        key = str(uuid.uuid4())
        r = raw_grpc_h2(p.port(), "deadline", extra=[("grpc-timeout", "3S"), ("x-key", key)])
        call = grpc_pair.peers.grpc.calls_with("x-key", key)[0]
        seen = {k: v for k, v in call.metadata if k in ("grpc-timeout",
                                                          "x-envoy-expected-rq-timeout-ms")}
        return {"trailers": r["trailers"], "upstream": seen}
    out = grpc_pair.same("grpc-timeout-forwarded", run)
    assert ("grpc-status", "0") in out["trailers"]


def test_grpc_client_deadline_through_proxy(grpc_pair):
    """A grpcio client deadline shorter than the server's delay: DEADLINE_EXCEEDED."""
    out = grpc_pair.same("client-deadline", lambda p: {
        "code": _unary(p, [("x-route", "deadline"), ("x-delay", "3")], timeout=0.3)["code"]})
    assert out == {"code": "DEADLINE_EXCEEDED"}


RETRY_CASES = [
    ("cancelled", "CANCELLED", 2), ("deadline-exceeded", "DEADLINE_EXCEEDED", 2),
    ("internal", "INTERNAL", 2), ("resource-exhausted", "RESOURCE_EXHAUSTED", 2),
    ("unavailable", "UNAVAILABLE", 2), ("not-retried", "NOT_FOUND", 2),
    ("exhausted", "UNAVAILABLE", 9),
]


@pytest.mark.parametrize("name,code,fail_times", RETRY_CASES, ids=[c[0] for c in RETRY_CASES])
def test_retry_on_grpc_codes(grpc_pair, name, code, fail_times):
    """retry_on cancelled,deadline-exceeded,internal,resource-exhausted,unavailable with
    num_retries 3: attempts made and the final answer."""
    def run(p):
        key = str(uuid.uuid4())
        r = raw_grpc_h2(p.port(), "retry", extra=[("x-fail-times", str(fail_times)),
                                                  ("x-key", key), ("x-fail-code", code)])
        return {"attempts": grpc_pair.peers.grpc.attempts[key],
                "status": dict(r["headers"]).get("grpc-status") or dict(r["trailers"]).get("grpc-status"),
                "message": dict(r["headers"]).get("grpc-message") or dict(r["trailers"]).get("grpc-message")}
    grpc_pair.same(f"retry/{name}", run)


# ---- health checking ------------------------------------------------------------------------

def _served_by(p, n: int = 12) -> set:
    with channel(p.port()) as ch:
        unary = stubs(ch)["Unary"]
        out = set()
        for _ in range(n):
            _, call = unary.with_call(b"x", metadata=[("x-route", "hc")], timeout=10)
            out |= {v for k, v in call.trailing_metadata() if k == "x-served-by"}
        return out


def test_grpc_health_checking(grpc_pair):
    """grpc_health_check with service_name test.Echo: an endpoint whose health service says
    NOT_SERVING for that service (while the server-wide status stays SERVING) gets no traffic;
    traffic follows the health status as it changes (bounded waits)."""
    a, b = grpc_pair.peers.grpc_a, grpc_pair.peers.grpc_b

    def set_service(backend, serving: bool):
        from grpc_health.v1 import health_pb2
        backend.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING if serving
                           else health_pb2.HealthCheckResponse.NOT_SERVING)

    def run(p):
        steps = {}
        try:
            steps["both"] = wait_until(lambda: _served_by(p) == {"grpc_a", "grpc_b"})
            set_service(b, False)
            steps["a_only"] = wait_until(lambda: _served_by(p) == {"grpc_a"})
            set_service(b, True)
            # b back before a goes: swapping both at once lets a check round see both down
            # (no healthy upstream) on a loaded machine, for either proxy
            steps["both_again"] = wait_until(lambda: _served_by(p) == {"grpc_a", "grpc_b"})
            set_service(a, False)
            steps["b_only"] = wait_until(lambda: _served_by(p) == {"grpc_b"})
        finally:
            set_service(a, True)
            set_service(b, True)
        wait_until(lambda: _served_by(p) == {"grpc_a", "grpc_b"})
        return steps
    assert grpc_pair.same("health-check", run) == {"both": True, "a_only": True,
                                                    "both_again": True, "b_only": True}


def test_raw_grpc_success_shape(grpc_pair):
    """A successful unary call on the wire: headers, one message, trailers."""
    out = grpc_pair.same("success-wire", lambda p: raw_grpc_h2(
        p.port(), "x", extra=[("x-trailing", "x-a=1")]))
    assert not out["trailers_only"] and grpc_messages(out["body"]) == [b"hi"]


def test_grpc_over_http1_passthrough(grpc_pair):
    """gRPC framing from an HTTP/1.1 client to the HTTP/2 upstream and back."""
    out = grpc_pair.same("grpc-http1-wire", lambda p: raw_grpc_h1(p.port(), "x"))
    assert out["status"] == 200 and grpc_messages(out["body"]) == [b"hi"]


def test_parallel_streams_do_not_interfere(grpc_pair):
    """Streaming calls of all kinds at once on one channel, each intact."""
    def run(p):
        with channel(p.port()) as ch:
            s = stubs(ch)
            with ThreadPoolExecutor(8) as pool:
                futs = [pool.submit(lambda: len(list(s["ServerStream"](b"50:100", timeout=20))))
                        for _ in range(4)]
                futs += [pool.submit(lambda: s["ClientStream"](iter([b"a"] * 100), timeout=20))
                         for _ in range(4)]
                return [f.result() for f in futs]
    out = grpc_pair.same("parallel-streams", run)
    assert out[:4] == [50] * 4
