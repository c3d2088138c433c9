"""``original_dst``: the destination a connection had before iptables redirected it.

A connection redirected by a nat-table ``REDIRECT`` rule arrives on the proxy's port; the
kernel's conntrack entry remembers where the client was going, and ``SO_ORIGINAL_DST``
(``IP6T_SO_ORIGINAL_DST`` for IPv6, both 80 in linux/netfilter_ipv4.h and
netfilter_ipv6/ip6_tables.h) reads it back as a ``sockaddr_in``/``sockaddr_in6``. A connection
that was not redirected has no such entry: the call fails (ENOENT) and the local address is
the destination, as Envoy does.
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN6 = 28


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """(ip, port) the client connected to before a redirect, or None (not redirected, or
    not Linux)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            port = struct.unpack_from("!H", raw, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port
