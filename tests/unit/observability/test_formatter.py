"""The one access log formatter, on a finished connection and on a finished request (no
sockets): the same parsed formats, each operator bound to its context's getter. What Envoy
1.40 prints is checked against Envoy itself in tests/conformance (L4 and HTTP/1 access logs);
these pin the details."""

from __future__ import annotations

import json
import time

import pytest
from multidict import MultiDict

from sidecar.config.errors import ConfigError
from sidecar.config.l4 import ConnectionLog
from sidecar.config.log_format import (
    CONNECTION_OPERATORS,
    DEFAULT_FORMAT,
    HTTP_OPERATORS,
    json_format,
    text_format,
)
from sidecar.core.connection import ConnectionContext
from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response
from sidecar.observability.access_log import ConnectionLogger
from sidecar.observability.formatter import compile_connection, compile_http


def ctx() -> ConnectionContext:
    c = ConnectionContext("edge", ("10.0.0.9", 40000), ("10.0.0.1", 443), 100.0,
                          time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, 0)) - time.timezone + 0.25)
    c.end = 101.5
    c.bytes_received, c.bytes_sent = 12, 3400
    c.cluster, c.upstream_host = "api", "10.1.0.5:8080"
    c.server_name, c.filter_chain_name = "api.test", "tls"
    c.flags = ["UF", "URX"]
    c.attempts = 2
    return c


def exchange() -> tuple[Request, Response]:
    rc = RequestContext("web", ("10.0.0.7", 51234), 0.0, 8080)
    rc.cluster, rc.upstream_host, rc.attempts = "api", "10.1.0.5:8080", 1
    rc.bytes_received, rc.bytes_sent = 5, 34
    rc.flags = ["UC"]
    req = Request("POST", "/items", "a=1", MultiDict([("host", "web.test"),
                                                      ("user-agent", "t/1")]), b"", rc)
    resp = Response(503, MultiDict([("content-type", "text/plain")]))
    return req, resp


def text(fmt: str, omit: bool = False) -> str:
    return compile_connection(text_format(fmt, "f", CONNECTION_OPERATORS, omit))(ctx())


def http(fmt: str, omit: bool = False) -> str:
    return compile_http(text_format(fmt, "f", HTTP_OPERATORS, omit))(*exchange(), 0.0123)


def test_connection_operators():
    assert text("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_PORT% %UPSTREAM_HOST% "
                "%UPSTREAM_CLUSTER% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESPONSE_FLAGS% "
                "%REQUESTED_SERVER_NAME% %FILTER_CHAIN_NAME% %UPSTREAM_REQUEST_ATTEMPT_COUNT%") == \
        "10.0.0.9:40000 443 10.1.0.5:8080 api 12 3400 1500 UF,URX api.test tls 2"


def test_request_operators_on_a_connection_print_as_envoy():
    assert text("%PROTOCOL% %RESPONSE_CODE% %REQ(:AUTHORITY)% %DOWNSTREAM_PEER_URI_SAN% "
                "%RESPONSE_CODE_DETAILS% %ROUTE_NAME% %GRPC_STATUS% %DYNAMIC_METADATA(a:b)% "
                "%TRAILER(x)%") == "- 0 - - - - - - -"


def test_the_same_format_on_a_request():
    assert http("%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% "
                "%RESPONSE_FLAGS_LONG% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %UPSTREAM_HOST% "
                "%UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS% %REQ(X-NONE?USER-AGENT):1%") == \
        ("POST /items?a=1 HTTP/1.1 503 UC UpstreamConnectionTermination 5 34 12 10.1.0.5:8080 api "
         "10.0.0.7:51234 t")


def test_start_time_and_max_length():
    assert text("%START_TIME%") == "2026-01-02T03:04:05.250Z"
    assert text("%START_TIME(%Y/%m/%d %s.%3f)%").startswith("2026/01/02 17")
    assert text("%UPSTREAM_CLUSTER:2% %RESPONSE_FLAGS_LONG%") == \
        "ap UpstreamConnectionFailure,UpstreamRetryLimitExceeded"


def test_default_format_is_envoys():
    line = text(DEFAULT_FORMAT)
    assert line.endswith('"-" "-" "-" "-" "10.1.0.5:8080"')      # the final newline: the sink's
    assert '"- - -" 0 UF,URX 12 3400 1500 -' in line
    assert http(DEFAULT_FORMAT).endswith('"POST /items?a=1 HTTP/1.1" 503 UC 5 34 12 - "-" "t/1" '
                                         '"-" "web.test" "10.1.0.5:8080"')


def test_omit_empty_values_in_text_prints_nothing_for_a_missing_value():
    assert text("[%REQ(:AUTHORITY)%] [%DOWNSTREAM_TLS_VERSION%] [%UPSTREAM_CLUSTER%]",
                omit=True) == "[] [] [api]"
    assert http("[%REQ(X-NONE)%] [%RESPONSE_CODE%]", omit=True) == "[] [503]"


def test_json_keeps_types_sorts_keys_at_every_level_and_can_omit_empty():
    template = {"z": "%BYTES_SENT%", "a": {"sni": "%REQUESTED_SERVER_NAME%",
                                            "san": "%DOWNSTREAM_PEER_URI_SAN%"},
                "both": "%BYTES_RECEIVED%/%BYTES_SENT%", "n": 7, "lit": "",
                "gone": {"p": "%PROTOCOL%"}, "mixed": "%PROTOCOL%/%UPSTREAM_CLUSTER%"}
    for omit, want in ((False, {"a": {"san": None, "sni": "api.test"}, "both": "12/3400",
                                "gone": {"p": None}, "lit": "", "mixed": "-/api", "n": 7,
                                "z": 3400}),
                       (True, {"a": {"sni": "api.test"}, "both": "12/3400", "lit": "",
                               "mixed": "/api", "n": 7, "z": 3400})):
        line = ConnectionLogger(ConnectionLog("/dev/null", json_format(
            template, "f", CONNECTION_OPERATORS, omit))).format_line(ctx())
        assert json.loads(line) == want
        assert line == json.dumps(want, separators=(",", ":"), sort_keys=True)


def test_http_json_is_sorted_too():
    fmt = json_format({"status": "%RESPONSE_CODE%", "method": "%REQ(:METHOD)%",
                       "nested": {"z": "%UPSTREAM_CLUSTER%", "a": "%BYTES_SENT%"}},
                      "f", HTTP_OPERATORS)
    assert compile_http(fmt)(*exchange(), 0.0) == \
        '{"method":"POST","nested":{"a":34,"z":"api"},"status":503}'


@pytest.mark.parametrize(("fmt", "operators", "error"), [
    ("%NOPE%", CONNECTION_OPERATORS, "%NOPE% is not supported here"),
    ("%REQUESTED_SERVER_NAME%", HTTP_OPERATORS, "%REQUESTED_SERVER_NAME% is not supported here"),
    ("%BYTES_SENT(x)%", HTTP_OPERATORS, "takes no argument"),
    ("%REQ%", HTTP_OPERATORS, "needs an argument"),
    ("%REQ(:nope)%", HTTP_OPERATORS, "unknown pseudo-header"),
    ("%RESP(:path)%", HTTP_OPERATORS, "unknown pseudo-header"),
    ("%GRPC_STATUS(LOUD)%", HTTP_OPERATORS, "must be one of"),
    ("%REQ(Authorization)%", CONNECTION_OPERATORS, "may carry credentials"),
    ("%RESP(x?set-cookie)%", HTTP_OPERATORS, "may carry credentials"),
    ("100% sure", HTTP_OPERATORS, "incorrect format at position 3"),
])
def test_bad_formats_are_refused_with_their_path(fmt, operators, error):
    with pytest.raises(ConfigError) as e:
        text_format(fmt, "listeners[0].access_log.text_format", operators)
    assert e.value.path == "listeners[0].access_log.text_format" and error in str(e.value)


def _reference_line(fmt: str, args: tuple[object, ...], empty: str) -> str:
    """What a line was before the generated function: each operator's getter, then Envoy's
    text for the value (``-`` or ``""`` for a missing one)."""
    from sidecar.config.log_format import Operator
    from sidecar.observability.formatter import HTTP
    out = []
    for s in text_format(fmt, "f", HTTP_OPERATORS, empty == "").text or ():
        if isinstance(s, str):
            out.append(s)
            continue
        assert isinstance(s, Operator)
        v = HTTP[s.name](s.arg)(*args)
        if s.max_length is not None and isinstance(v, str):
            v = v[:s.max_length]
        out.append(empty if v is None or v == "" else str(v))
    return "".join(out)


def _exchanges() -> list[tuple[Request, Response, float]]:
    plain = exchange()
    bare_ctx = RequestContext("web", ("10.0.0.7", 1), 0.0, 8080)
    bare = Request("GET", "/", "", MultiDict(), b"", bare_ctx, version="2")
    rewritten = exchange()
    rewritten[0].ctx.original_path = "/before"
    rewritten[0].headers["x-envoy-original-path"] = ""        # present but empty
    rewritten[0].ctx.upstream_host = ""
    return [(*plain, 0.0123), (bare, Response(200), 0.0), (*rewritten, 1.5)]


@pytest.mark.parametrize("omit", [False, True])
def test_generated_line_is_the_operators_getters_line(omit):
    """The generated line function (common operators inline) prints what each operator's
    getter prints, for every HTTP operator, missing and empty values included."""
    args = {"REQ": ["USER-AGENT", ":METHOD", ":PATH", ":AUTHORITY", ":SCHEME", ":PROTOCOL",
                    "X-NONE?USER-AGENT", "X-ENVOY-ORIGINAL-PATH?:PATH", "X-NONE?X-NADA",
                    "X-NONE?:AUTHORITY"],
            "RESP": ["CONTENT-TYPE"], "TRAILER": ["GRPC-STATUS"], "START_TIME": [None],
            "DYNAMIC_METADATA": ["ns:k"], "ENVIRONMENT": ["HOME"], "GRPC_STATUS": [""]}
    ops = []
    for name in sorted(HTTP_OPERATORS):
        for arg in args.get(name, [""]):
            if name == "START_TIME":
                continue          # the clock moves between the two lines; pinned above
            ops.append(f"%{name}({arg})%" if arg else f"%{name}%")
    fmt = "<" + "|".join(ops) + "|%REQ(USER-AGENT):1%|%UPSTREAM_CLUSTER:2%>"
    line = compile_http(text_format(fmt, "f", HTTP_OPERATORS, omit))
    for req, resp, d in _exchanges():
        assert line(req, resp, d) == _reference_line(fmt, (req, resp, d), "" if omit else "-")
