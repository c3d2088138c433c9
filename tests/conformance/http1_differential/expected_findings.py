"""The findings: each known difference between Envoy 1.40 and the sidecar, with a verdict.

``to fix``: the sidecar must change; ``fix`` says exactly what it must do.
``stricter (safe)``: the sidecar refuses where Envoy accepts, forwarding nothing Envoy did not
forward; ``fix`` says why that is safe (and what it costs).
``documented deviation``: a deliberate difference, documented in docs/config.md.

Which case shows which finding is the table in ``expected.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

TO_FIX = "to fix"
STRICTER = "stricter (safe)"
DOCUMENTED = "documented deviation"
FIXED = "fixed"          # was "to fix"; the sidecar now behaves as Envoy (no case lists it)


@dataclass(frozen=True)
class Finding:
    id: str
    verdict: str
    title: str
    envoy: str
    sidecar: str
    fix: str


_F = [
    # ---- requests: to fix ----------------------------------------------------------------------
    Finding("PIPELINED-ERROR-DROPS-RESPONSE", FIXED,
            "A bad request pipelined after a good one loses the good one's response",
            "Answers the good request first, then the error (400/501) with `connection: close`, "
            "then closes. Bytes after a `Connection: close` request are ignored.",
            "Forwards the good request upstream, then the parse error on the next bytes marks the "
            "connection closing and the in-flight response is discarded: the client gets nothing "
            "and the connection closes (`_reject` while busy sets `_closing`; `_handle` then drops "
            "the response). llhttp also raises on any byte after a `Connection: close` request.",
            "On a parse error while requests are in flight: stop reading, let every request already "
            "parsed be answered in order, then write the error response (status as for a first "
            "request) with `connection: close` and close. After a request with `Connection: close` "
            "(or HTTP/1.0 without keep-alive) stop parsing: later bytes are ignored, not an error. "
            "Note: Envoy validates the next request only once its request line is complete "
            "(`cl.body-longer` stays open waiting), llhttp fails on the first impossible byte; "
            "after the fix those cases answer 200 then 400: record them as stricter."),
    Finding("ABORT-KEEPS-UPSTREAM", FIXED,
            "A client that goes away mid-request leaves the upstream connection open",
            "Resets the stream at once: the upstream connection holding the partial request (or "
            "waiting for the response) is closed.",
            "Keeps the upstream connection open (still waiting for the rest of the body, or for "
            "a response nobody will read) until the upstream or a timeout ends it; pool and "
            "breaker slots stay taken meanwhile.",
            "When the downstream connection closes (FIN or RST) with a request in flight, abort the "
            "upstream connection carrying it (never return it to the pool) and release its pool, "
            "circuit-breaker and pending-request slots immediately (issue 14 item 4)."),
    Finding("TE-NOT-EXACTLY-CHUNKED", FIXED,
            "Transfer-Encoding other than exactly `chunked`",
            "501 and close for any Transfer-Encoding whose value is not exactly one `chunked` "
            "(case-insensitive, OWS trimmed): lists (`gzip, chunked`, `identity, chunked`, "
            "`chunked, chunked`, `, chunked`, `chunked,`), an empty value, and more than one "
            "Transfer-Encoding line. `chunked<TAB>` is accepted (OWS).",
            "Reads `gzip, chunked`, `identity, chunked`, `, chunked` and `x` + `chunked` on two "
            "lines as chunked, forwards the body re-framed as plain `chunked` (the other codings "
            "are lost) and then forwards the bytes after it (`GET /smuggled`) as a request of its "
            "own: a proxy in front that frames such a body differently (TE.TE) disagrees with the "
            "sidecar on where that request starts. Answers 400 for the other lists and 501 for "
            "`chunked<TAB>` (legal OWS).",
            "After the head: if any Transfer-Encoding line is present, require exactly one line "
            "whose value, trimmed of SP/HTAB, equals `chunked` case-insensitively; otherwise "
            "answer 501 and close, before anything is forwarded. (CL + TE stays 400.)"),
    Finding("HOST-INVALID-CHARS", FIXED,
            "Host with characters outside the authority grammar",
            "400 and close when Host (or an absolute-form authority) has a character outside "
            "unreserved / sub-delims / `:` `@` `[` `]` `%` (nghttp2's authority check): SP, HTAB, "
            "`/`, `?`, `#`, `\\`, `<`, `\"`, 0xFF, `a, b`.",
            "Forwards the request with that Host.",
            "Validate Host / `:authority` with the same character set (ALPHA DIGIT `-._~!$&'()*+,;=:@[]%`); "
            "400 and close otherwise, before routing."),
    Finding("HOST-DUPLICATED", FIXED,
            "More than one Host line",
            "Joins them with a comma (`host: a.test,b.test`), routes on that and forwards one line.",
            "Forwards both Host lines and routes on the first: the upstream may pick the other one.",
            "Answer 400 and close (RFC 9112 §3.2 MUST; stricter than Envoy and safe), or join "
            "like Envoy; never forward two Host lines."),
    Finding("ABSOLUTE-FORM-USERINFO", FIXED,
            "Absolute-form target with userinfo",
            "Drops the userinfo: forwards `host: abs.test`.",
            "Puts `user:pw@abs.test` into Host (credentials go upstream and into routing).",
            "Strip `userinfo@` from an absolute-form authority before it replaces Host (or answer "
            "400)."),
    Finding("REQUEST-TARGET-FORM", FIXED,
            "Request-target forms Envoy refuses",
            "400 and close for: a `#` anywhere in the target (fragment), asterisk-form with a "
            "method other than OPTIONS, absolute-form with a scheme other than http/https, "
            "absolute-form with an empty authority, CONNECT with an origin-form target.",
            "Strips the fragment and forwards; answers 404 (no route) for `GET *`, `ftp://` and "
            "`CONNECT /`, keeping the connection; forwards `http:///p` with the old Host.",
            "Refuse these with 400 and close, in the codec, before routing."),
    Finding("MAX-HEADERS-COUNT", FIXED,
            "Request header count limit",
            "431 and close above `common_http_protocol_options.max_headers_count` (default 100).",
            "No count limit: forwards 101 and 200 headers.",
            "Count header lines (Host included) and answer 431 + close above the limit; honour "
            "`max_headers_count` from the config (issue 14 item 2)."),
    Finding("URL-COUNTS-TO-HEADER-LIMIT", FIXED,
            "The request line counts toward `max_request_headers_kb`",
            "431 and close for a 70 KiB request-target (the URL is counted with the headers "
            "against `max_request_headers_kb`, default 60).",
            "Counts header names and values only: forwards the 70 KiB URL.",
            "Add the request-target's length to the header-size budget."),
    Finding("VERSION-426", FIXED,
            "HTTP/1.x versions other than 1.1",
            "426 Upgrade Required for `HTTP/1.2` (any version but 1.1, and 1.0 unless "
            "`accept_http_10`).",
            "400 (llhttp rejects the version).",
            "Answer 426 and close for a well-formed `HTTP/d.d` that is not 1.1 (or 1.0 when "
            "accepted). Low priority: both refuse and close."),
    Finding("EXPECT-NOT-100-CONTINUE", FIXED,
            "Expect values other than 100-continue",
            "Forwards `expect: something` untouched (only `100-continue` is answered locally and "
            "removed).",
            "Drops every Expect header.",
            "Remove Expect only when it is `100-continue`."),
    # ---- responses: to fix ---------------------------------------------------------------------
    Finding("RESP-CLOSE-DELIMITED-TRUNCATED", FIXED,
            "Close-delimited response bodies are truncated",
            "A response without Content-Length and Transfer-Encoding (HTTP/1.1 or 1.0, even with "
            "`connection: keep-alive`; also when the upstream ends it with an RST) is forwarded "
            "chunked; the upstream's close ends it with the last chunk; the client connection "
            "stays open.",
            "Streams it chunked but never writes the last chunk: when the upstream closes, the "
            "client connection is closed mid-message, so a valid response is seen as truncated.",
            "Treat upstream EOF as the end of a close-delimited body (llhttp: finish the parser "
            "on EOF and take its on_message_complete): write `0\\r\\n\\r\\n` and keep the client "
            "connection."),
    Finding("RESP-TE-NOT-EXACTLY-CHUNKED", FIXED,
            "Response Transfer-Encoding other than exactly `chunked`",
            "502 (`protocol error`) and closes the upstream connection for `gzip`, "
            "`gzip, chunked`, `chunked, gzip` and two Transfer-Encoding lines.",
            "Forwards them: de-chunks `gzip, chunked` and two-line `chunked` as chunked; streams "
            "`gzip` and `chunked, gzip` as close-delimited (then truncates, see above).",
            "Same rule as requests on the upstream codec: exactly one `chunked`, else 502 and "
            "close the upstream connection."),
    Finding("RESP-STATUS-BELOW-100", FIXED,
            "Status codes below 100",
            "502 and closes the upstream connection for `099`.",
            "Forwards `HTTP/1.1 99 Unknown` with the upstream's Content-Length but without its "
            "body (treated as interim): the client reads the next response's first bytes as this "
            "body (response desync on the client connection).",
            "Refuse status < 100 with 502 and close the upstream connection. (Envoy forwards 600 "
            "and 999; the sidecar does too.)"),
    Finding("RESP-STATUS-LINE", FIXED,
            "Status-line details",
            "502 for a NUL in the reason phrase and for an empty line before the status line.",
            "Accepts both (the reason phrase is never forwarded, so the NUL does not reach the "
            "client).",
            "Refuse both with 502 and close the upstream connection. Low priority."),
    Finding("RESP-PARTIAL-HEAD-502", FIXED,
            "Upstream closes in the middle of the response head",
            "502 (`protocol error`).",
            "503 (`connection termination`).",
            "An EOF after some response bytes but before the end of the head is a protocol error: "
            "502, flag UPE."),
    Finding("RESP-CL-ON-1XX-204", FIXED,
            "Content-Length on a 1xx or 204 response",
            "502 and closes the upstream connection (`100 Continue` with Content-Length; `204` "
            "with Content-Length and no body).",
            "Ignores the header: forwards the final response / the 204.",
            "Refuse with 502 and close the upstream connection."),
    Finding("RESP-BYTES-AFTER-HEAD", FIXED,
            "A body sent in answer to HEAD",
            "Forwards the head and closes the upstream connection (the bytes are never read).",
            "llhttp, not told the request was HEAD while it parses the same read, consumes the "
            "body by its Content-Length/chunked framing and the connection goes back to the pool.",
            "After a HEAD (or 204/304) response, any further byte before the next request is a "
            "protocol error: close the upstream connection, never reuse it."),
    Finding("RESP-MAX-HEADERS-COUNT", FIXED,
            "Response header count limit",
            "502 above the cluster's `common_http_protocol_options.max_headers_count` (default "
            "100).",
            "No limit.",
            "Count response header lines; 502 and close the upstream connection above the limit."),
    Finding("RESP-TRAILERS-MERGED", FIXED,
            "Response trailers merged into the header section",
            "Drops trailers (`enable_trailers` is false by default).",
            "When the whole response is read at once, llhttp's trailer callbacks append the "
            "trailer fields to the response headers: `x-t: v` is sent as a header.",
            "Stop collecting header fields at on_headers_complete; drop trailers (or forward them "
            "as trailers once `enable_trailers` is supported). RFC 9110 §6.5.1 forbids the merge."),
    Finding("RESP-RESENT-AFTER-WRITE", FIXED,
            "A written request is sent again",
            "The upstream resets a reused connection after receiving the request: 503 "
            "(`connection termination`); no retry without a retry policy.",
            "Sends the same request (same x-request-id) again on a new connection, because no "
            "response byte had arrived (`sent = _got_bytes`).",
            "Once any byte of a request was written, a reset is not retried unless the route's "
            "retry policy allows it (`reset`, `connect-failure` semantics as in Envoy)."),
    # ---- documented ----------------------------------------------------------------------------
    Finding("D-CONNECTION-NAMED-RESPONSE-HEADERS", DOCUMENTED,
            "Response headers named in Connection",
            "Forwards `x-hop` although the upstream's `Connection: x-hop` names it.",
            "Drops it (RFC 9110 §7.6.1).",
            "Deliberate and documented in docs/config.md; also asserted by "
            "tests/conformance/envoy/test_conformance_envoy.py::test_hop_by_hop_response_headers."),
    # ---- stricter (safe) -----------------------------------------------------------------------
    Finding("S-REQUEST-LINE-WHITESPACE", STRICTER,
            "Whitespace variants in the request line",
            "Accepts HTAB or CR as separators and trailing SP/HTAB/CR after the version "
            "(RFC 9112 §3 lenient parsing) and forwards.",
            "400 and close.",
            "RFC 9112 §3 requires single SPs and warns that lenient parsing enables smuggling; "
            "refusing forwards nothing. Cost: clients that send such lines get 400."),
    Finding("S-BARE-LF", STRICTER,
            "Bare LF as a line terminator",
            "Accepts a bare LF after the request line, header lines, the end of the head, chunk "
            "data and trailers (RFC 9112 §2.2 MAY); when the LF cuts the request line early it "
            "answers 426 (an HTTP/0.9-style line).",
            "400 and close.",
            "Refusing is allowed by RFC 9112 §2.2 and removes a classic desync lever (Weikop "
            "2025); nothing is forwarded."),
    Finding("S-BARE-CR", STRICTER,
            "Bare CR inside a line",
            "Deletes the CR and forwards (`X-A: b\\rc` becomes `x-a: bc`; `chun\\rked` makes the "
            "Transfer-Encoding line vanish and the body is not read as chunked).",
            "400 and close.",
            "RFC 9112 §2.2: a bare CR MUST be rejected or replaced by SP; Envoy's deletion is a "
            "third behaviour. Rejecting forwards nothing."),
    Finding("S-OBS-FOLD", STRICTER,
            "Obsolete line folding in requests",
            "Replaces the fold with SP and forwards; a folded `Transfer-Encoding:` value becomes "
            "`chunked` and is honoured; a line folded under `X:` hides a Transfer-Encoding.",
            "400 and close.",
            "RFC 9112 §5.2 allows rejecting with 400; refusing forwards nothing."),
    Finding("S-CHUNK-SYNTAX", STRICTER,
            "Chunk syntax Envoy tolerates",
            "Accepts BWS around the chunk-extension `;` and `=`, invalid extension tokens, NUL in "
            "an extension, SP/HTAB after the size, chunk data longer or shorter than its size "
            "(resynchronising at the next line end), and a Content-Length trailer (trailers are "
            "dropped).",
            "400 and close.",
            "Each is outside the RFC 9112 §7.1 grammar; refusing a malformed chunked body "
            "forwards nothing and closes the connection, which removes the smuggling vector."),
    Finding("S-RESP-LENIENCY", STRICTER,
            "Response syntax Envoy tolerates",
            "Forwards a 4-digit status, `HTTP/1.2`, a double space in the status line, bare CR in "
            "the reason, bare-LF lines, chunk sizes with trailing SP, chunk data longer than its "
            "size, and obs-fold and bare CR in header values.",
            "502 and closes the upstream connection.",
            "A clean 502 for a malformed upstream message; nothing ambiguous reaches the client."),
    Finding("S-RESP-BROKEN-CHUNKED", STRICTER,
            "Broken chunked response bodies",
            "Has already sent the 200 head when the body turns out malformed (size not hex, "
            "overflow, data shorter than the size, LF-only lines): resets, so the client sees a "
            "truncated 200 and a closed connection.",
            "502 (it reads small responses whole before answering); the client connection stays "
            "usable.",
            "The client gets a clean error instead of a truncated message; both close the upstream "
            "connection. (A large streamed body would end like Envoy's.)"),
    Finding("S-RESP-UNSOLICITED-101", STRICTER,
            "101 Switching Protocols nobody asked for",
            "Forwards the 101 head to the client, closes the upstream, then serves the next "
            "request on the same client connection as if nothing switched.",
            "503 and closes the upstream connection.",
            "A switch nobody requested is a protocol error; refusing it keeps both sides in step."),
]

_F += [
    Finding("S-PIPELINED-ERROR-EARLY", STRICTER,
            "A malformed pipelined request is refused before its request line is complete",
            "Validates the next request only once its request line is complete: with bytes "
            "left over after a body shorter than its Content-Length says, it answers the first "
            "request and keeps waiting.",
            "Answers the first request, then refuses the leftover bytes at the first impossible "
            "byte (llhttp) with 400 and closes.",
            "The leftover bytes can never become a valid request; refusing them as soon as "
            "llhttp sees they cannot forwards nothing and frees the connection sooner."),
    Finding("S-TE-TRAILING-HTAB", STRICTER,
            "`Transfer-Encoding: chunked<HTAB>` is refused",
            "Trims the trailing HTAB (OWS) and reads the body as chunked.",
            "501 and close: llhttp does not trim a trailing HTAB in Transfer-Encoding, and the "
            "sidecar does not second-guess its framing decision.",
            "Refusing an unusual Transfer-Encoding forwards nothing; no client library sends a "
            "trailing HTAB there."),
    Finding("S-HOST-DUPLICATED", STRICTER,
            "More than one Host line is a 400",
            "Joins them with a comma (`host: a.test,b.test`), routes on that and forwards one "
            "line.",
            "400 and close (RFC 9112 §3.2: MUST respond with 400).",
            "RFC 9112 requires the 400; forwarding nothing cannot desynchronise the upstream's "
            "idea of the authority from the sidecar's routing decision."),
]

FINDINGS: dict[str, Finding] = {f.id: f for f in _F if f.verdict != FIXED}
FIXED_FINDINGS: dict[str, Finding] = {f.id: f for f in _F if f.verdict == FIXED}
