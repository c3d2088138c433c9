"""The filter chains of an L4 listener under one config snapshot, swapped as a unit.

Each chain is an HTTP connection manager (``HttpChain``: the codec's ``StreamOwner`` for the
connections it gets) or a ``TcpProxyFilter``; ``ListenerChains`` picks one per connection
(``ChainSelector``) and makes the protocol object the connection is handed to. Connections keep
the chain they started with when a new snapshot swaps in.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.config.l4 import FilterChainMatch
from sidecar.config.listener import Listener
from sidecar.core.message import Request, Response
from sidecar.l4.tcp_proxy import TcpProxyFilter
from sidecar.listener.chains import ChainSelector
from sidecar.listener.http import HttpConnectionManager
from sidecar.observability.access_log import ConnectionLogger

if TYPE_CHECKING:
    from sidecar.codec.stream_owner import ServedConnection
    from sidecar.listener.listener import ListenerRuntime


class HttpChain:
    """An HTTP chain of an L4 listener: the stream owner of the connections it gets."""

    __slots__ = ("lr", "config", "hcm", "name", "max_header_bytes", "max_headers_count",
                 "headers_with_underscores", "server_header", "accept_http_10",
                 "suppress_envoy_headers", "server_name", "stream_idle_timeout_s", "dispatch",
                 "finish")

    def __init__(self, lr: ListenerRuntime, config: Listener, hcm: HttpConnectionManager):
        self.lr = lr
        self.config = config
        self.hcm = hcm
        # the codec calls the manager's own (bound once: no call through this object)
        self.dispatch: Callable[[Request], Awaitable[Response]] = hcm.dispatch
        self.finish: Callable[[Request, Response, int], None] = hcm.finish
        self.name = config.name
        # what the codec reads on every request (as ListenerRuntime._limits)
        self.max_header_bytes = config.max_request_headers_kb * 1024
        self.max_headers_count = config.max_headers_count
        self.headers_with_underscores = config.headers_with_underscores_action
        self.server_header = f"server: {config.server_name}\r\n"
        self.accept_http_10 = config.accept_http_10
        self.suppress_envoy_headers = config.suppress_envoy_headers
        self.server_name = config.server_name
        self.stream_idle_timeout_s = config.stream_idle_timeout_s

    @property
    def bound_port(self) -> int:
        return self.lr.bound_port

    @property
    def draining(self) -> bool:
        return self.lr.draining

    def connection_opened(self, conn: ServedConnection) -> None:
        self.lr.connection_opened(conn)

    def connection_closed(self, conn: ServedConnection) -> None:
        self.lr.connection_closed(conn)

    def protocol_error(self, status: int) -> None:
        self.lr.protocol_error(status)

    def http2_abuse(self, kind: str) -> None:
        self.lr.http2_abuse(kind)



@dataclass(slots=True)
class ChainRuntime:
    """One chain of one snapshot: its name, TLS context and terminal filter."""

    name: str
    match: FilterChainMatch
    ssl: ssl.SSLContext | None
    http: HttpChain | None = None
    tcp: TcpProxyFilter | None = None


class ListenerChains:
    """All chains of one listener for one snapshot."""

    __slots__ = ("selector", "chains", "default", "listener_logs", "only")

    def __init__(self, chains: list[ChainRuntime], default: ChainRuntime | None,
                 listener_logs: tuple[ConnectionLogger, ...]):
        self.chains = chains
        self.default = default
        self.selector: ChainSelector[ChainRuntime] = ChainSelector(
            [(c.match, c) for c in chains], default)
        self.listener_logs = listener_logs
        # the one chain every connection gets (served straight from the listening socket)
        self.only = chains[0] if len(chains) == 1 and default is None and \
            chains[0].match == FilterChainMatch() else None

    def http_chains(self) -> list[HttpChain]:
        out = [c.http for c in self.chains if c.http is not None]
        if self.default is not None and self.default.http is not None:
            out.append(self.default.http)
        return out

    def retire(self) -> None:
        for h in self.http_chains():
            h.hcm.retire()

