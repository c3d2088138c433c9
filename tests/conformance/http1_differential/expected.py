"""Expected divergences: every corpus case where the sidecar's outcome differs from Envoy's
today, with the finding (``expected_findings.FINDINGS``) that explains it. Findings fixed since
the harness was written are kept in ``expected_findings.FIXED_FINDINGS`` (no case shows them).

The test suite asserts Envoy-equality for every case not listed here, and asserts that every
case listed here still differs (a case that starts matching Envoy must be removed, so the list
only shrinks as the codec is fixed). Cases whose finding is ``stricter (safe)`` are also held to
the safety claim: the sidecar forwards no request that Envoy did not forward.
"""

from __future__ import annotations

from .expected_findings import DOCUMENTED, FINDINGS, FIXED, FIXED_FINDINGS, STRICTER, TO_FIX, Finding

__all__ = ["DOCUMENTED", "EXPECTED", "FINDINGS", "FIXED", "FIXED_FINDINGS", "STRICTER", "TO_FIX",
           "Finding"]

EXPECTED: dict[str, str] = {
    # S-PIPELINED-ERROR-EARLY (stricter (safe)): a malformed pipelined request refused before its request line ends
    "cl.body-longer": "S-PIPELINED-ERROR-EARLY",
    # S-TE-TRAILING-HTAB (stricter (safe)): `chunked<HTAB>` is refused
    "mut.te-value-end.tab": "S-TE-TRAILING-HTAB",
    # S-HOST-DUPLICATED (stricter (safe)): more than one Host line is a 400
    "host.duplicate-same": "S-HOST-DUPLICATED",
    "host.duplicate-different": "S-HOST-DUPLICATED",
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
    "resp.hdr.obs-fold": "S-RESP-LENIENCY",
    "resp.hdr.value-bare-cr": "S-RESP-LENIENCY",
    # S-RESP-BROKEN-CHUNKED (stricter (safe)): Broken chunked response bodies
    "resp.chunk.size-not-hex": "S-RESP-BROKEN-CHUNKED",
    "resp.chunk.size-overflow": "S-RESP-BROKEN-CHUNKED",
    "resp.chunk.data-shorter": "S-RESP-BROKEN-CHUNKED",
    "resp.chunk.lf-only": "S-RESP-BROKEN-CHUNKED",
    # S-RESP-UNSOLICITED-101 (stricter (safe)): 101 Switching Protocols nobody asked for
    "resp.interim.101-unsolicited": "S-RESP-UNSOLICITED-101",
}
