"""A bound listener: accept, keep track of connections, sweep idle ones, drain.

Its routes live in an ``HttpConnectionManager`` swapped by the config store in one assignment,
without touching the socket; a request in flight keeps the manager it started with.

An L4 listener (filter chains, listener filters, tcp_proxy) swaps its ``ListenerChains``
the same way. With one chain that every connection gets, connections are served straight from
the listening socket; otherwise an ``InspectingAcceptor`` runs the listener filters and the
chain is picked per connection before its first byte is read.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from sidecar.codec.detect import server_protocol
from sidecar.codec.stream_owner import ServedConnection
from sidecar.config.l4 import FilterChainMatch
from sidecar.config.listener import Listener
from sidecar.core.connection import ConnectionContext
from sidecar.core.message import Request, Response, local_reply
from sidecar.l4.tcp_proxy import TcpProxySession
from sidecar.listener.accept import InspectingAcceptor
from sidecar.listener.chains import ConnectionFacts
from sidecar.listener.http import HttpConnectionManager, ListenerCounters
from sidecar.listener.network import ChainRuntime, HttpChain, ListenerChains
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import ListenerL4Stats
from sidecar.tls.context import server_context
from sidecar.tls.secrets import SecretStore


def sweep_interval(cfg: Listener) -> float:
    """Timeouts are checked by one sweep per listener, not a timer per request: once a second,
    or more often when a configured timeout is short (a fifth of it, at least every 50 ms)."""
    shortest = min((t for t in (cfg.request_timeout_s, cfg.stream_idle_timeout_s,
                                cfg.max_stream_duration_s, cfg.request_headers_timeout_s,
                                cfg.idle_timeout_s) if t > 0), default=5.0)
    return max(0.05, min(1.0, shortest / 5))


async def _no_routes(req: Request) -> Response:
    return local_reply(req.ctx, 404, "", "NR")


def _unobserved(req: Request, resp: Response, body_bytes: int) -> None:
    """No routes yet: nothing observes the stream."""

_SSL_HANDSHAKE_TIMEOUT_S = 10.0


def serves_from_socket(lc: Listener) -> bool:
    """An L4 listener whose every connection gets its one chain (no inspection)."""
    return len(lc.filter_chains) == 1 and lc.default_filter_chain is None and \
        not lc.listener_filters.filters and lc.filter_chains[0].match == FilterChainMatch()


def socket_key(lc: Listener) -> tuple[object, ...]:
    """What the listening socket depends on: a change needs a new socket."""
    if not lc.l4:
        return (lc.host, lc.port, lc.tls)
    if serves_from_socket(lc):
        return (lc.host, lc.port, "chain", lc.filter_chains[0].tls,
                lc.filter_chains[0].http is not None)
    return (lc.host, lc.port, "inspect")


class ListenerRuntime:
    """A bound listener; its routes are swapped by the config store without touching sockets."""

    def __init__(self, config: Listener, metrics: Metrics, secrets: SecretStore | None = None,
                 l4_stats: ListenerL4Stats | None = None):
        self.config = config
        self.secrets = secrets          # SDS certificates by name
        self.name = config.name
        self.connections: set[ServedConnection] = set()
        # L4 listeners: the chains (swapped like hcm), TCP proxy sessions, the acceptor
        self.chains: ListenerChains | None = None
        self.sessions: set[TcpProxySession] = set()
        self.acceptor: InspectingAcceptor | None = None
        self.l4_stats = l4_stats if l4_stats is not None else ListenerL4Stats(Metrics(False), "")
        self.server: asyncio.Server | None = None
        self.draining = False
        # swapped by the config store in one assignment; a stream reads it once, at dispatch
        self.hcm: HttpConnectionManager | None = None
        # the codec's dispatch: the current manager's own (bound on swap, so a request costs
        # no call through this object)
        self.dispatch: Callable[[Request], Awaitable[Response]] = _no_routes
        self.finish: Callable[[Request, Response, int], None] = _unobserved
        self._limits(config)
        self._sweeper: asyncio.Task[None] | None = None
        self.bound_port = config.port
        self.downstream_cx_active = 0
        self.counters = ListenerCounters(metrics, config.name)

    def active_requests(self) -> int:
        """Requests being served or queued (pipelined) on this listener's connections."""
        return sum(c.in_flight() for c in self.connections)

    def swap(self, config: Listener, hcm: HttpConnectionManager) -> HttpConnectionManager | None:
        """Serve ``hcm`` (a new config's routes) from now on; returns the one it replaces."""
        self.config = config
        self._limits(config)
        old, self.hcm = self.hcm, hcm
        self.dispatch = hcm.dispatch
        self.finish = hcm.finish
        return old

    def _limits(self, config: Listener) -> None:
        """What the codec reads from its listener on every request (no config lookups)."""
        self.max_header_bytes = config.max_request_headers_kb * 1024
        self.max_headers_count = config.max_headers_count
        self.headers_with_underscores = config.headers_with_underscores_action
        self.server_header = f"server: {config.server_name}\r\n"
        self.server_name = config.server_name
        self.accept_http_10 = config.accept_http_10
        self.suppress_envoy_headers = config.suppress_envoy_headers
        self.stream_idle_timeout_s = config.stream_idle_timeout_s

    def swap_chains(self, config: Listener, chains: ListenerChains) -> ListenerChains | None:
        """Serve a new config's filter chains from now on; returns the ones they replace."""
        self.config = config
        if self.acceptor is not None:
            self.acceptor.set_filters(config.listener_filters)
        old, self.chains = self.chains, chains
        return old

    def port_bound(self) -> None:
        """Port 0 was bound to a real port: routes that strip a matching port must know it."""
        hcms = [self.hcm] if self.hcm is not None else []
        if self.chains is not None:
            hcms += [h.hcm for h in self.chains.http_chains()]
        for hcm in hcms:
            hcm.bound_port = self.bound_port
            if hcm.table is not None:
                hcm.table.listener_port = str(self.bound_port)

    # ---- what the codec asks of its listener (codec.http1.StreamOwner) ---------------------
    def connection_opened(self, conn: ServedConnection) -> None:
        self.connections.add(conn)
        self.downstream_cx_active += 1
        self.counters.cx_total.inc()

    def connection_closed(self, conn: ServedConnection) -> None:
        self.connections.discard(conn)
        self.downstream_cx_active -= 1

    def protocol_error(self, status: int) -> None:
        self.counters.protocol_error(status)

    def http2_abuse(self, kind: str) -> None:
        self.counters.http2_abuse(kind)

    def new_connection(self) -> asyncio.Protocol:
        """The codec for a connection just accepted (the listener's codec_type, read now)."""
        cfg = self.config
        return server_protocol(self, cfg.codec, cfg.http2, cfg.idle_timeout_s)

    # ---- L4: connections handed to a chain ----------------------------------------------------
    def session_opened(self, session: TcpProxySession) -> None:
        self.sessions.add(session)
        self.counters.cx_total.inc()

    def session_closed(self, session: TcpProxySession) -> None:
        self.sessions.discard(session)

    def _context(self, remote: tuple[str, int], local: tuple[str, int],
                 chain: ChainRuntime | None) -> ConnectionContext:
        loop = asyncio.get_running_loop()
        ctx = ConnectionContext(self.name, (remote[0], remote[1]), (local[0], local[1]),
                                loop.time(), time.time())
        if chain is not None:
            ctx.filter_chain_name = chain.name
        return ctx

    def _protocol(self, chain: ChainRuntime, ctx: ConnectionContext | None
                  ) -> asyncio.BaseProtocol:
        if chain.http is not None:
            hc = chain.http.config          # its codec_type: HTTP/1.1, HTTP/2 or either
            return server_protocol(chain.http, hc.codec, hc.http2, hc.idle_timeout_s)
        assert chain.tcp is not None
        if ctx is None:
            return _LateSession(self, chain)
        return chain.tcp.session(self, ctx)

    def inspected(self, sock: socket.socket, facts: ConnectionFacts,
                  original_dst: tuple[str, int] | None) -> None:
        """The acceptor ran the listener filters: pick the chain and hand the socket over."""
        chains = self.chains
        chain = chains.selector.select(facts) if chains is not None else None
        if chain is None or chains is None:
            self.l4_stats.no_filter_chain.inc()
            if chains is not None and chains.listener_logs:
                try:
                    ctx = self._context(sock.getpeername(), (str(facts.local_ip),
                                                             facts.local_port), None)
                except OSError:
                    ctx = None
                if ctx is not None:
                    ctx.flags.append("NR")
                    ctx.server_name = facts.server_name
                    ctx.termination = "filter_chain_not_found"
                    ctx.end = ctx.start
                    for lg in chains.listener_logs:
                        lg.log(ctx)
            sock.close()
            return
        ctx = None
        if chain.tcp is not None:
            ctx = self._context((str(facts.remote_ip), facts.remote_port),
                                (str(facts.local_ip), facts.local_port), chain)
            ctx.original_dst = original_dst
            ctx.server_name = facts.server_name
            ctx.alpn = facts.application_protocols
        proto = self._protocol(chain, ctx)
        asyncio.get_running_loop().create_task(self._hand_over(sock, proto, chain.ssl))

    def dropped(self, sock: socket.socket, facts: ConnectionFacts) -> None:
        """A connection closed while its listener filters ran: the listener's access log
        still gets a line (Envoy's, with no chain and no flag)."""
        chains = self.chains
        if chains is None or not chains.listener_logs:
            return
        ctx = self._context((str(facts.remote_ip), facts.remote_port),
                            (str(facts.local_ip), facts.local_port), None)
        ctx.end = asyncio.get_running_loop().time()
        for lg in chains.listener_logs:
            lg.log(ctx)

    async def _hand_over(self, sock: socket.socket, proto: asyncio.BaseProtocol,
                         ssl_ctx: object) -> None:
        loop = asyncio.get_running_loop()
        try:
            if ssl_ctx is None:
                await loop.connect_accepted_socket(lambda: proto, sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: proto, sock, ssl=ssl_ctx,  # type: ignore[arg-type]
                    ssl_handshake_timeout=_SSL_HANDSHAKE_TIMEOUT_S)
        except (OSError, TimeoutError):
            # a failed TLS handshake (bad client certificate, timeout) or a vanished client
            self.l4_stats.filter("transport", "handshake_failed").inc()
            sock.close()

    async def start(self, reuse_port: bool = False, sock=None) -> None:
        if self.config.l4:
            await self._start_l4(reuse_port, sock)
            return
        loop = asyncio.get_running_loop()
        ssl_ctx = server_context(self.config.tls, self.secrets) if self.config.tls is not None \
            else None
        if sock is not None:
            self.server = await loop.create_server(self.new_connection, sock=sock, backlog=1024,
                                                   ssl=ssl_ctx)
        else:
            self.server = await loop.create_server(self.new_connection,
                                                   self.config.host, self.config.port,
                                                   reuse_port=reuse_port or None, backlog=1024,
                                                   ssl=ssl_ctx)
        self.bound_port = self.server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    async def _start_l4(self, reuse_port: bool, sock: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        if serves_from_socket(cfg):
            chains = self.chains
            assert chains is not None and chains.only is not None
            only = chains.only
            ssl_ctx = only.ssl

            def factory() -> asyncio.BaseProtocol:
                c = self.chains.only if self.chains is not None and \
                    self.chains.only is not None else only
                return self._protocol(c, None)
            handshake = _SSL_HANDSHAKE_TIMEOUT_S if ssl_ctx is not None else None
            if sock is not None:
                self.server = await loop.create_server(
                    factory, sock=sock, backlog=1024, ssl=ssl_ctx,
                    ssl_handshake_timeout=handshake)
            else:
                self.server = await loop.create_server(
                    factory, cfg.host, cfg.port, reuse_port=reuse_port or None, backlog=1024,
                    ssl=ssl_ctx, ssl_handshake_timeout=handshake)
            self.bound_port = self.server.sockets[0].getsockname()[1]
        else:
            self.acceptor = InspectingAcceptor(self.name, cfg.listener_filters, self,
                                               self.l4_stats)
            self.bound_port = self.acceptor.start(cfg.host, cfg.port, reuse_port, sock)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            cfg = self.config
            await asyncio.sleep(sweep_interval(cfg))
            now = time.monotonic()
            cfg = self.config
            for c in list(self.connections):
                owner = c.lr
                ccfg = owner.config if isinstance(owner, HttpChain) else cfg
                c.idle_check(now, ccfg.idle_timeout_s, ccfg.request_headers_timeout_s, ccfg)
            if self.sessions:
                loop_now = loop.time()
                for s in list(self.sessions):
                    s.sweep(now)
                    s.check_duration(loop_now)

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.acceptor is not None:
            self.acceptor.stop_accepting()
        self.draining = True

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``), then close."""
        await self.stop_accepting()
        for c in list(self.connections):
            if not c._busy:
                c._close()
        end = time.monotonic() + timeout
        # TCP proxy connections have no request boundary to stop at: they may run to the end
        # of the drain time (Envoy's drain), then they are closed
        while (self.connections or self.sessions) and time.monotonic() < end:
            await asyncio.sleep(0.05)
            for c in list(self.connections):
                if not c._busy:
                    c._close()
        for c in list(self.connections):
            c._close()
        for s in list(self.sessions):
            s.close(None, "listener drained")
        self._close_acceptor()

    def _close_acceptor(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            c._close()
        for s in list(self.sessions):
            s.abort()
        self._close_acceptor()


class _LateSession(TcpProxySession):
    """A TCP proxy session of a chain served straight from the listening socket: its
    connection context is made from the transport's addresses when the connection opens."""

    __slots__ = ("_lr", "_chain")

    def __init__(self, lr: ListenerRuntime, chain: ChainRuntime):
        assert chain.tcp is not None
        super().__init__(chain.tcp, lr, None)  # type: ignore[arg-type]
        self._lr = lr
        self._chain = chain

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.ctx = self._lr._context(peer, local, self._chain)
        super().connection_made(transport)
