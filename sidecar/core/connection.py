"""One downstream connection as the L4 layers see it (Envoy's connection-level StreamInfo).

Filled by the listener (addresses, what the listener filters found, the chain), the TCP proxy
(cluster, upstream host, bytes, flags) and read by the load balancers (``hash_key``,
``tried_hosts``) and the connection access log.
"""

from __future__ import annotations

import itertools

from sidecar.core.context import HostInfo

_IDS = itertools.count(1)


class ConnectionContext:
    __slots__ = ("id", "listener_name", "filter_chain_name", "remote_addr", "direct_remote_addr",
                 "local_addr", "original_dst", "server_name", "alpn", "tls_version",
                 "peer_identity", "start", "wall_start", "end", "flags", "cluster",
                 "upstream_host", "upstream_local_addr", "upstream_failure", "termination",
                 "bytes_received", "bytes_sent", "hash_key", "tried_hosts", "attempts")

    def __init__(self, listener_name: str, remote_addr: tuple[str, int],
                 local_addr: tuple[str, int], start: float, wall_start: float):
        self.id = next(_IDS)
        self.listener_name = listener_name
        self.filter_chain_name = ""
        self.remote_addr = remote_addr
        self.direct_remote_addr = remote_addr
        self.local_addr = local_addr            # restored by original_dst when redirected
        self.original_dst: tuple[str, int] | None = None   # set when a redirect was undone
        self.server_name = ""                   # SNI (tls_inspector, or the TLS handshake)
        self.alpn: tuple[str, ...] = ()
        self.tls_version = ""
        self.peer_identity: str | None = None   # client certificate URI SAN (SPIFFE ID)
        self.start = start                      # loop time
        self.wall_start = wall_start            # time.time(), for START_TIME
        self.end = 0.0
        self.flags: list[str] = []              # Envoy response flags (UF, UO, UH, NR, ...)
        self.cluster = ""
        self.upstream_host = ""
        self.upstream_local_addr = ""
        self.upstream_failure = ""              # UPSTREAM_TRANSPORT_FAILURE_REASON
        self.termination = ""                   # CONNECTION_TERMINATION_DETAILS
        self.bytes_received = 0                 # from the client
        self.bytes_sent = 0                     # to the client
        self.hash_key: int | None = None        # hash_policy source_ip (ring hash, maglev)
        self.tried_hosts: list[HostInfo] = []
        self.attempts = 0

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)
