"""What every transport (REST poller, gRPC stream, file watcher) shares: the subscription set,
backoff with jitter, and the callbacks into the control-plane runtime."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from control_plane_client.resources import short
from sidecar.config.control_plane import SourceSpec


class Sink(Protocol):
    """The runtime, as a transport sees it."""
    node: dict

    async def on_response(self, transport: "Transport", type_url: str, version: str,
                          resources: list, error: str | None = None) -> str | None:
        """Validate and apply; returns None (ACK) or the rejection message (NACK). ``error``:
        the response could not even be decoded (it is recorded as a rejection)."""

    def on_contact(self, transport: "Transport", type_url: str) -> None:
        """The source answered (e.g. 304 Not Modified, or a stream was established)."""

    def on_failure(self, transport: "Transport", type_url: str | None, error: str) -> None:
        """The source could not be reached or answered with an error."""


class Transport:
    kind = "?"

    def __init__(self, spec: SourceSpec, sink: Sink, *, backoff: tuple[float, float]):
        self.spec = spec
        self.key = spec.key
        self.sink = sink
        self.backoff_cfg = backoff
        # type_url -> None (wildcard, state of the world) or the set of names wanted
        self.subscriptions: dict[str, frozenset | None] = {}
        self.versions: dict[str, str] = {}        # last accepted version_info per type
        self.rejected: dict[str, str] = {}        # last rejected version_info per type
        self.last_error = ""
        self.last_error_at = 0.0
        self.last_ok_at = 0.0
        self.connected = False
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    @property
    def name(self) -> str:
        return ":".join(str(x) for x in self.key)

    def subscribe(self, type_url: str, names: frozenset | None) -> None:
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
        self.sink.on_failure(self, type_url, error)

    def dump(self) -> dict:
        return {
            "source": self.name, "kind": self.kind, "connected": self.connected,
            "subscriptions": {short(t): (None if n is None else sorted(n))
                              for t, n in self.subscriptions.items()},
            "versions": {short(t): v for t, v in self.versions.items()},
            "last_error": self.last_error or None,
            "last_error_at": self.last_error_at or None,
            "last_ok_at": self.last_ok_at or None,
        }
