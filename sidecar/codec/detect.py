"""Which codec serves a new downstream connection (the HTTP connection manager's
``codec_type``): HTTP/2 when TLS negotiated ``h2`` by ALPN or the client opens with the HTTP/2
connection preface (prior knowledge, "h2c"), else HTTP/1.1 (``auto``); always HTTP/1.1
(``http1``); HTTP/2 only, closing anything else without a frame as Envoy does (``http2``).

The detector reads the first bytes, then hands the transport to the codec with
``set_protocol``; the codec registers the connection with its listener from there on.
"""

from __future__ import annotations

import asyncio
from typing import cast

from sidecar.codec.http1 import DownstreamConnection
from sidecar.codec.stream_owner import StreamOwner
from sidecar.config.http2 import Http2Options

# The HTTP/2 client connection preface (RFC 9113 3.4), the same bytes as http2_common.PREFACE:
# spelled here so that telling HTTP/1.1 from HTTP/2 does not load h2 (~3 MB of RSS).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _http2_connection(owner: StreamOwner, http2: Http2Options) -> asyncio.Protocol:
    # Lazy: the HTTP/2 codec (h2, hpack) is loaded by the first HTTP/2 connection only.
    from sidecar.codec.http2 import Http2Connection
    return Http2Connection(owner, http2)


class ProtocolDetector(asyncio.Protocol):
    __slots__ = ("owner", "codec", "http2", "idle_timeout", "transport", "buf", "_timer")

    def __init__(self, owner: StreamOwner, codec: str, http2: Http2Options,
                 idle_timeout: float) -> None:
        self.owner = owner
        self.codec = codec
        self.http2 = http2
        self.idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's is not a subclass
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            self._switch(_http2_connection(self.owner, self.http2))
            return
        if self.idle_timeout:
            # a connection that never says a word is closed like an idle one
            self._timer = asyncio.get_running_loop().call_later(self.idle_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = min(len(buf), len(PREFACE))
        proto: asyncio.Protocol
        if buf[:n] == PREFACE[:n]:
            if n < len(PREFACE):
                self.buf = buf
                return
            proto = _http2_connection(self.owner, self.http2)
        elif self.codec == "http2":
            assert self.transport is not None
            self.transport.close()
            return
        else:
            proto = DownstreamConnection(self.owner)  # type: ignore[arg-type]
        self.buf = b""
        self._switch(proto, buf)

    def _switch(self, proto: asyncio.Protocol, data: bytes = b"") -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self.transport
        assert t is not None
        t.set_protocol(proto)
        proto.connection_made(t)
        if data and not t.is_closing():
            proto.data_received(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def server_protocol(owner: StreamOwner, codec: str, http2: Http2Options,
                    idle_timeout: float) -> asyncio.Protocol:
    """The protocol object for a connection just accepted."""
    if codec == "http1":
        return DownstreamConnection(owner)  # type: ignore[arg-type]
    return ProtocolDetector(owner, codec, http2, idle_timeout)
