"""What every transport (REST poller, gRPC stream, file watcher) shares: the subscription set,
the versions it last accepted and rejected, and the callbacks into the client."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from control_plane_client.resources import short
from sidecar.config.control_plane import SourceSpec

Subscription = frozenset[str] | None
"""The names wanted for one type: None is a wildcard (state of the world: LDS, CDS)."""


class DiscoveryHandler(Protocol):
    """The client, as a transport sees it."""

    @property
    def node(self) -> dict[str, object]:
        """The Envoy ``Node`` sent with requests."""
        ...

    async def on_response(self, transport: Transport, type_url: str, version: str,
                          resources: list[object], error: str | None = None) -> str | None:
        """Validate and apply; returns None (ACK) or the rejection message (NACK). ``error``:
        the response could not even be decoded (it is recorded as a rejection)."""
        ...

    def on_contact(self, transport: Transport, type_url: str | None) -> None:
        """The source answered (e.g. 304 Not Modified, or a stream was established); None: for
        every type it serves."""
        ...

    def on_failure(self, transport: Transport, type_url: str | None, error: str) -> None:
        """The source could not be reached or answered with an error."""
        ...


class Transport:
    kind = "?"

    def __init__(self, spec: SourceSpec, handler: DiscoveryHandler, *,
                 backoff: tuple[float, float]):
        self.spec = spec
        self.key = spec.key
        self.handler = handler
        self.backoff_cfg = backoff
        # type_url -> None (wildcard, state of the world) or the set of names wanted
        self.subscriptions: dict[str, Subscription] = {}
        self.versions: dict[str, str] = {}        # last accepted version_info per type
        self.rejected: dict[str, str] = {}        # last rejected version_info per type
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_ok_at = 0.0
        self.connected = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def name(self) -> str:
        return ":".join(str(x) for x in self.key)

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(self, type_url: str, names: Subscription) -> None:
        raise NotImplementedError

    def start(self) -> None:
        pass

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()

    def failed(self, type_url: str | None, error: str) -> None:
        self.last_error = error
        self.last_error_at = time.time()
        self.handler.on_failure(self, type_url, error)

    def record(self, type_url: str, version: str, error: str | None) -> None:
        """Remember the outcome of a response: the version to ACK, or the one rejected."""
        if error is None:
            self.versions[type_url] = version
            self.rejected.pop(type_url, None)
        else:
            self.rejected[type_url] = version

    def dump(self) -> dict[str, object]:
        return {
            "source": self.name, "kind": self.kind, "connected": self.connected,
            "subscriptions": {short(t): (None if n is None else sorted(n))
                              for t, n in self.subscriptions.items()},
            "versions": {short(t): v for t, v in self.versions.items()},
            "last_error": self.last_error or None,
            "last_error_at": self.last_error_at or None,
            "last_ok_at": self.last_ok_at or None,
        }
