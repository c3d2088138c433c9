"""Systematic mutations: one byte put at one place of a known-good request.

Each mutation site is a place where parsers are known to disagree (the request line's
separators and terminator, header names, the byte before the colon, the start of a value, line
terminators, and the framing headers and chunk-size lines that decide where a body ends); each
byte is one that some parser somewhere tolerates (controls, whitespace variants, DEL, obs-text,
list and token delimiters). Bodies carry a second request (``SMUGGLED``) so that a framing
disagreement shows up as an extra request at the upstream.

Case names: ``mut.<site>.<byte>``; the source of each is "mutation of <site>".
"""

from __future__ import annotations

from .cases import Case, request_case
from .requests_corpus import SMUGGLED

BYTES = {
    "nul": b"\x00", "soh": b"\x01", "tab": b"\t", "vt": b"\x0b", "ff": b"\x0c", "cr": b"\r",
    "lf": b"\n", "sp": b" ", "del": b"\x7f", "0x80": b"\x80", "0xff": b"\xff",
}
DELIMITERS = {
    "dquote": b'"', "lparen": b"(", "rparen": b")", "comma": b",", "slash": b"/",
    "semicolon": b";", "lt": b"<", "eq": b"=", "gt": b">", "question": b"?", "at": b"@",
    "lbracket": b"[", "backslash": b"\\", "rbracket": b"]", "lbrace": b"{", "rbrace": b"}",
}


def _base(method: bytes = b"POST", sp1: bytes = b" ", target: bytes = b"/m", sp2: bytes = b" ",
          version: bytes = b"HTTP/1.1", eol1: bytes = b"\r\n", probe: bytes = b"X-Probe: v",
          eol2: bytes = b"\r\n", eoh: bytes = b"\r\n") -> bytes:
    return (method + sp1 + target + sp2 + version + eol1 + b"Host: mut.test\r\n" + probe + eol2
            + b"Content-Length: 5\r\n" + eoh + b"hello" + SMUGGLED)


# site -> (description, function of the byte -> request)
REQUEST_SITES = {
    "method": ("inside the method", lambda b: _base(method=b"PO" + b + b"ST")),
    "sp1": ("the SP after the method", lambda b: _base(sp1=b)),
    "target": ("inside the request-target", lambda b: _base(target=b"/m" + b + b"x")),
    "sp2": ("the SP before the version", lambda b: _base(sp2=b)),
    "version-suffix": ("after the version", lambda b: _base(version=b"HTTP/1.1" + b)),
    "eol1": ("the request line's CRLF", lambda b: _base(eol1=b)),
    "name": ("inside a header name", lambda b: _base(probe=b"X-P" + b + b"robe: v")),
    "before-colon": ("between name and colon", lambda b: _base(probe=b"X-Probe" + b + b": v")),
    "value-start": ("the OWS after the colon", lambda b: _base(probe=b"X-Probe:" + b + b"v")),
    "value": ("inside a header value", lambda b: _base(probe=b"X-Probe: v" + b + b"w")),
    "eol2": ("a header line's CRLF", lambda b: _base(eol2=b)),
    "eoh": ("the empty line ending the head", lambda b: _base(eoh=b)),
}


def _te(header: bytes) -> bytes:
    return (b"POST /te HTTP/1.1\r\nHost: mut.test\r\n" + header + b"\r\n\r\n"
            + b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED)


def _cl(header: bytes) -> bytes:
    return b"POST /cl HTTP/1.1\r\nHost: mut.test\r\n" + header + b"\r\n\r\nhello" + SMUGGLED


def _chunk(body: bytes) -> bytes:
    return (b"POST /chunk HTTP/1.1\r\nHost: mut.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            + body + SMUGGLED)


FRAMING_SITES = {
    "te-name": ("inside the Transfer-Encoding name",
                lambda b: _te(b"Transfer" + b + b"-Encoding: chunked")),
    "te-before-colon": ("between Transfer-Encoding and colon",
                        lambda b: _te(b"Transfer-Encoding" + b + b": chunked")),
    "te-value-start": ("before chunked", lambda b: _te(b"Transfer-Encoding:" + b + b"chunked")),
    "te-value-end": ("after chunked", lambda b: _te(b"Transfer-Encoding: chunked" + b)),
    "te-value-inside": ("inside chunked", lambda b: _te(b"Transfer-Encoding: chun" + b + b"ked")),
    "cl-before-colon": ("between Content-Length and colon",
                        lambda b: _cl(b"Content-Length" + b + b": 5")),
    "cl-value-start": ("before the length", lambda b: _cl(b"Content-Length:" + b + b"5")),
    "cl-value-end": ("after the length", lambda b: _cl(b"Content-Length: 5" + b)),
    "cl-name": ("inside the Content-Length name", lambda b: _cl(b"Content" + b + b"-Length: 5")),
    "chunk-size-end": ("after a chunk size", lambda b: _chunk(b"5" + b + b"\r\nhello\r\n0\r\n\r\n")),
    "chunk-size-start": ("before a chunk size",
                         lambda b: _chunk(b + b"5\r\nhello\r\n0\r\n\r\n")),
    "chunk-data-end": ("the CRLF after chunk data",
                       lambda b: _chunk(b"5\r\nhello" + b + b"0\r\n\r\n")),
}


def _cases() -> list[Case]:
    out = []
    for site, (what, make) in REQUEST_SITES.items():
        table = dict(BYTES, **DELIMITERS) if site == "name" else BYTES
        for name, byte in table.items():
            out.append(request_case(f"mut.{site}.{name}", f"mutation: {name} {what}", make(byte)))
    framing_bytes = dict(BYTES, comma=b",")
    for site, (what, make) in FRAMING_SITES.items():
        for name, byte in framing_bytes.items():
            out.append(request_case(f"mut.{site}.{name}", f"mutation: {name} {what}", make(byte)))
    return out


CASES: list[Case] = _cases()
