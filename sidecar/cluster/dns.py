"""DNS through c-ares (aiodns): the record TTLs (``respect_dns_ttl``) and resolvers given in the
config (``typed_dns_resolver_config``), which the system resolver (``getaddrinfo``) offers
neither of. Envoy resolves with c-ares too."""

from __future__ import annotations

import socket

import aiodns
import pycares


class DnsResolver:
    """Resolves names to (family, address) pairs with the smallest TTL of the records."""

    def __init__(self, servers: tuple[str, ...] = ()):
        self.servers = servers
        self._r = aiodns.DNSResolver(nameservers=list(servers)) if servers else aiodns.DNSResolver()

    async def resolve(self, host: str, family: str) -> tuple[list[tuple[int, str]], float]:
        """Addresses of ``host`` for ``dns_lookup_family`` and their TTL (seconds); raises
        OSError when the name does not resolve."""
        kinds = {"V4_ONLY": ("A",), "V6_ONLY": ("AAAA",)}.get(family, ("AAAA", "A"))
        found: list[tuple[int, str]] = []
        ttl: float | None = None
        errors = []
        for kind in kinds:
            try:
                result = await self._r.query_dns(host, kind)
            except aiodns.error.DNSError as e:
                errors.append(e)
                continue
            fam = socket.AF_INET6 if kind == "AAAA" else socket.AF_INET
            want = 28 if kind == "AAAA" else 1          # record types (a CNAME chain may come too)
            for rec in result.answer:
                data = rec.data
                if rec.type != want or not isinstance(data, (pycares.ARecordData,
                                                             pycares.AAAARecordData)):
                    continue
                found.append((fam, data.addr))
                ttl = rec.ttl if ttl is None else min(ttl, rec.ttl)
        if not found:
            raise OSError(f"{host}: {errors[0] if errors else 'no address'}")
        return found, float(ttl if ttl is not None else 0)
