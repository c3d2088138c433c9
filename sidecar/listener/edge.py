"""Edge policy, applied to every request before routing: who the client is (XFF, trusted
peers), which ``x-envoy-*`` headers an external client may not set, the request id, and the
Host port stripping Envoy does (``strip_*_host_port``)."""

from __future__ import annotations

import ipaddress
import os
import random
from typing import Final

from sidecar.config.listener import Listener
from sidecar.core.message import Request

# x-envoy-* request headers that only a trusted (internal) peer may set; Envoy strips them from
# external requests on an edge listener.
EDGE_UNTRUSTED = ("x-envoy-decorator-operation", "x-envoy-downstream-service-cluster",
                  "x-envoy-downstream-service-node", "x-envoy-original-path", "x-envoy-internal",
                  "x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries",
                  "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
                  "x-envoy-expected-rq-timeout-ms", "x-envoy-hedge-on-per-try-timeout",
                  "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-ip-tags",
                  "x-envoy-force-trace", "x-envoy-external-address",
                  "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names",
                  "x-envoy-upstream-alt-stat-name")


_HEX_BYTE: Final = tuple(f"{i:02x}" for i in range(256))


class RequestIds:
    """Request ids shaped as version-4 UUIDs: a random per-process prefix (96 bits, drawn again
    in a forked worker) and a counter. Request ids need uniqueness, not unpredictability, and
    this costs one concatenation per request instead of a 128-bit draw: the counter's top six
    hex digits are formatted once per 256 ids, its low byte comes from a table."""

    __slots__ = ("prefix", "n", "head")

    def __init__(self) -> None:
        self.prefix = ""
        self.n = 0
        self.head = ""
        self.reseed()

    def reseed(self) -> None:
        h = "%024x" % ((random.getrandbits(96) & ~(0xF << 44) & ~(0xC << 28)) | (0x4 << 44) | (0x8 << 28))
        self.prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:24]}"
        self.start_at(random.getrandbits(32))

    def start_at(self, n: int) -> None:
        """Set the counter (the next id is ``n + 1``) and the head that goes with it."""
        self.n = n
        self.head = f"{self.prefix}{n >> 8:06x}"

    def next(self) -> str:
        n = (self.n + 1) & 0xFFFFFFFF
        if n & 0xFF == 0:
            self.start_at(n)       # the low byte wrapped: carry into the head
        else:
            self.n = n
        return self.head + _HEX_BYTE[n & 0xFF]


_IDS = RequestIds()
os.register_at_fork(after_in_child=_IDS.reseed)   # workers never share a prefix
new_request_id = _IDS.next


_PRIVATE_CACHE: dict[str, bool] = {}


def is_private(ip: str) -> bool:
    """Loopback or RFC 1918 / unique-local (Envoy's classic internal address set)."""
    v = _PRIVATE_CACHE.get(ip)
    if v is None:
        try:
            a = ipaddress.ip_address(ip)
            v = a.is_loopback or a.is_private
        except ValueError:
            v = False
        if len(_PRIVATE_CACHE) > 4096:
            _PRIVATE_CACHE.clear()
        _PRIVATE_CACHE[ip] = v
    return v


def apply_edge_policy(req: Request, cfg: Listener, bound_port: int) -> None:
    """Prepare a request's headers as Envoy's HTTP connection manager does."""
    ctx = req.ctx
    headers = req.headers
    scheme = "https" if ctx.tls else "http"
    external = False
    if cfg.use_remote_address:
        # an edge listener (Envoy's use_remote_address): the peer is the client
        peer = ctx.downstream_addr
        ip = peer[0] if peer else ""
        external = not (cfg.trust_private_peers and is_private(ip))
        if ip:
            xff = headers.get("x-forwarded-for")
            if xff and cfg.xff_num_trusted_hops:
                # the client is N hops back in XFF when N proxies in front are trusted
                hops = [h.strip() for h in xff.split(",")]
                if len(hops) >= cfg.xff_num_trusted_hops:
                    ctx.remote_ip = hops[-cfg.xff_num_trusted_hops]
            headers["x-forwarded-for"] = f"{xff},{ip}" if xff else ip
        headers["x-forwarded-proto"] = scheme
        if external:
            for name in EDGE_UNTRUSTED:
                if name in headers:
                    del headers[name]
            if ip:
                headers["x-envoy-external-address"] = ip
        else:
            headers["x-envoy-internal"] = "true"
    else:
        # not the edge: the client is the last X-Forwarded-For entry (before the trusted
        # hops), as in Envoy
        xff = headers.get("x-forwarded-for")
        if xff:
            hops = [h.strip() for h in xff.split(",")]
            if len(hops) > cfg.xff_num_trusted_hops:
                ctx.remote_ip = hops[-1 - cfg.xff_num_trusted_hops]
        if "x-envoy-internal" in headers:
            del headers["x-envoy-internal"]
        if "x-forwarded-proto" not in headers:
            headers["x-forwarded-proto"] = scheme
    if cfg.generate_request_id:
        rid = headers.get("x-request-id")
        if not rid or (external and not cfg.preserve_external_request_id):
            rid = new_request_id()
            headers["x-request-id"] = rid
        ctx.request_id = rid
    else:
        ctx.request_id = headers.get("x-request-id", "")
    strip = cfg.strip_host_port
    if strip != "none" and cfg.strip_host_header:
        host = req.authority
        if ":" in host and not host.endswith("]"):
            h, _, port = host.rpartition(":")
            if strip == "any" or port == str(bound_port):
                headers["host"] = h
