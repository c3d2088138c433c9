"""What the listener filters read from a connection's first bytes (peeked, never consumed).

* ``tls_inspector``: a TLS ClientHello (RFC 8446 4.1.2, RFC 5246 7.4.1.2) gives the server
  name (SNI, RFC 6066 3) and the offered application protocols (ALPN, RFC 7301 3.1). The
  handshake message may span several TLS records; it is reassembled up to ``max_size``.
* ``http_inspector``: the HTTP/2 connection preface (RFC 9113 3.4) is ``h2c``; a complete
  HTTP/1.x request line (RFC 9112 3) is ``http/1.1`` or ``http/1.0``.

Each parser answers ``NEED_MORE`` while the bytes so far are a prefix of what it looks for, so
the listener waits for more data (up to its ``listener_filters_timeout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

NEED_MORE: Final = "need_more"
NOT_FOUND: Final = "not_found"

MAX_CLIENT_HELLO = 64 * 1024
MAX_REQUEST_LINE = 64 * 1024

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9110 5.6.2 token characters (a method is a token)
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str             # "" when the client sent no SNI
    alpn: tuple[str, ...]


class TlsParseError(Exception):
    """The bytes started like a TLS handshake but the ClientHello is malformed."""


class ClientHelloTooLarge(TlsParseError):
    """The ClientHello is larger than the inspector's limit (``max_client_hello_size``)."""


def parse_client_hello(data: bytes, max_size: int = MAX_CLIENT_HELLO) -> ClientHello | str:
    """A ClientHello, ``NEED_MORE``, or ``NOT_FOUND`` (not TLS). Raises ``TlsParseError`` for
    a TLS handshake that cannot be a valid ClientHello."""
    if len(data) < 5:
        return NEED_MORE     # a record header first, as Envoy's (BoringSSL's) reading does
    if data[0] != _HANDSHAKE:
        return NOT_FOUND
    if len(data) >= 2 and data[1] != 3:
        return NOT_FOUND                      # record version major: TLS/SSL 3.x only
    body = bytearray()
    pos = 0
    need: int | None = None                  # the handshake message's full length
    while need is None or len(body) < need:
        if len(data) < pos + 5:
            return NEED_MORE
        if data[pos] != _HANDSHAKE:
            raise TlsParseError("a non-handshake record interrupts the ClientHello")
        rec_len = int.from_bytes(data[pos + 3:pos + 5], "big")
        if rec_len == 0 or rec_len > 16384 + 2048:
            raise TlsParseError(f"bad TLS record length {rec_len}")
        end = pos + 5 + rec_len
        body += data[pos + 5:min(end, len(data))]
        if need is None and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                raise TlsParseError("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > max_size:
                raise ClientHelloTooLarge(f"ClientHello of {need} bytes is over the limit of "
                                          f"{max_size}")
        if end > len(data):
            if need is not None and len(body) >= need:
                break
            return NEED_MORE
        pos = end
    assert need is not None
    return _client_hello(bytes(body[4:need]))


def _client_hello(b: bytes) -> ClientHello:
    r = _Reader(b)
    r.take(2 + 32)                           # legacy_version, random
    r.take(r.u8())                           # legacy_session_id
    r.take(r.u16())                          # cipher_suites
    r.take(r.u8())                           # legacy_compression_methods
    server_name = ""
    alpn: list[str] = []
    if r.left():
        ext = _Reader(r.take(r.u16()))
        while ext.left():
            kind = ext.u16()
            e = _Reader(ext.take(ext.u16()))
            if kind == _EXT_SERVER_NAME and e.left():
                names = _Reader(e.take(e.u16()))
                while names.left():
                    name_type = names.u8()
                    name = names.take(names.u16())
                    if name_type == 0 and not server_name:
                        try:
                            server_name = name.decode("ascii").lower()
                        except UnicodeDecodeError:
                            raise TlsParseError("SNI host name is not ASCII") from None
            elif kind == _EXT_ALPN and e.left():
                protos = _Reader(e.take(e.u16()))
                while protos.left():
                    alpn.append(protos.take(protos.u8()).decode("latin-1"))
    return ClientHello(server_name, tuple(alpn))


class _Reader:
    __slots__ = ("b", "i")

    def __init__(self, b: bytes):
        self.b = b
        self.i = 0

    def left(self) -> int:
        return len(self.b) - self.i

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise TlsParseError("ClientHello field runs past its end")
        out = self.b[self.i:self.i + n]
        self.i += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")


def detect_http(data: bytes) -> str:
    """``h2c``, ``http/1.1``, ``http/1.0``, ``NEED_MORE`` or ``NOT_FOUND``."""
    if not data:
        return NEED_MORE
    n = min(len(data), len(_H2_PREFACE))
    if data[:n] == _H2_PREFACE[:n]:
        return "h2c" if n == len(_H2_PREFACE) else NEED_MORE
    eol = data.find(b"\n", 0, MAX_REQUEST_LINE)
    line = data if eol < 0 else data[:eol]
    if line.endswith(b"\r"):
        line = line[:-1]
    # method SP request-target SP HTTP-version
    sp = line.find(b" ")
    method = line if sp < 0 else line[:sp]
    if not method and sp == 0:
        return NOT_FOUND
    if any(c not in _TCHAR for c in method):
        return NOT_FOUND
    if eol < 0:
        if len(data) >= MAX_REQUEST_LINE:
            return NOT_FOUND
        if sp > 0:
            rest = line[sp + 1:]
            sp2 = rest.find(b" ")
            if sp2 >= 0:
                version = rest[sp2 + 1:sp2 + 8]       # so far; must lead to "HTTP/1."
                if version != b"HTTP/1."[:len(version)]:
                    return NOT_FOUND
        return NEED_MORE
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return NOT_FOUND
    if parts[2] == b"HTTP/1.1":
        return "http/1.1"
    if parts[2] == b"HTTP/1.0":
        return "http/1.0"
    return NOT_FOUND
