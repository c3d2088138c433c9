"""Connection access log lines from a ConnectionContext (no sockets)."""

from __future__ import annotations

import json
import time

from sidecar.config.l4 import ConnectionLog
from sidecar.config.log_format import (
    CONNECTION_OPERATORS,
    CONNECTION_OPERATORS_WITH_ARGS,
    DEFAULT_FORMAT,
    LogFormat,
    parse_format_string,
    parse_json_format,
)
from sidecar.core.connection import ConnectionContext
from sidecar.observability.connection_log import ConnectionLogger


def ctx() -> ConnectionContext:
    c = ConnectionContext("edge", ("10.0.0.9", 40000), ("10.0.0.1", 443), 100.0,
                          time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, 0)) - time.timezone + 0.25)
    c.end = 101.5
    c.bytes_received, c.bytes_sent = 12, 3400
    c.cluster, c.upstream_host = "api", "10.1.0.5:8080"
    c.server_name, c.filter_chain_name = "api.test", "tls"
    c.flags = ["UF", "URX"]
    return c


def text(fmt: str) -> str:
    parts = parse_format_string(fmt, "f", CONNECTION_OPERATORS, CONNECTION_OPERATORS_WITH_ARGS)
    return ConnectionLogger(ConnectionLog("/dev/null", LogFormat(text=parts))).format_line(ctx())


def test_operators():
    assert text("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_PORT% %UPSTREAM_HOST% "
                "%UPSTREAM_CLUSTER% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESPONSE_FLAGS% "
                "%REQUESTED_SERVER_NAME% %FILTER_CHAIN_NAME%") == \
        "10.0.0.9:40000 443 10.1.0.5:8080 api 12 3400 1500 UF,URX api.test tls"


def test_http_operators_on_a_connection_and_empty_values():
    assert text("%PROTOCOL% %RESPONSE_CODE% %REQ(:AUTHORITY)% %DOWNSTREAM_PEER_URI_SAN%") == \
        "- 0 - -"


def test_start_time_and_max_length():
    assert text("%START_TIME%") == "2026-01-02T03:04:05.250Z"
    assert text("%START_TIME(%Y/%m/%d %s.%3f)%") .startswith("2026/01/02 17")
    assert text("%UPSTREAM_CLUSTER:2% %RESPONSE_FLAGS_LONG%") == \
        "ap UpstreamConnectionFailure,URX"


def test_default_format_is_envoys():
    line = text(DEFAULT_FORMAT)
    assert line.endswith('"-" "-" "-" "-" "10.1.0.5:8080"')
    assert '"- - -" 0 UF,URX 12 3400 1500 -' in line


def test_json_keeps_types_sorts_keys_and_can_omit_empty():
    fields = parse_json_format({"z": "%BYTES_SENT%", "a": {"sni": "%REQUESTED_SERVER_NAME%",
                                                           "san": "%DOWNSTREAM_PEER_URI_SAN%"},
                                "both": "%BYTES_RECEIVED%/%BYTES_SENT%", "n": 7},
                               "f", CONNECTION_OPERATORS, CONNECTION_OPERATORS_WITH_ARGS)
    for omit, want in ((False, {"a": {"san": None, "sni": "api.test"}, "both": "12/3400",
                                "n": 7, "z": 3400}),
                       (True, {"a": {"sni": "api.test"}, "both": "12/3400", "n": 7, "z": 3400})):
        line = ConnectionLogger(ConnectionLog("/dev/null", LogFormat(
            json=fields, omit_empty_values=omit))).format_line(ctx())
        assert json.loads(line) == want
        assert line.index('"a"') < line.index('"both"') < line.index('"z"')
