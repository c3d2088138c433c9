"""Socket options every connection the proxy opens or accepts gets."""

from __future__ import annotations

import asyncio
import socket


def set_nodelay(transport: asyncio.BaseTransport | None) -> None:
    """TCP_NODELAY: a proxy forwards small writes at once (no Nagle delay); a no-op for
    transports without a TCP socket (Unix sockets, tests' in-memory transports)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def peer_address(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The peer's (host, port): an IPv6 peer's 4-tuple cut to its first two, None for a Unix
    socket's peer (an empty name). Typed, so the compiled codecs can keep it in a typed slot."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return (str(peer[0]), int(peer[1]))
    return None
