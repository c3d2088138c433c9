"""Expected divergences: every corpus case where the sidecar's outcome differs from Envoy's
today, with the finding (``expected_findings.FINDINGS``) that explains it.

The test suite asserts Envoy-equality for every case not listed here, and asserts that every
case listed here still differs (a case that starts matching Envoy must be removed, so the list
only shrinks as the codec is fixed). Cases whose finding is ``stricter (safe)`` are also held to
the safety claim: the sidecar forwards no request that Envoy did not forward.
"""

from __future__ import annotations

from .expected_findings import DOCUMENTED, FINDINGS, STRICTER, TO_FIX, Finding

__all__ = ["DOCUMENTED", "EXPECTED", "FINDINGS", "STRICTER", "TO_FIX", "Finding"]

EXPECTED: dict[str, str] = {
    # PIPELINED-ERROR-DROPS-RESPONSE (to fix): A bad request pipelined after a good one loses the good one's response
    "cl.body-longer": "PIPELINED-ERROR-DROPS-RESPONSE",
    "te.underscore-name": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.good-then-garbage": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.good-then-space-before-colon": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.good-then-bad-te": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.good-then-cl-te": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.post-then-garbage": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.good-bad-good": "PIPELINED-ERROR-DROPS-RESPONSE",
    "pipe.close-then-more": "PIPELINED-ERROR-DROPS-RESPONSE",
    "mut.eol2.tab": "PIPELINED-ERROR-DROPS-RESPONSE",
    "mut.eol2.sp": "PIPELINED-ERROR-DROPS-RESPONSE",
    "mut.eol2.0x80": "PIPELINED-ERROR-DROPS-RESPONSE",
    "mut.eol2.0xff": "PIPELINED-ERROR-DROPS-RESPONSE",
    # ABORT-KEEPS-UPSTREAM (to fix): A client that goes away mid-request leaves the upstream connection open
    "cl.uint64-max": "ABORT-KEEPS-UPSTREAM",
    "cl.body-shorter-then-wait": "ABORT-KEEPS-UPSTREAM",
    "chunk.missing-final-crlf-then-wait": "ABORT-KEEPS-UPSTREAM",
    "abort.mid-body-content-length": "ABORT-KEEPS-UPSTREAM",
    "abort.mid-body-content-length-rst": "ABORT-KEEPS-UPSTREAM",
    "abort.mid-body-chunked": "ABORT-KEEPS-UPSTREAM",
    "abort.waiting-for-response": "ABORT-KEEPS-UPSTREAM",
    # TE-NOT-EXACTLY-CHUNKED (to fix): Transfer-Encoding other than exactly `chunked`
    "te.gzip-chunked": "TE-NOT-EXACTLY-CHUNKED",
    "te.chunked-gzip": "TE-NOT-EXACTLY-CHUNKED",
    "te.identity-chunked": "TE-NOT-EXACTLY-CHUNKED",
    "te.chunked-chunked": "TE-NOT-EXACTLY-CHUNKED",
    "te.empty": "TE-NOT-EXACTLY-CHUNKED",
    "te.trailing-comma": "TE-NOT-EXACTLY-CHUNKED",
    "te.leading-comma": "TE-NOT-EXACTLY-CHUNKED",
    "te.two-headers-chunked-then-x": "TE-NOT-EXACTLY-CHUNKED",
    "te.two-headers-x-then-chunked": "TE-NOT-EXACTLY-CHUNKED",
    "te.two-headers-chunked-twice": "TE-NOT-EXACTLY-CHUNKED",
    "mut.te-value-start.comma": "TE-NOT-EXACTLY-CHUNKED",
    "mut.te-value-end.tab": "TE-NOT-EXACTLY-CHUNKED",
    "mut.te-value-end.comma": "TE-NOT-EXACTLY-CHUNKED",
    # HOST-INVALID-CHARS (to fix): Host with characters outside the authority grammar
    "host.comma-list": "HOST-INVALID-CHARS",
    "host.char-space": "HOST-INVALID-CHARS",
    "host.char-tab": "HOST-INVALID-CHARS",
    "host.char-slash": "HOST-INVALID-CHARS",
    "host.char-question": "HOST-INVALID-CHARS",
    "host.char-hash": "HOST-INVALID-CHARS",
    "host.char-backslash": "HOST-INVALID-CHARS",
    "host.char-lt": "HOST-INVALID-CHARS",
    "host.char-dquote": "HOST-INVALID-CHARS",
    "host.char-0xff": "HOST-INVALID-CHARS",
    # HOST-DUPLICATED (to fix): More than one Host line
    "host.duplicate-same": "HOST-DUPLICATED",
    "host.duplicate-different": "HOST-DUPLICATED",
    # ABSOLUTE-FORM-USERINFO (to fix): Absolute-form target with userinfo
    "target.absolute-form-userinfo": "ABSOLUTE-FORM-USERINFO",
    # REQUEST-TARGET-FORM (to fix): Request-target forms Envoy refuses
    "target.byte-hash": "REQUEST-TARGET-FORM",
    "target.fragment": "REQUEST-TARGET-FORM",
    "target.asterisk-get": "REQUEST-TARGET-FORM",
    "target.absolute-form-ftp": "REQUEST-TARGET-FORM",
    "target.absolute-form-empty-authority": "REQUEST-TARGET-FORM",
    "target.connect-origin-form": "REQUEST-TARGET-FORM",
    # MAX-HEADERS-COUNT (to fix): Request header count limit
    "hdr.count-101": "MAX-HEADERS-COUNT",
    "hdr.count-200": "MAX-HEADERS-COUNT",
    # URL-COUNTS-TO-HEADER-LIMIT (to fix): The request line counts toward `max_request_headers_kb`
    "line.very-long-target-70k": "URL-COUNTS-TO-HEADER-LIMIT",
    # VERSION-426 (to fix): HTTP/1.x versions other than 1.1
    "line.version-1.2": "VERSION-426",
    # EXPECT-NOT-100-CONTINUE (to fix): Expect values other than 100-continue
    "expect.unknown": "EXPECT-NOT-100-CONTINUE",
    # RESP-CLOSE-DELIMITED-TRUNCATED (to fix): Close-delimited response bodies are truncated
    "resp.close.delimited": "RESP-CLOSE-DELIMITED-TRUNCATED",
    "resp.close.delimited-keep-alive-header": "RESP-CLOSE-DELIMITED-TRUNCATED",
    "resp.close.delimited-http10": "RESP-CLOSE-DELIMITED-TRUNCATED",
    "resp.close.delimited-then-reset": "RESP-CLOSE-DELIMITED-TRUNCATED",
    # RESP-TE-NOT-EXACTLY-CHUNKED (to fix): Response Transfer-Encoding other than exactly `chunked`
    "resp.te.gzip-close-delimited": "RESP-TE-NOT-EXACTLY-CHUNKED",
    "resp.te.gzip-chunked": "RESP-TE-NOT-EXACTLY-CHUNKED",
    "resp.te.chunked-gzip": "RESP-TE-NOT-EXACTLY-CHUNKED",
    "resp.te.two-headers": "RESP-TE-NOT-EXACTLY-CHUNKED",
    # RESP-STATUS-BELOW-100 (to fix): Status codes below 100
    "resp.status.code-099": "RESP-STATUS-BELOW-100",
    # RESP-STATUS-LINE (to fix): Status-line details
    "resp.status.nul-in-reason": "RESP-STATUS-LINE",
    "resp.status.leading-crlf": "RESP-STATUS-LINE",
    # RESP-PARTIAL-HEAD-502 (to fix): Upstream closes in the middle of the response head
    "resp.status.partial-head-then-close": "RESP-PARTIAL-HEAD-502",
    # RESP-CL-ON-1XX-204 (to fix): Content-Length on a 1xx or 204 response
    "resp.interim.100-with-content-length": "RESP-CL-ON-1XX-204",
    "resp.nobody.204-with-content-length-only": "RESP-CL-ON-1XX-204",
    # RESP-BYTES-AFTER-HEAD (to fix): A body sent in answer to HEAD
    "resp.nobody.head-with-body": "RESP-BYTES-AFTER-HEAD",
    "resp.nobody.head-with-chunked-body": "RESP-BYTES-AFTER-HEAD",
    # RESP-MAX-HEADERS-COUNT (to fix): Response header count limit
    "resp.hdr.count-101": "RESP-MAX-HEADERS-COUNT",
    # RESP-TRAILERS-MERGED (to fix): Response trailers merged into the header section
    "resp.chunk.trailers": "RESP-TRAILERS-MERGED",
    # RESP-RESENT-AFTER-WRITE (to fix): A written request is sent again
    "resp.misc.reset-on-reuse": "RESP-RESENT-AFTER-WRITE",
    # D-CONNECTION-NAMED-RESPONSE-HEADERS (documented deviation): Response headers named in Connection
    "resp.hdr.connection-named": "D-CONNECTION-NAMED-RESPONSE-HEADERS",
    # S-REQUEST-LINE-WHITESPACE (stricter (safe)): Whitespace variants in the request line
    "line.tab-separators": "S-REQUEST-LINE-WHITESPACE",
    "line.trailing-space": "S-REQUEST-LINE-WHITESPACE",
    "mut.sp1.tab": "S-REQUEST-LINE-WHITESPACE",
    "mut.sp1.cr": "S-REQUEST-LINE-WHITESPACE",
    "mut.sp2.tab": "S-REQUEST-LINE-WHITESPACE",
    "mut.sp2.cr": "S-REQUEST-LINE-WHITESPACE",
    "mut.version-suffix.tab": "S-REQUEST-LINE-WHITESPACE",
    "mut.version-suffix.cr": "S-REQUEST-LINE-WHITESPACE",
    "mut.version-suffix.sp": "S-REQUEST-LINE-WHITESPACE",
    # S-BARE-LF (stricter (safe)): Bare LF as a line terminator
    "line.bare-lf-after-request-line": "S-BARE-LF",
    "hdr.bare-lf-line-ends": "S-BARE-LF",
    "hdr.bare-lf-one-header": "S-BARE-LF",
    "hdr.bare-lf-end-of-head": "S-BARE-LF",
    "te.bare-lf-before-name": "S-BARE-LF",
    "chunk.lf-after-data": "S-BARE-LF",
    "chunk.trailer-lf-only": "S-BARE-LF",
    "mut.target.lf": "S-BARE-LF",
    "mut.sp2.lf": "S-BARE-LF",
    "mut.eol1.lf": "S-BARE-LF",
    "mut.eol2.lf": "S-BARE-LF",
    "mut.eoh.lf": "S-BARE-LF",
    "mut.cl-value-end.lf": "S-BARE-LF",
    "mut.chunk-data-end.lf": "S-BARE-LF",
    # S-BARE-CR (stricter (safe)): Bare CR inside a line
    "hdr.value-bare-cr": "S-BARE-CR",
    "mut.value-start.cr": "S-BARE-CR",
    "mut.value.cr": "S-BARE-CR",
    "mut.eol2.cr": "S-BARE-CR",
    "mut.te-value-start.cr": "S-BARE-CR",
    "mut.te-value-end.cr": "S-BARE-CR",
    "mut.te-value-inside.cr": "S-BARE-CR",
    "mut.cl-value-start.cr": "S-BARE-CR",
    "mut.cl-value-end.cr": "S-BARE-CR",
    # S-OBS-FOLD (stricter (safe)): Obsolete line folding in requests
    "hdr.obs-fold": "S-OBS-FOLD",
    "hdr.obs-fold-tab": "S-OBS-FOLD",
    "te.obs-fold-value": "S-OBS-FOLD",
    "te.hidden-by-obs-fold": "S-OBS-FOLD",
    "chunk.trailer-obs-fold": "S-OBS-FOLD",
    # S-CHUNK-SYNTAX (stricter (safe)): Chunk syntax Envoy tolerates
    "chunk.ext-bws-before-semicolon": "S-CHUNK-SYNTAX",
    "chunk.ext-bws-around-equals": "S-CHUNK-SYNTAX",
    "chunk.ext-invalid-token": "S-CHUNK-SYNTAX",
    "chunk.ext-nul": "S-CHUNK-SYNTAX",
    "chunk.size-trailing-space": "S-CHUNK-SYNTAX",
    "chunk.size-trailing-tab": "S-CHUNK-SYNTAX",
    "chunk.data-longer-than-size": "S-CHUNK-SYNTAX",
    "chunk.data-shorter-than-size": "S-CHUNK-SYNTAX",
    "chunk.trailer-content-length": "S-CHUNK-SYNTAX",
    "mut.chunk-size-end.tab": "S-CHUNK-SYNTAX",
    "mut.chunk-size-end.sp": "S-CHUNK-SYNTAX",
    # S-RESP-LENIENCY (stricter (safe)): Response syntax Envoy tolerates
    "resp.status.code-4-digits": "S-RESP-LENIENCY",
    "resp.status.version-1.2": "S-RESP-LENIENCY",
    "resp.status.double-space": "S-RESP-LENIENCY",
    "resp.status.bare-cr-in-reason": "S-RESP-LENIENCY",
    "resp.status.bare-lf-lines": "S-RESP-LENIENCY",
    "resp.chunk.size-trailing-space": "S-RESP-LENIENCY",
    "resp.chunk.data-longer": "S-RESP-LENIENCY",
    "resp.nobody.304-with-body": "S-RESP-LENIENCY",
    "resp.hdr.obs-fold": "S-RESP-LENIENCY",
    "resp.hdr.value-bare-cr": "S-RESP-LENIENCY",
    # S-RESP-BROKEN-CHUNKED (stricter (safe)): Broken chunked response bodies
    "resp.chunk.size-not-hex": "S-RESP-BROKEN-CHUNKED",
    "resp.chunk.size-overflow": "S-RESP-BROKEN-CHUNKED",
    "resp.chunk.data-shorter": "S-RESP-BROKEN-CHUNKED",
    "resp.chunk.lf-only": "S-RESP-BROKEN-CHUNKED",
    # S-RESP-EXTRA-BYTES (stricter (safe)): Bytes after a complete response
    "resp.chunk.extra-bytes-after": "S-RESP-EXTRA-BYTES",
    "resp.cl.body-longer": "S-RESP-EXTRA-BYTES",
    "resp.cl.body-longer-with-response": "S-RESP-EXTRA-BYTES",
    # S-RESP-UNSOLICITED-101 (stricter (safe)): 101 Switching Protocols nobody asked for
    "resp.interim.101-unsolicited": "S-RESP-UNSOLICITED-101",
}
