"""Per-line CPU cost of the Envoy-format access log formatter alone (no sink, no sockets): one
finished HTTP request formatted with Envoy's default text format, with the HTTP differential
test's long text format, and with a JSON format; and one TCP connection with the L4
conformance formats. Used to see what a formatter change costs:

    python -m bench.access_log_micro                    # this tree
    PYTHONPATH=/path/to/other/tree python -m bench.access_log_micro   # another tree

Prints microseconds per line (best of 7 rounds of 20,000).
"""

from __future__ import annotations

import time

from multidict import MultiDict

from sidecar.core.connection import ConnectionContext
from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response

DEFAULT = None      # Envoy's default format
LONG = ('%REQ(X-CASE)% [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% '
        '%PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
        '%UPSTREAM_CLUSTER% %UPSTREAM_HOST% "%REQ(USER-AGENT)%" "%REQ(X-MISSING)%" '
        '%REQ(X-LONG):5% %RESP(CONTENT-TYPE)% %RESP(X-NONE?CONTENT-LENGTH)% %GRPC_STATUS% '
        '%UPSTREAM_REQUEST_ATTEMPT_COUNT% %DOWNSTREAM_REMOTE_ADDRESS% %REQ(:AUTHORITY)%\n')
JSON = {"status": "%RESPONSE_CODE%", "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%",
        "sent": "%BYTES_SENT%", "received": "%BYTES_RECEIVED%", "flags": "%RESPONSE_FLAGS%",
        "duration": "%DURATION%", "upstream": "%UPSTREAM_HOST%", "ua": "%REQ(USER-AGENT)%",
        "combo": "%REQ(:METHOD)% %RESPONSE_CODE%", "nested": {"cluster": "%UPSTREAM_CLUSTER%"}}
TCP_TEXT = "%UPSTREAM_CLUSTER% %BYTES_RECEIVED% %BYTES_SENT% %RESPONSE_FLAGS% %UPSTREAM_HOST%\n"
TCP_JSON = {"cluster": "%UPSTREAM_CLUSTER%", "received": "%BYTES_RECEIVED%",
            "sent": "%BYTES_SENT%", "flags": "%RESPONSE_FLAGS%", "sni": "%REQUESTED_SERVER_NAME%",
            "both": "%BYTES_RECEIVED%/%BYTES_SENT%"}


def http_exchange() -> tuple[Request, Response]:
    ctx = RequestContext("bench", ("10.0.0.7", 51234), time.perf_counter(), 8080)
    ctx.cluster, ctx.upstream_host, ctx.attempts = "api", "10.1.0.5:8080", 1
    ctx.bytes_received, ctx.bytes_sent = 120, 3400
    headers = MultiDict([("host", "api.internal"), ("user-agent", "bench/1.0"),
                         ("x-request-id", "0f3c2b1a-1111-2222-3333-444455556666"),
                         ("x-case", "get"), ("x-long", "abcdefghij")])
    req = Request("GET", "/api/v1/items", "id=42", headers, b"", ctx)
    resp = Response(200, MultiDict([("content-type", "application/json"),
                                    ("content-length", "3400")]))
    return req, resp


def connection() -> ConnectionContext:
    c = ConnectionContext("bench", ("10.0.0.9", 40000), ("10.0.0.1", 443), 100.0, time.time())
    c.end = 101.5
    c.bytes_received, c.bytes_sent = 12, 3400
    c.cluster, c.upstream_host, c.server_name = "api", "10.1.0.5:8080", "api.test"
    return c


def _formatters():
    """(name, format a line) for this tree's API (the unified formatter, or the two older
    ones, so the same numbers can be taken before and after a change)."""
    req, resp = http_exchange()
    conn = connection()
    try:
        from sidecar.config.log_format import HTTP_OPERATORS, json_format, text_format
        from sidecar.observability.formatter import compile_connection, compile_http
    except ImportError:
        import json

        from sidecar.config.l4 import ConnectionLog
        from sidecar.config.log_format import (
            CONNECTION_OPERATORS,
            CONNECTION_OPERATORS_WITH_ARGS,
            LogFormat,
            parse_format_string,
            parse_json_format,
        )
        from sidecar.observability.connection_log import ConnectionLogger
        from sidecar.observability.formatter import make_format

        def old_tcp(fmt):
            parsed = (LogFormat(json=parse_json_format(fmt, "f", CONNECTION_OPERATORS,
                                                       CONNECTION_OPERATORS_WITH_ARGS))
                      if isinstance(fmt, dict) else
                      LogFormat(text=parse_format_string(fmt, "f", CONNECTION_OPERATORS,
                                                         CONNECTION_OPERATORS_WITH_ARGS)))
            return ConnectionLogger(ConnectionLog("/dev/null", parsed)).format_line
        return [
            ("http default text", lambda f=make_format(None, None): f.format(req, resp, 0.0123)),
            ("http long text", lambda f=make_format(LONG, None): f.format(req, resp, 0.0123)),
            ("http json", lambda f=make_format(None, json.dumps(JSON)): f.format(req, resp, 0.0123)),
            ("tcp text", lambda f=old_tcp(TCP_TEXT): f(conn)),
            ("tcp json", lambda f=old_tcp(TCP_JSON): f(conn)),
        ]
    from sidecar.config.log_format import CONNECTION_OPERATORS, DEFAULT_FORMAT

    def http(fmt):
        parsed = json_format(fmt, "f", HTTP_OPERATORS) if isinstance(fmt, dict) else \
            text_format(fmt or DEFAULT_FORMAT, "f", HTTP_OPERATORS)
        return compile_http(parsed)

    def tcp(fmt):
        parsed = json_format(fmt, "f", CONNECTION_OPERATORS) if isinstance(fmt, dict) else \
            text_format(fmt, "f", CONNECTION_OPERATORS)
        return compile_connection(parsed)
    return [
        ("http default text", lambda f=http(DEFAULT): f(req, resp, 0.0123)),
        ("http long text", lambda f=http(LONG): f(req, resp, 0.0123)),
        ("http json", lambda f=http(JSON): f(req, resp, 0.0123)),
        ("tcp text", lambda f=tcp(TCP_TEXT): f(conn)),
        ("tcp json", lambda f=tcp(TCP_JSON): f(conn)),
    ]


def main(rounds: int = 7, n: int = 20_000) -> None:
    for name, fn in _formatters():
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, time.perf_counter() - t0)
        print(f"{name:20s} {best / n * 1e6:6.2f} us/line   e.g. {fn()[:90]!r}")


if __name__ == "__main__":
    main()
