"""Raw upstream responses: the client sends a plain ``GET /r`` (``HEAD`` where noted), the
recording upstream answers with the scripted bytes, then the client sends ``GET /follow-up``
on the same connection (answered normally by the upstream) to show whether anything of the
first response leaked into the next exchange.

Sources: RFC 9112 §4 (status line), §6 (message body length), §7 (chunked), §5 (fields),
RFC 9110 §15.2 (1xx), §6.4.1 (bodyless responses), §7.6.1 (hop-by-hop); response
desynchronisation (Kettle 2019 "HTTP Desync Attacks", response queue poisoning, Kettle 2022
"Browser-Powered Desync"); Envoy's cluster limits (max_response_headers_kb 60,
max_headers_count 100).
"""

from __future__ import annotations

from .cases import Case, Reply
from .cases import response_case as rc


def r(*parts: bytes | float, then: str = "keep") -> Reply:
    return Reply(tuple(parts), then)


def ok(head: bytes = b"", body: bytes = b"ok", status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(body: bytes, head: bytes = b"", status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"\r\n" + head + b"Transfer-Encoding: chunked\r\n\r\n" + body


SMUGGLED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
MANY = b"".join(b"X-H%d: v\r\n" % i for i in range(100))

CASES: list[Case] = [
    # ---- baselines ---------------------------------------------------------------------------
    rc("resp.base.content-length", "9112 §6.2", r(ok())),
    rc("resp.base.chunked", "9112 §7.1", r(chunked(b"2\r\nok\r\n0\r\n\r\n"))),
    rc("resp.base.empty-reason", "9112 §4 (reason-phrase may be empty)",
       r(ok(status=b"HTTP/1.1 200 "))),
    rc("resp.base.custom-reason", "9112 §4", r(ok(status=b"HTTP/1.1 200 Fine Thanks"))),
    rc("resp.base.404-with-body", "9110 §15.5.5", r(ok(body=b"nope", status=b"HTTP/1.1 404 Not Found"))),
    rc("resp.base.204", "9110 §15.3.5", r(b"HTTP/1.1 204 No Content\r\n\r\n")),
    rc("resp.base.304", "9110 §15.4.5", r(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")),
    rc("resp.base.head", "9110 §9.3.2 (Content-Length without a body)",
       r(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"), method="HEAD"),
    rc("resp.base.connection-close", "9112 §9.6 (upstream closes; the client connection stays)",
       r(ok(b"Connection: close\r\n"), then="close")),
    rc("resp.base.in-pieces", "9112 (a response split across reads)",
       r(b"HTTP/1.1 200 OK\r\nContent-Le", 0.05, b"ngth: 2\r\n\r", 0.05, b"\nok")),
    rc("resp.base.repeated-headers", "9110 §5.3",
       r(ok(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-M: 1\r\nX-M: 2\r\n"))),

    # ---- status line (9112 §4) ----------------------------------------------------------------
    *[rc(f"resp.status.{name}", src, r(ok(status=line)))
      for name, line, src in (
          ("no-sp-after-code", b"HTTP/1.1 200", "9112 §4 (SP before reason is required)"),
          ("code-2-digits", b"HTTP/1.1 20 OK", "9112 §4 (3DIGIT)"),
          ("code-4-digits", b"HTTP/1.1 2000 OK", "9112 §4"),
          ("code-letters", b"HTTP/1.1 abc OK", "9112 §4"),
          ("code-099", b"HTTP/1.1 099 Low", "9110 §15 (100..599)"),
          ("code-600", b"HTTP/1.1 600 High", "9110 §15 (100..599)"),
          ("code-999", b"HTTP/1.1 999 High", "9110 §15"),
          ("lowercase-version", b"http/1.1 200 OK", "9112 §2.3"),
          ("version-1.0", b"HTTP/1.0 200 OK", "9112 §9.3 (HTTP/1.0 upstream: no persistence)"),
          ("version-2.0", b"HTTP/2.0 200 OK", "9112 §2.3"),
          ("version-1.2", b"HTTP/1.2 200 OK", "9110 §2.5"),
          ("double-space", b"HTTP/1.1  200 OK", "9112 §4"),
          ("leading-space", b" HTTP/1.1 200 OK", "9112 §4"),
          ("nul-in-reason", b"HTTP/1.1 200 O\x00K", "9112 §4 (reason-phrase chars)"),
          ("bare-cr-in-reason", b"HTTP/1.1 200 O\rK", "9112 §2.2"),
          ("icy", b"ICY 200 OK", "SHOUTcast status line"),
      )],
    rc("resp.status.bare-lf-lines", "9112 §2.2 (bare LF MAY be accepted)",
       r(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")),
    rc("resp.status.leading-crlf", "9112 §2.2", r(b"\r\n" + ok())),
    rc("resp.status.garbage-then-close", "9112 §4", r(b"garbage\r\n\r\n", then="close")),
    rc("resp.status.http09-body-then-close", "HTTP/0.9 response (no status line)",
       r(b"hello", then="close")),
    rc("resp.status.nothing-then-close", "9112 §9.6 (closed before any byte)", r(then="close")),
    rc("resp.status.nothing-then-reset", "closed with RST before any byte", r(then="reset")),
    rc("resp.status.partial-head-then-close", "9112 §8 (incomplete message)",
       r(b"HTTP/1.1 200 OK\r\nContent-Le", then="close")),

    # ---- Transfer-Encoding (9112 §6.1, §6.3) -------------------------------------------------
    rc("resp.te.gzip-close-delimited", "9112 §6.3 rule 4 (not chunked: read until close)",
       r(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nokay", then="close")),
    rc("resp.te.gzip-chunked", "9112 §6.1", r(chunked(b"2\r\nok\r\n0\r\n\r\n").replace(
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked"))),
    rc("resp.te.chunked-gzip", "9112 §6.3 rule 4 (chunked not last)",
       r(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n",
         then="close")),
    rc("resp.te.identity", "9112 §6.1 (identity was removed)",
       r(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok")),
    rc("resp.te.uppercase", "9112 §7 (case-insensitive)", r(chunked(b"2\r\nok\r\n0\r\n\r\n").replace(
        b"chunked", b"CHUNKED"))),
    rc("resp.te.and-content-length", "9112 §6.3 rule 3 (TE wins; MUST close after)",
       r(chunked(b"2\r\nok\r\n0\r\n\r\n", b"Content-Length: 100\r\n"))),
    rc("resp.te.two-headers", "9110 §5.3", r(chunked(b"2\r\nok\r\n0\r\n\r\n",
                                                     b"Transfer-Encoding: chunked\r\n"))),
    rc("resp.te.empty", "9112 §6.1", r(b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n"
                                       b"Content-Length: 2\r\n\r\nok")),
    rc("resp.te.http10-chunked", "9112 §6.1 (chunked in HTTP/1.0)",
       r(chunked(b"2\r\nok\r\n0\r\n\r\n", status=b"HTTP/1.0 200 OK"), then="close")),

    # ---- chunked bodies (9112 §7.1) -----------------------------------------------------------
    *[rc(f"resp.chunk.{name}", src, r(chunked(body), then=then))
      for name, body, then, src in (
          ("size-not-hex", b"zz\r\nok\r\n0\r\n\r\n", "keep", "9112 §7.1"),
          ("size-trailing-space", b"2 \r\nok\r\n0\r\n\r\n", "keep", "9112 §7.1"),
          ("size-overflow", b"fffffffffffffffff2\r\nok\r\n0\r\n\r\n", "keep", "9112 §7.1"),
          ("size-leading-zeros", b"0002\r\nok\r\n0\r\n\r\n", "keep", "9112 §7.1"),
          ("extension", b"2;x=y\r\nok\r\n0\r\n\r\n", "keep", "9112 §7.1.1"),
          ("data-longer", b"2\r\nokXX\r\n0\r\n\r\n", "keep", "9112 §7.1"),
          ("data-shorter", b"4\r\nok\r\n0\r\n\r\n", "keep", "9112 §7.1"),
          ("lf-only", b"2\nok\n0\n\n", "keep", "Weikop 2025"),
          ("trailers", b"2\r\nok\r\n0\r\nX-T: v\r\n\r\n", "keep", "9112 §7.1.2"),
          ("no-last-chunk-then-close", b"2\r\nok\r\n", "close", "9112 §8 (incomplete)"),
          ("truncated-mid-chunk-then-close", b"a\r\nok", "close", "9112 §8"),
          ("last-chunk-no-crlf-then-close", b"2\r\nok\r\n0\r\n", "close", "9112 §7.1"),
          ("extra-bytes-after", b"2\r\nok\r\n0\r\n\r\nEXTRA", "keep",
           "response desync (bytes after a complete response)"),
      )],

    # ---- Content-Length (9112 §6.3, 9110 §8.6) -----------------------------------------------
    rc("resp.cl.body-longer", "9112 §6.3 (extra bytes after the body)", r(ok(body=b"ok") + b"EXTRA")),
    rc("resp.cl.body-longer-with-response", "response desync (Kettle 2019): a second response "
       "hidden after the body", r(ok(body=b"ok") + SMUGGLED_RESPONSE)),
    rc("resp.cl.unsolicited-response-on-idle", "response queue poisoning: an unsolicited "
       "response reaches the pooled connection before the next request", r(ok(), 0.1, SMUGGLED_RESPONSE),
       pause=0.4),
    rc("resp.cl.body-shorter-then-close", "9112 §8 (incomplete message)",
       r(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", then="close")),
    *[rc(f"resp.cl.{name}", src, r(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + body))
      for name, head, body, src in (
          ("duplicate-same", b"Content-Length: 2\r\nContent-Length: 2\r\n", b"ok", "9110 §8.6"),
          ("duplicate-different", b"Content-Length: 2\r\nContent-Length: 4\r\n", b"okok",
           "9112 §6.3 rule 5 (MUST treat as an error)"),
          ("list-same", b"Content-Length: 2, 2\r\n", b"ok", "9110 §8.6"),
          ("list-different", b"Content-Length: 2, 4\r\n", b"okok", "9112 §6.3"),
          ("plus-sign", b"Content-Length: +2\r\n", b"ok", "9110 §8.6"),
          ("minus", b"Content-Length: -2\r\n", b"ok", "9110 §8.6"),
          ("letters", b"Content-Length: ab\r\n", b"ok", "9110 §8.6"),
          ("leading-zeros", b"Content-Length: 002\r\n", b"ok", "9110 §8.6"),
          ("inner-space", b"Content-Length: 2 2\r\n", b"ok", "9110 §8.6"),
          ("huge", b"Content-Length: 99999999999999999999\r\n", b"ok", "9110 §8.6"),
      )],

    # ---- close-delimited bodies (9112 §6.3 rule 8) -------------------------------------------
    rc("resp.close.delimited", "9112 §6.3 rule 8", r(b"HTTP/1.1 200 OK\r\n\r\nhello", then="close")),
    rc("resp.close.delimited-keep-alive-header", "9112 §6.3 rule 8 (keep-alive is irrelevant)",
       r(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nhello", then="close")),
    rc("resp.close.delimited-http10", "9112 §6.3 rule 8",
       r(b"HTTP/1.0 200 OK\r\n\r\nhello", then="close")),
    rc("resp.close.delimited-then-reset", "9112 §8 (a reset is not a clean end)",
       r(b"HTTP/1.1 200 OK\r\n\r\nhello", 0.05, then="reset")),
    rc("resp.close.http10-keep-alive", "9112 §9.3 (HTTP/1.0 keep-alive)",
       r(ok(b"Connection: keep-alive\r\n", status=b"HTTP/1.0 200 OK"))),

    # ---- 1xx (9110 §15.2) ---------------------------------------------------------------------
    rc("resp.interim.100-unsolicited", "9110 §15.2.1", r(b"HTTP/1.1 100 Continue\r\n\r\n" + ok())),
    rc("resp.interim.102", "RFC 2518 102 Processing", r(b"HTTP/1.1 102 Processing\r\n\r\n" + ok())),
    rc("resp.interim.103", "RFC 8297 103 Early Hints",
       r(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + ok())),
    rc("resp.interim.several", "9110 §15.2", r(b"HTTP/1.1 100 Continue\r\n\r\n"
                                               b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                               b"HTTP/1.1 102 Processing\r\n\r\n" + ok())),
    rc("resp.interim.100-with-content-length", "9110 §8.6 (1xx has no body)",
       r(b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n" + ok())),
    rc("resp.interim.101-unsolicited", "9110 §15.2.2 (no Upgrade was asked for)",
       r(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
         b"raw bytes")),
    rc("resp.interim.only-then-close", "9112 §8", r(b"HTTP/1.1 100 Continue\r\n\r\n", then="close")),

    # ---- responses without a body (9110 §6.4.1, 9112 §6.3 rule 1) -----------------------------
    rc("resp.nobody.head-with-body", "9112 §6.3 rule 1 (bytes after a HEAD response)",
       r(ok()), method="HEAD"),
    rc("resp.nobody.head-with-chunked-body", "9112 §6.3 rule 1",
       r(chunked(b"2\r\nok\r\n0\r\n\r\n")), method="HEAD"),
    rc("resp.nobody.204-with-body", "9112 §6.3 rule 1",
       r(b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok")),
    rc("resp.nobody.204-with-content-length-only", "9110 §8.6 (MUST NOT send CL in 204)",
       r(b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n")),
    rc("resp.nobody.204-chunked", "9112 §6.1 (MUST NOT send TE in 204)",
       r(b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")),
    rc("resp.nobody.304-with-body", "9112 §6.3 rule 1",
       r(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\nok")),

    # ---- header fields (9112 §5) --------------------------------------------------------------
    *[rc(f"resp.hdr.{name}", src, r(ok(head)))
      for name, head, src in (
          ("obs-fold", b"X-A: b\r\n c\r\n", "9112 §5.2 (MUST reject or replace by SP)"),
          ("space-before-colon", b"X-A : b\r\n", "9112 §5.1 (MUST remove the space or reject)"),
          ("no-colon", b"X-A b\r\n", "9112 §5.1"),
          ("empty-name", b": b\r\n", "9110 §5.1"),
          ("name-invalid-char", b"X(A): b\r\n", "9110 §5.1 (token)"),
          ("value-nul", b"X-A: b\x00c\r\n", "9110 §5.5"),
          ("value-bare-cr", b"X-A: b\rc\r\n", "9112 §2.2"),
          ("value-ctl", b"X-A: b\x01c\r\n", "9110 §5.5"),
          ("value-obs-text", b"X-A: caf\xe9\r\n", "9110 §5.5 (allowed)"),
          ("underscore-name", b"X_A: b\r\n", "Envoy headers_with_underscores_action"),
          ("count-100", MANY[:-len(b"X-H99: v\r\n")], "Envoy max_headers_count (100)"),
          ("count-101", MANY + b"X-Extra: v\r\n", "Envoy max_headers_count: 502 above 100"),
          ("size-59k", b"X-Big: " + b"a" * (59 * 1024) + b"\r\n", "Envoy max_response_headers_kb"),
          ("size-61k", b"X-Big: " + b"a" * (61 * 1024) + b"\r\n",
           "Envoy max_response_headers_kb (60): 502 above"),
          ("connection-named", b"Connection: x-hop\r\nX-Hop: 1\r\n",
           "9110 §7.6.1 (documented deviation, docs/config.md)"),
          ("keep-alive-header", b"Keep-Alive: timeout=5\r\n", "9110 §7.6.1 (hop-by-hop)"),
          ("upgrade-header", b"Upgrade: h2c\r\n", "9110 §7.8 (hop-by-hop)"),
      )],

    # ---- the upstream goes away ---------------------------------------------------------------
    rc("resp.misc.reset-on-reuse", "the upstream resets a reused connection when the next "
       "request arrives (the request was written: it must not be sent again without a retry policy)",
       r(ok()), r(then="reset")),
    rc("resp.misc.body-then-reset", "9112 §8 (reset mid-body)",
       r(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", 0.05, then="reset")),
    rc("resp.misc.slow-then-ok", "a slow upstream (no timeout configured but the route's 15 s)",
       r(0.3, ok())),
]
