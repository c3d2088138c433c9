"""The harness's wire parsers (no sockets): what they report is what the comparison rests on."""

from __future__ import annotations

from .wire import parse_requests, parse_responses


def test_requests_split_and_framed():
    data = (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nT: 1\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: x\r\n\r\nGET /partial")
    reqs, rest = parse_requests(data, eof=False)
    assert [r.start_line for r in reqs] == ["POST /a HTTP/1.1", "POST /b HTTP/1.1", "GET /c HTTP/1.1"]
    assert [(r.framing, r.body) for r in reqs] == [("length", b"abc"), ("chunked", b"hi"),
                                                   ("none", b"")]
    assert reqs[1].trailers == [("t", "1")]
    assert rest == b"GET /partial"


def test_incomplete_request_body_is_left_over():
    reqs, rest = parse_requests(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", eof=False)
    assert reqs == [] and rest.endswith(b"abc")


def test_responses_head_interim_and_close_delimited():
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"            # answers HEAD: no body
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    msgs, interim, rest = parse_responses(data, ["HEAD", "GET", "GET"], eof=True)
    assert interim == [100]
    assert [(m.status, m.framing, m.body) for m in msgs] == [
        (200, "none", b""), (200, "chunked", b"a"), (200, "close", b"until close")]
    assert rest == b""


def test_truncated_response_is_incomplete():
    msgs, _, _ = parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", ["GET"],
                                 eof=True)
    assert len(msgs) == 1 and not msgs[0].complete and msgs[0].body == b"ab"
