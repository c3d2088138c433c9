"""Upstream failures, each with Envoy's response flag.

``sent`` says whether any byte of the request could have been processed by the upstream: a
failure with ``sent=False`` (connect failure, a pooled connection closed before any response
byte) is safe to retry anywhere, whatever the method.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """A failure talking to the upstream. ``flag`` is Envoy's response flag."""

    def __init__(self, flag: str, reason: str, sent: bool = True):
        super().__init__(reason)
        self.flag = flag
        self.reason = reason
        self.sent = sent


class ConnectFailure(UpstreamError):
    def __init__(self, reason: str):
        super().__init__("UF", reason, sent=False)


class UpstreamReset(UpstreamError):
    """The connection or stream was reset (``UC`` connection termination, ``UR`` reset)."""


class UpstreamTimeout(UpstreamError):
    def __init__(self, reason: str = "upstream request timeout"):
        super().__init__("UT", reason)


class PendingTimeout(UpstreamTimeout):
    """The deadline passed while waiting for a connection slot: no host was tried."""


class UpstreamProtocolError(UpstreamError):
    def __init__(self, reason: str):
        super().__init__("UPE", reason)


class NoHealthyUpstream(UpstreamError):
    def __init__(self) -> None:
        super().__init__("UH", "no healthy upstream", sent=False)


class Overflow(UpstreamError):
    """A circuit breaker refused the request (503 UO, ``x-envoy-overloaded: true``)."""

    def __init__(self, what: str):
        super().__init__("UO", f"overflow: {what}", sent=False)


class NoCluster(UpstreamError):
    """The route's cluster is not (or no longer) configured: 503 NC."""

    def __init__(self, name: str):
        super().__init__("NC", f"cluster not found: {name}", sent=False)


class RouteTimeout(UpstreamTimeout):
    """The route timeout (not a per-try timeout) ended the request."""
