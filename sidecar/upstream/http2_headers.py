"""The header lists of the upstream HTTP/2 connection (``sidecar.upstream.http2``): a request's
HEADERS (pseudo-headers from the request line and Host, no connection-specific fields, RFC
9113 8.2.2), the response heads and trailers nghttp2 validated as ``Headers``, and a request's
trailer block. Names are encoded and decoded once (bounded caches, names only: values may be
secrets)."""

from __future__ import annotations

from collections.abc import Sequence

from multidict import MultiDict
from ngh2 import NeverIndexedHeader

from sidecar.codec.headers import NOT_FORWARDED, connection_drop
from sidecar.codec.http2_common import CONNECTION_SPECIFIC_STR, VOLATILE
from sidecar.core.body import Headers
from sidecar.core.message import Request

_DROP = NOT_FORWARDED | {"host"} | CONNECTION_SPECIFIC_STR

Header = tuple[bytes, bytes]

# encoded once: the pseudo-header fields that repeat, header names as they go out
_METHODS: dict[str, Header] = {m: (b":method", m.encode()) for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")}
SCHEMES: dict[str, Header] = {sc: (b":scheme", sc.encode()) for sc in ("http", "https")}
_NAMES: dict[str, bytes] = {}
_DECODED: dict[bytes, str] = {}     # received header names, decoded once
_NAMES_MAX = 4096
_NAME_CACHED_MAX = 64    # longer names are not remembered: bounded memory whatever peers send


def request_headers(req: Request, authority: str, scheme: str) -> list[Header]:
    """The HEADERS of ``req`` for an HTTP/2 upstream: pseudo-headers from the request line and
    Host; no connection-specific headers (RFC 9113 8.2.2), ``te`` only as "trailers"."""
    return request_headers_with(req, (b":authority", authority.encode("latin-1")),
                            SCHEMES.get(scheme) or (b":scheme", scheme.encode()))


def request_headers_with(req: Request, authority: Header, scheme: Header) -> list[Header]:
    """``request_headers`` with the ``:authority`` and ``:scheme`` fields given (a connection
    keeps them encoded: they seldom change)."""
    headers = req.headers
    url = req.path + "?" + req.query if req.query else req.path
    method = _METHODS.get(req.method) or (b":method", req.method.encode("latin-1"))
    out = [method, scheme, authority, (b":path", url.encode("latin-1"))]
    te_trailers = False
    append = out.append
    names = _NAMES      # names forwarded as they are (never one of _DROP)
    connection = headers.get("connection")
    # one pass, inline: a call per field is a measurable part of the request
    if not connection:
        for k, v in headers.items():
            kb = names.get(k)
            if kb is None:
                if k in _DROP:
                    if k == "te" and not te_trailers and "trailers" in v.lower():
                        te_trailers = True
                        append((b"te", b"trailers"))
                    continue
                kb = _encoded_name(k)
            # a statement, not a conditional expression: compiled by mypyc, an expression
            # of both kinds is typed a plain tuple and the NeverIndexedHeader would be lost
            if kb in VOLATILE:
                append(NeverIndexedHeader(kb, v.encode("latin-1")))
            else:
                append((kb, v.encode("latin-1")))
    else:
        drop = connection_drop(_DROP, connection)     # and the names Connection lists
        for k, v in headers.items():
            if k in drop:
                if k == "te" and not te_trailers and "trailers" in v.lower():
                    te_trailers = True
                    append((b"te", b"trailers"))
                continue
            kb = names.get(k)
            if kb is None:
                kb = _encoded_name(k)
            # a statement, not a conditional expression: compiled by mypyc, an expression
            # of both kinds is typed a plain tuple and the NeverIndexedHeader would be lost
            if kb in VOLATILE:
                append(NeverIndexedHeader(kb, v.encode("latin-1")))
            else:
                append((kb, v.encode("latin-1")))
    cl = headers.get("content-length")
    if cl is not None:
        append((b"content-length", cl.encode("latin-1")))
    return out


def _encoded_name(name: str) -> bytes:
    """A header name as it goes out (not one of ``_DROP``), remembered while the cache has
    room and if short (names repeat; the bounds keep a client sending ever new or long names
    from growing it)."""
    kb = name.encode("latin-1")
    if len(_NAMES) < _NAMES_MAX and len(name) <= _NAME_CACHED_MAX:
        _NAMES[name] = kb
    return kb


def fields(raw: Sequence[Header]) -> Headers:
    """A header list nghttp2 validated, as Headers (values as the latin-1 they came in)."""
    out: Headers = MultiDict()
    add = out.add       # faster than building the MultiDict from a list of pairs
    names = _DECODED
    for k, v in raw:
        name = names.get(k)
        add(name if name is not None else _decoded_name(k), v.decode("latin-1"))
    return out


def fields_and_size(raw: Sequence[Header]) -> tuple[Headers, int]:
    """A response head nghttp2 validated: its fields after ``:status`` as Headers, and the
    head's size as Envoy counts it against ``max_response_headers_kb`` (names and values)."""
    out: Headers = MultiDict()
    add = out.add
    names = _DECODED
    size = 0
    for k, v in raw:
        size += len(k) + len(v)
        name = names.get(k)
        if name is None:
            if k[0] == 58:        # ":" (the one pseudo-header, :status)
                continue
            name = _decoded_name(k)
        add(name, v.decode("latin-1"))
    return out, size


def _decoded_name(name: bytes) -> str:
    """A received header name as str, remembered while the cache has room. nghttp2 let
    through only lowercase token characters (RFC 9113 8.2.1: a name with any other byte
    fails the stream), so latin-1 and ASCII read it alike."""
    s = name.decode("latin-1")
    if len(_DECODED) < _NAMES_MAX and len(name) <= _NAME_CACHED_MAX:
        _DECODED[name] = s
    return s


def trailer_block(trailers: Headers) -> list[Header]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in trailers.items()
            if k not in CONNECTION_SPECIFIC_STR]
