"""gRPC observations shared by the gRPC tests: raw gRPC exchanges (h2 or HTTP/1.1) reduced to
what must match between proxies, and grpcio channels to a proxy."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import grpc
from h2conf_peers import GRPC_OPTIONS, SERVICE, H2Client, grpc_frame, http1_exchange

# response headers whose value is a timing or a clock: present, value masked
VOLATILE = {"x-envoy-upstream-service-time"}
DROPPED = {"date"}
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def clean_headers(headers) -> list:
    """Headers for comparison: sorted, no Date, timings and generated UUIDs masked."""
    out = []
    for k, v in headers:
        if k in DROPPED:
            continue
        if k in VOLATILE:
            v = "<timing>"
        elif _UUID.match(v):
            v = "<uuid>"
        out.append((k, v))
    return sorted(out)


def grpc_request_headers(route: str, extra=()) -> list:
    return [("content-type", "application/grpc"), ("te", "trailers"), ("x-route", route)] + list(extra)


def raw_grpc_h2(port: int, route: str, path: str = f"/{SERVICE}/Unary", extra=(),
                message: bytes = b"hi") -> dict:
    """One gRPC call over HTTP/2 with prior knowledge, as the client sees it on the wire."""
    with H2Client(port) as c:
        r = c.request("POST", path, grpc_request_headers(route, extra), body=grpc_frame(message))
        return {"status": r.status, "headers": clean_headers(r.headers),
                "trailers": clean_headers(r.trailers), "trailers_only": r.trailers_only,
                "body": r.body, "reset": r.reset}


def raw_grpc_h1(port: int, route: str, path: str = f"/{SERVICE}/Unary", extra=(),
                message: bytes = b"hi") -> dict:
    """The same call over HTTP/1.1 (content-type application/grpc)."""
    body = grpc_frame(message)
    head = f"POST {path} HTTP/1.1\r\nHost: example.test\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in grpc_request_headers(route, extra))
    r = http1_exchange(port, head.encode() + b"\r\n" + body)
    return {"status": r.status, "headers": clean_headers(r.headers),
            "trailers": clean_headers(r.trailers), "body": r.body}


def channel(port: int, *, tls_ca: str | None = None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    with open(tls_ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=GRPC_OPTIONS + [("grpc.ssl_target_name_override",
                                                        "localhost")])


def stubs(ch: grpc.Channel) -> dict[str, Callable]:
    return {"Unary": ch.unary_unary(f"/{SERVICE}/Unary"),
            "ServerStream": ch.unary_stream(f"/{SERVICE}/ServerStream"),
            "ClientStream": ch.stream_unary(f"/{SERVICE}/ClientStream"),
            "Bidi": ch.stream_stream(f"/{SERVICE}/Bidi")}


def metadata_view(md) -> list:
    """Initial or trailing metadata for comparison (timings masked, Date dropped)."""
    if md is None:
        return []
    return clean_headers([(k, v if isinstance(v, str) else "bin:" + v.hex()) for k, v in md])


def call_outcome(fn: Callable[[], tuple]) -> dict:
    """Run a grpcio ``with_call`` style call; the result, status, details and metadata."""
    try:
        value, call = fn()
        return {"code": call.code().name, "details": call.details(), "value": value,
                "initial": metadata_view(call.initial_metadata()),
                "trailing": metadata_view(call.trailing_metadata())}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details(), "value": None,
                "initial": metadata_view(e.initial_metadata()),
                "trailing": metadata_view(e.trailing_metadata())}


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """A bounded wait (never a timing assertion): True as soon as ``cond()`` holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()
