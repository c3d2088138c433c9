"""Picking a listener's filter chain for a connection, in Envoy's order.

The criteria are tried in this order (Envoy's ``FilterChainMatch`` doc): destination port,
destination IP, server name (SNI), transport protocol, application protocols (ALPN), direct
source IP, source type, source IP, source port. At each step the chains that name a value
matching the connection win, the most specific first (longest prefix, exact server name before
the longest wildcard); only when none does, the chains that leave the criterion empty go on.
There is no backtracking: a connection whose most specific candidates all fail a later
criterion gets no chain (then the default chain, if any), exactly as in Envoy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sidecar.config.l4 import FilterChainMatch, IpNetwork

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")


@dataclass(slots=True)
class ConnectionFacts:
    """What is known of a new connection when its chain is picked: its addresses (the local
    one restored by ``original_dst``) and what the listener filters found."""

    local_ip: IpAddress
    local_port: int
    remote_ip: IpAddress
    remote_port: int
    direct_remote_ip: IpAddress | None = None     # the peer itself (no PROXY protocol here)
    server_name: str = ""
    transport_protocol: str = "raw_buffer"        # Envoy's default when nothing detected it
    application_protocols: tuple[str, ...] = field(default_factory=tuple)

    @property
    def direct_ip(self) -> IpAddress:
        return self.direct_remote_ip if self.direct_remote_ip is not None else self.remote_ip


def _best_prefix(ranges: Sequence[IpNetwork], ip: IpAddress) -> int:
    """The longest prefix of ``ranges`` containing ``ip`` (-1: none)."""
    best = -1
    for net in ranges:
        if net.version == ip.version and ip in net and net.prefixlen > best:
            best = net.prefixlen
    return best


def _name_rank(names: Sequence[str], sni: str) -> int:
    """How specifically ``names`` match ``sni``: exact beats any wildcard, a longer wildcard
    suffix beats a shorter one (-1: no match)."""
    if not sni:
        return -1
    best = -1
    for n in names:
        if n == sni:
            return 1 << 20
        if n.startswith("*.") and sni.endswith(n[1:]) and len(sni) > len(n) - 1:
            best = max(best, len(n))
    return best


def _source_type_ok(kind: str, f: ConnectionFacts) -> bool:
    local = f.remote_ip == f.local_ip or f.remote_ip.is_loopback
    return local if kind == "SAME_IP_OR_LOOPBACK" else not local


# (has a value?, rank of the connection against it: -1 no match, higher = more specific)
_Criterion = tuple[Callable[[FilterChainMatch], bool],
                   Callable[[FilterChainMatch, ConnectionFacts], int]]

CRITERIA: tuple[_Criterion, ...] = (
    (lambda m: m.destination_port is not None,
     lambda m, f: 0 if m.destination_port == f.local_port else -1),
    (lambda m: bool(m.prefix_ranges),
     lambda m, f: _best_prefix(m.prefix_ranges, f.local_ip)),
    (lambda m: bool(m.server_names),
     lambda m, f: _name_rank(m.server_names, f.server_name)),
    (lambda m: bool(m.transport_protocol),
     lambda m, f: 0 if m.transport_protocol == f.transport_protocol else -1),
    (lambda m: bool(m.application_protocols),
     lambda m, f: 0 if any(p in m.application_protocols for p in f.application_protocols) else -1),
    (lambda m: bool(m.direct_source_prefix_ranges),
     lambda m, f: _best_prefix(m.direct_source_prefix_ranges, f.direct_ip)),
    (lambda m: m.source_type != "ANY",
     lambda m, f: 0 if _source_type_ok(m.source_type, f) else -1),
    (lambda m: bool(m.source_prefix_ranges),
     lambda m, f: _best_prefix(m.source_prefix_ranges, f.remote_ip)),
    (lambda m: bool(m.source_ports),
     lambda m, f: 0 if f.remote_port in m.source_ports else -1),
)


class ChainSelector(Generic[T]):
    """The chains of one listener (any per-chain runtime object ``T`` with its match)."""

    __slots__ = ("chains", "default", "needs_server_name")

    def __init__(self, chains: Sequence[tuple[FilterChainMatch, T]], default: T | None = None):
        self.chains = tuple(chains)
        self.default = default
        self.needs_server_name = any(m.server_names for m, _ in self.chains)

    def select(self, facts: ConnectionFacts) -> T | None:
        candidates = self.chains
        if len(candidates) == 1 and candidates[0][0] == _ANY:
            return candidates[0][1]
        for has, rank in CRITERIA:
            specific: list[tuple[FilterChainMatch, T]] = []
            best = -1
            for c in candidates:
                if not has(c[0]):
                    continue
                r = rank(c[0], facts)
                if r > best:
                    best, specific = r, [c]
                elif r == best and r >= 0:
                    specific.append(c)
            if specific:
                candidates = tuple(specific)
            else:
                candidates = tuple(c for c in candidates if not has(c[0]))
            if not candidates:
                return self.default
        return candidates[0][1]


_ANY = FilterChainMatch()
