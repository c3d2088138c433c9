"""The response side of the downstream HTTP/2 codec, precomputed: the header fields that repeat
on every response (``:status``, ``server``, ``date``, the names), encoded once; the names a
response never carries (connection-specific ones, and those its ``connection`` header names,
with ``keep-alive`` and ``close`` ready made: nginx sends one on every response); a trailer
block. Every cache here is bounded (entries and their length): a peer cannot grow them."""

from __future__ import annotations

import ngh2
from ngh2 import NeverIndexedHeader

from sidecar.codec.headers import DATE
from sidecar.codec.http2_common import CONNECTION_SPECIFIC_STR, VOLATILE
from sidecar.core.body import Headers

# a response's field names, encoded once (bounded: names are few and repeat); the volatile ones
# are never in it, so a name found here is sent as an ordinary (indexable) field
OUT_NAMES: dict[str, bytes] = {}
OUT_NAMES_MAX = 4096
CACHED_MAX = 64          # longer names or values are not remembered (bounded memory)

# names never sent in a response head (``server`` is the listener's, ``te`` is request-only)
DROP_OUT = CONNECTION_SPECIFIC_STR | {"server", "te"}


def connection_drop(connection: str) -> frozenset[str]:
    """The names to drop for a response's ``connection`` header: its tokens too (RFC 9110
    7.6.1); remembered for the values that repeat (bounded)."""
    drop = DROP_OUT | {t.strip().lower() for t in connection.split(",")}
    if len(CONNECTION_DROP) < 64 and len(connection) <= CACHED_MAX:
        CONNECTION_DROP[connection] = drop
    return drop


CONNECTION_DROP: dict[str, frozenset[str]] = {}
for _value in ("keep-alive", "Keep-Alive", "close", "Close"):
    connection_drop(_value)


def out_field(out: list[ngh2.Header], name: str, value: str) -> None:
    """Appends a response field whose name is not in ``OUT_NAMES`` yet (or is volatile).
    (Appended here, not returned: compiled by mypyc, a returned ``NeverIndexedHeader`` would
    come back a plain tuple, and be indexed.)"""
    kb = name.encode("latin-1")
    vb = value.encode("latin-1")
    if kb in VOLATILE:
        out.append(NeverIndexedHeader(kb, vb))
        return
    if len(OUT_NAMES) < OUT_NAMES_MAX and len(name) <= CACHED_MAX:
        OUT_NAMES[name] = kb
    out.append((kb, vb))


STATUS: dict[int, tuple[bytes, bytes]] = {
    code: (b":status", str(code).encode()) for code in (
        100, 101, 200, 201, 202, 203, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403,
        404, 405, 408, 409, 410, 412, 413, 415, 416, 421, 422, 426, 429, 431, 499, 500, 501,
        502, 503, 504)}


def server_field(name: str) -> tuple[str, tuple[bytes, bytes]]:
    return name, (b"server", name.encode("latin-1"))


class DateField:
    """The ``date`` field of the current second, encoded once per second."""

    __slots__ = ("value", "field")

    def __init__(self) -> None:
        self.value = ""
        self.field = (b"date", b"")

    def __call__(self) -> tuple[bytes, bytes]:
        value = DATE.get()
        if value is not self.value:
            self.value = value
            self.field = (b"date", value.encode())
        return self.field


date_field = DateField()


def trailer_block(trailers: Headers) -> list[ngh2.Header]:
    out: list[ngh2.Header] = []
    names = OUT_NAMES
    for k, v in trailers.items():
        if k in CONNECTION_SPECIFIC_STR or k[:1] == ":":
            continue
        out.append((names.get(k) or k.encode("latin-1"), v.encode("latin-1")))
    return out
