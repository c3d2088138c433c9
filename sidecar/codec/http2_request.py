"""HTTP/2 header lists made into messages: a downstream request (already checked by nghttp2 as
RFC 9113 8.2 and 8.3 ask; Envoy's choices where the RFC leaves one: a ``host`` header next to
``:authority`` is accepted and ``:authority`` wins, cookies are joined), and a request's
trailers (checked here too, in one pass)."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from multidict import MultiDict

from sidecar.codec.http2_common import CONNECTION_SPECIFIC
from sidecar.core.body import Headers
from sidecar.core.context import RequestContext
from sidecar.core.message import Request

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")     # a lower-case field name

RawHeaders = list[tuple[bytes, bytes]]


class Malformed(Exception):
    """A request RFC 9113 8.2 calls malformed."""


class Refused(Exception):
    """A request the listener's limits refuse (its stream is reset, as Envoy's codec does)."""


class TooLarge(Refused):
    """Headers over ``max_request_headers_kb`` or ``max_headers_count``."""


# RFC 9113 8.2.1: a field value with NUL, CR or LF, or starting or ending with SP or HTAB
_BAD_FIELD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
# field names already found valid (lower-case tokens, not connection-specific): a set lookup
# instead of a regex per field for the names every message repeats; bounded
_NAMES_OK: set[bytes] = set()
_NAMES_OK_MAX = 4096
# the request pseudo-headers (RFC 9113 8.3.1; nghttp2 let no other through): their slot
_PSEUDO = {b":method": 0, b":path": 1, b":scheme": 2, b":authority": 3}
# request field names decoded once (a dict lookup costs less than a decode); bounded, short ones
_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 4096


def _name(name: bytes) -> str:
    decoded = name.decode("latin-1")
    if len(_NAMES) < _NAMES_MAX and len(name) <= 64:
        _NAMES[name] = decoded
    return decoded


def _check_name(name: bytes) -> None:
    if _TOKEN.fullmatch(name) is None or name in CONNECTION_SPECIFIC:
        raise Malformed(f"header name {name!r}")
    if len(_NAMES_OK) < _NAMES_OK_MAX and len(name) <= 64:   # a client's long names: not kept
        _NAMES_OK.add(name)


def _check_field(name: bytes, value: bytes) -> None:
    if name not in _NAMES_OK:
        _check_name(name)
    if value and _BAD_FIELD_VALUE.search(value) is not None:
        raise Malformed(f"header value of {name!r}")
    if name == b"te" and value.lower() != b"trailers":
        raise Malformed("te other than trailers")


def trailers_from_headers(raw: RawHeaders) -> Headers:
    """Trailers (either direction): no pseudo-header, RFC 9113 8.2 fields."""
    out: Headers = MultiDict()
    for name, value in raw:
        if name[:1] == b":":
            raise Malformed(f"trailer {name!r}")
        _check_field(name, value)
        out.add(name.decode("latin-1"), value.decode("latin-1"))
    return out


def request_from_checked_headers(raw: Sequence[tuple[bytes, bytes]], listener: str,
                                 peer: tuple[str, int] | None, port: int, tls: bool,
                                 peer_identity: str | None, underscores: str, max_bytes: int,
                                 max_count: int) -> Request:
    """The request, from a header list the HTTP/2 engine (nghttp2) has already checked as RFC
    9113 8.2 and 8.3 ask (names lower-case tokens, no connection-specific field, ``te`` only
    "trailers", values without NUL/CR/LF or surrounding whitespace, the request pseudo-headers
    once each, first, ``:method``, ``:scheme`` and ``:path`` present, ``:authority`` or
    ``host``): only Envoy's choices are left here. Raises ``TooLarge`` past the listener's
    limits (Envoy counts a name and value per field, pseudo-headers included, the crumbled
    cookies as the one header they are joined into), ``Refused`` for an underscore under
    REJECT_REQUEST (DROP_HEADER drops the field). A CONNECT comes back with ``reject`` set
    (404)."""
    pseudo: list[str | None] = [None, None, None, None]    # method, path, scheme, authority
    host = None
    headers: Headers = MultiDict()
    cookies: list[str] | None = None
    size = 0
    regular = False
    check_underscores = underscores != "ALLOW"
    pseudo_index = _PSEUDO.get
    names = _NAMES
    for name, value in raw:
        size += len(name) + len(value)
        if not regular:            # the pseudo-headers come first (nghttp2 checked)
            i = pseudo_index(name)
            if i is not None:
                pseudo[i] = value.decode("latin-1")
                continue
            regular = True
            if pseudo[3] is not None:
                headers.add("host", pseudo[3])   # :authority wins over a Host header (Envoy)
        if check_underscores and b"_" in name:
            if underscores == "DROP_HEADER":
                continue
            raise Refused(f"header name with an underscore {name!r}")
        n = names.get(name) or _name(name)
        if n == "cookie":
            # joined below, as Envoy does for any upstream protocol
            if cookies is None:
                cookies = [value.decode("latin-1")]
            else:
                cookies.append(value.decode("latin-1"))
        elif n == "host":
            if host is not None:
                raise Malformed("two host headers")
            host = value.decode("latin-1")
        else:
            headers.add(n, value.decode("latin-1"))
    method, path, scheme, authority = pseudo
    if size > max_bytes or len(raw) - (len(cookies) - 1 if cookies else 0) > max_count:
        raise TooLarge("header list")
    if method is None or (path is None and method != "CONNECT"):   # (nghttp2 checked)
        raise Malformed("no :method or :path")
    if cookies:
        headers.add("cookie", "; ".join(cookies))
    if authority is None:
        if host is not None:           # Host first, as :authority would be
            all_headers: Headers = MultiDict(host=host)
            all_headers.extend(headers)
            headers = all_headers
    elif not regular:
        headers.add("host", authority)
    ctx = RequestContext(listener, peer, time.perf_counter(), port)
    if tls:                        # the context's defaults otherwise
        ctx.tls = True
        ctx.peer_identity = peer_identity
    ctx.protocol = "HTTP/2"
    if path is None:
        # CONNECT (RFC 9113 8.5: :authority, no :path): no route matches one (connect_matcher
        # is refused), so it is answered 404 on its stream, the connection going on, as Envoy
        req = Request(method, "", "", headers, b"", ctx, "2")
        req.reject = (404, "")
        return req
    p, _, query = path.partition("?")
    req = Request(method, p, query, headers, b"", ctx, "2")
    req.scheme = scheme or "http"
    return req
