"""HTTP/1.1 request heads: from what llhttp parsed (request target, header lines) to a
``Request``, validated as Envoy's codec does. Pure: no transport, no connection state; the
connection (``codec.http1``) turns a ``Refusal`` into the error reply.
"""

from __future__ import annotations

import re
import time
from typing import Protocol

import httptools
from multidict import MultiDict

from sidecar.core.connection_id import ConnectionId
from sidecar.core.context import RequestContext
from sidecar.core.message import Request

# Host / absolute-form authority: RFC 3986 reg-name, IP literal and port characters (nghttp2's
# and Envoy's check); anything else (SP, "/", "?", "#", "\\", quotes, obs-text) is a 400.
_VALID_AUTHORITY = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@\[\]%]*").fullmatch

# Host values already found valid (bounded): most connections send the same few
_GOOD_HOSTS: set[str] = set()

# headers_with_underscores_action
ALLOW, REJECT_REQUEST, DROP_HEADER = "ALLOW", "REJECT_REQUEST", "DROP_HEADER"


class Refusal(Exception):
    """The request is refused: ``status`` is answered and the connection closes."""

    def __init__(self, status: int, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


class HeadPolicy(Protocol):
    """The listener settings a request head is checked against."""

    name: str
    headers_with_underscores: str    # ALLOW | REJECT_REQUEST | DROP_HEADER
    accept_http_10: bool

    @property
    def bound_port(self) -> int: ...


def new_parser(protocol: object) -> httptools.HttpRequestParser:
    p = httptools.HttpRequestParser(protocol)
    # Bytes after a request that ends the connection (Connection: close, HTTP/1.0) are ignored,
    # as in Envoy, rather than an error. Versions other than 1.1 are parsed so that a
    # well-formed HTTP/d.d gets 426 (checked in parse_head), not 400.
    p.set_dangerous_leniencies(lenient_data_after_close=True, lenient_version=True)
    return p


def _underscores(action: str, raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """headers_with_underscores_action other than ALLOW."""
    if action == DROP_HEADER:
        return [(n, v) for n, v in raw if b"_" not in n]
    for n, _ in raw:
        if b"_" in n:
            raise Refusal(400, "header name with an underscore")
    return raw


def parse_head(lr: HeadPolicy, p: httptools.HttpRequestParser, url_parts: list[bytes],
               raw_headers: list[tuple[bytes, bytes]], peer: tuple[str, int] | None, tls: bool,
               peer_identity: str | None, conn_id: ConnectionId) -> tuple[Request, bool]:
    """The request of a complete head (``peer``: ``codec.sockets.peer_address``, None for a
    Unix socket), and whether a ``100 Continue`` is owed; raises
    ``Refusal``. An upgrade the connection manager may allow sets ``req.upgrade``; an h2c
    offer (ignored, as Envoy does) is an upgrade parse with neither ``upgrade`` nor ``reject``."""
    if lr.headers_with_underscores != ALLOW:
        raw_headers = _underscores(lr.headers_with_underscores, raw_headers)
    headers: MultiDict[str] = MultiDict()
    add = headers.add
    for name, value in raw_headers:
        add(name.decode("latin-1").lower(), value.decode("latin-1"))
    raw = b"".join(url_parts) if len(url_parts) != 1 else url_parts[0]
    method = p.get_method().decode("latin-1")
    version = p.get_http_version()
    te_lines = 0
    if "transfer-encoding" in headers:
        # exactly one Transfer-Encoding line whose value is "chunked" (Envoy): anything
        # else (codings lists, repeats) is how a TE.TE desync is set up
        te = headers.getall("transfer-encoding")
        te_lines = len(te)
        if te_lines > 1 or te[0].strip(" \t").lower() != "chunked":
            raise Refusal(501, "Not Implemented")
    hosts = headers.getall("host", None)
    if hosts is not None and len(hosts) > 1:
        # RFC 9112 3.2: more than one Host is a 400 (Envoy joins them; refusing is safe)
        raise Refusal(400, "duplicate host")
    if raw.find(b"#") != -1:      # (find: `in` on bytes raises and clears a TypeError first)
        raise Refusal(400, "fragment in the request target")
    url = raw.decode("latin-1")
    if raw[0] != 47:                     # not "/": asterisk, absolute or authority form
        url = _other_target_form(url, method, headers)
    elif method == "CONNECT":
        raise Refusal(400, "CONNECT needs an authority-form target")
    host = headers.get("host")
    if host is not None and host not in _GOOD_HOSTS:
        if not _VALID_AUTHORITY(host):
            raise Refusal(400, "invalid host")
        if len(_GOOD_HOSTS) >= 1024:
            _GOOD_HOSTS.clear()
        _GOOD_HOSTS.add(host)
    path, _, query = url.partition("?")
    ctx = RequestContext(lr.name, peer, time.perf_counter(), lr.bound_port)
    ctx.tls = tls
    ctx.peer_identity = peer_identity
    ctx.connection = conn_id
    req = Request(method, path, query, headers, b"", ctx, version)
    req.keep_alive = p.should_keep_alive()
    req.chunked = te_lines > 0
    if version != "1.1" and not (version == "1.0" and lr.accept_http_10):
        req.reject = (426, "Upgrade Required")
    elif version == "1.1" and host is None:
        req.reject = (400, "")
    elif method == "CONNECT":
        req.reject = (404, "")
    elif p.should_upgrade():
        up = headers.get("upgrade", "").lower()
        if not up.startswith("h2c"):
            # the connection manager decides (upgrade_configs); 403 when not allowed
            req.upgrade = up.partition(",")[0].strip()
    if "expect" in headers and headers["expect"].lower() == "100-continue":
        # Envoy's default: answer 100-continue locally and do not forward it; other
        # expectations go upstream untouched
        del headers["expect"]
        return req, req.reject is None
    return req, False


def _other_target_form(url: str, method: str, headers: MultiDict[str]) -> str:
    """Asterisk-form (OPTIONS only), authority-form (CONNECT) or absolute-form, whose
    authority replaces Host (RFC 9112 3.2.2); returns the origin-form URL."""
    if url == "*":
        if method != "OPTIONS":
            raise Refusal(400, "asterisk-form is only for OPTIONS")
        return url
    if method == "CONNECT":
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise Refusal(400, "invalid request target")
    end = len(rest)
    for sep_char in "/?":
        i = rest.find(sep_char)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]     # userinfo never goes on
    if not authority:
        raise Refusal(400, "absolute-form without a host")
    headers["host"] = authority
    return tail if tail[:1] == "/" else "/" + tail
