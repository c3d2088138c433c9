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
