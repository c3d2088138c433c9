"""Accepting connections of a listener with listener filters or several filter chains.

The chain (and with it the TLS certificate, or no TLS at all for a passthrough chain) must be
known before a byte of the connection is consumed, so this acceptor owns the listening socket:

1. accept; ``original_dst`` reads ``SO_ORIGINAL_DST`` at once;
2. ``tls_inspector`` / ``http_inspector`` *peek* (``MSG_PEEK``) at the first bytes, which stay
   in the kernel for whoever reads the connection next; the socket waits in an edge-triggered
   epoll set (itself watched by the event loop) so a partial ClientHello costs nothing until
   more bytes arrive; ``listener_filters_timeout`` bounds the wait;
3. the chain is picked (``ChainSelector``) and the socket handed to the event loop as a
   transport of that chain's protocol (``connect_accepted_socket``, with the chain's TLS).

Linux only (epoll, ``SO_ORIGINAL_DST``), like the interception it serves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import select
import socket
from typing import Protocol

from sidecar.config.l4 import ListenerFilters
from sidecar.l4.inspectors import (
    MAX_CLIENT_HELLO,
    NEED_MORE,
    NOT_FOUND,
    ClientHello,
    ClientHelloTooLarge,
    TlsParseError,
    detect_http,
    parse_client_hello,
)
from sidecar.l4.original_dst import original_destination
from sidecar.listener.chains import ConnectionFacts
from sidecar.observability.stats import ListenerL4Stats

log = logging.getLogger("sidecar.listener")

_PEEK = MAX_CLIENT_HELLO + 5 * 8        # a full ClientHello with its record headers
_ACCEPT_BATCH = 64


class ConnectionSink(Protocol):
    """Where inspected connections go (the listener runtime)."""

    def inspected(self, sock: socket.socket, facts: ConnectionFacts,
                  original_dst: tuple[str, int] | None) -> None: ...

    def dropped(self, sock: socket.socket, facts: ConnectionFacts) -> None:
        """The client left (or timed out) before the listener filters were done."""


class _Pending:
    """A connection whose listener filters are still reading."""

    __slots__ = ("sock", "facts", "original_dst", "tls_pending", "http_pending", "timer", "seen")

    def __init__(self, sock: socket.socket, facts: ConnectionFacts,
                 original_dst: tuple[str, int] | None, filters: ListenerFilters):
        self.sock = sock
        self.facts = facts
        self.original_dst = original_dst
        self.tls_pending = "tls_inspector" in filters.filters
        self.http_pending = "http_inspector" in filters.filters
        self.timer: asyncio.TimerHandle | None = None
        self.seen = 0


class InspectingAcceptor:
    """The listening socket of one listener and its connections' listener filters."""

    def __init__(self, name: str, filters: ListenerFilters, sink: ConnectionSink,
                 stats: ListenerL4Stats):
        self.name = name
        self.filters = filters
        self.sink = sink
        self.stats = stats
        self.sock: socket.socket | None = None
        self._ep: select.epoll | None = None
        self._pending: dict[int, _Pending] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self, host: str, port: int, reuse_port: bool,
              sock: socket.socket | None = None) -> int:
        """Bind (or take ``sock``) and start accepting; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        self._ep = select.epoll()
        loop.add_reader(self._ep.fileno(), self._on_readable)
        loop.add_reader(sock.fileno(), self._on_accept)
        return int(sock.getsockname()[1])

    def set_filters(self, filters: ListenerFilters) -> None:
        """A new config's listener filters (connections being inspected keep theirs)."""
        self.filters = filters

    def stop_accepting(self) -> None:
        sock = self.sock
        loop = self._loop
        if sock is not None and loop is not None:
            loop.remove_reader(sock.fileno())
            sock.close()
            self.sock = None

    def close(self) -> None:
        self.stop_accepting()
        for p in list(self._pending.values()):
            self._drop(p)
        ep = self._ep
        if ep is not None and self._loop is not None:
            self._loop.remove_reader(ep.fileno())
            ep.close()
            self._ep = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ---- accept ----------------------------------------------------------------------------
    def _on_accept(self) -> None:
        ls = self.sock
        if ls is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # EMFILE and friends: keep the listener alive
                log.warning("listener %s: accept failed: %s", self.name, e)
                return
            conn.setblocking(False)
            try:
                self._new(conn)
            except OSError:             # the client already went away
                conn.close()

    def _new(self, conn: socket.socket) -> None:
        local = conn.getsockname()
        remote = conn.getpeername()
        filters = self.filters
        odst = None
        if filters.original_dst:
            odst = original_destination(conn)
            self.stats.filter("original_dst", "found" if odst else "not_found").inc()
        lip, lport = odst if odst is not None else (local[0], local[1])
        facts = ConnectionFacts(local_ip=ipaddress.ip_address(lip), local_port=lport,
                                remote_ip=ipaddress.ip_address(remote[0]),
                                remote_port=remote[1])
        p = _Pending(conn, facts, odst, filters)
        if not (p.tls_pending or p.http_pending):
            self.sink.inspected(conn, facts, odst)
            return
        fd = conn.fileno()
        self._pending[fd] = p
        assert self._ep is not None
        self._ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        if filters.timeout_s > 0 and self._loop is not None:
            p.timer = self._loop.call_later(filters.timeout_s, self._timeout, fd)
        self._inspect(fd, p, 0)          # the bytes may be there already

    # ---- inspect ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        ep = self._ep
        if ep is None:
            return
        for fd, events in ep.poll(0):
            p = self._pending.get(fd)
            if p is not None:
                self._inspect(fd, p, events)

    def _inspect(self, fd: int, p: _Pending, events: int) -> None:
        try:
            data = p.sock.recv(_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(p)
            return
        if not data and (events or p.seen):
            self._drop(p)                # closed before saying anything: nothing to serve
            return
        if data:
            try:
                self._run_filters(p, data)
            except ClientHelloTooLarge:
                self.stats.filter("tls_inspector", "client_hello_too_large").inc()
                self._drop(p)            # cannot be inspected (Envoy closes it too)
                return
        if p.tls_pending or p.http_pending:
            if events & (select.EPOLLRDHUP | select.EPOLLHUP):
                self._drop(p)            # the peer ended mid-hello (Envoy closes too)
                return
            p.seen = len(data)
            return
        self._done(fd, p)

    def _run_filters(self, p: _Pending, data: bytes) -> None:
        stats = self.stats
        if p.tls_pending:
            try:
                hello = parse_client_hello(data, self.filters.max_client_hello)
            except ClientHelloTooLarge:
                raise
            except TlsParseError as e:
                stats.filter("tls_inspector", "client_hello_error").inc()
                log.debug("listener %s: ClientHello not parsed: %s", self.name, e)
                hello = NOT_FOUND
            if hello != NEED_MORE:
                p.tls_pending = False
                if isinstance(hello, ClientHello):
                    p.facts.transport_protocol = "tls"
                    stats.filter("tls_inspector", "tls_found").inc()
                    if hello.server_name:
                        p.facts.server_name = hello.server_name
                        stats.filter("tls_inspector", "sni_found").inc()
                    if hello.alpn:
                        p.facts.application_protocols = hello.alpn
                        stats.filter("tls_inspector", "alpn_found").inc()
                else:
                    stats.filter("tls_inspector", "tls_not_found").inc()
        if p.http_pending:
            if p.facts.transport_protocol == "tls":
                p.http_pending = False   # Envoy's http_inspector skips TLS connections
            else:
                proto = detect_http(data)
                if proto != NEED_MORE:
                    p.http_pending = False
                    if proto == NOT_FOUND:
                        stats.filter("http_inspector", "http_not_found").inc()
                    else:
                        p.facts.application_protocols = (proto,)
                        stats.filter("http_inspector", proto.replace("/", "").replace(".", "")).inc()

    def _timeout(self, fd: int) -> None:
        p = self._pending.get(fd)
        if p is None:
            return
        p.timer = None
        self.stats.filter_timeout.inc()
        if self.filters.continue_on_timeout:
            p.tls_pending = p.http_pending = False
            self._done(fd, p)
        else:
            self._drop(p)

    def _unwatch(self, p: _Pending) -> None:
        fd = p.sock.fileno()
        if self._pending.pop(fd, None) is not None and self._ep is not None:
            try:
                self._ep.unregister(fd)
            except OSError:
                pass
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None

    def _done(self, fd: int, p: _Pending) -> None:
        self._unwatch(p)
        self.sink.inspected(p.sock, p.facts, p.original_dst)

    def _drop(self, p: _Pending) -> None:
        self._unwatch(p)
        self.sink.dropped(p.sock, p.facts)
        p.sock.close()

