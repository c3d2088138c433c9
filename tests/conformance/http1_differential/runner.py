"""Runs cases against proxies, lane by lane, and records an ``Observation`` per case and side.

Everything network-side (the recording upstreams and the clients) runs in one asyncio loop on
a background thread; the proxies are child processes. Each side has ``lanes`` listeners, each
with its own upstream; a lane runs one case at a time, so every upstream connection opened
while a case runs belongs to that case.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .cases import Case
from .client import ClientResult, play
from .proxies import Proxy
from .upstream import RecordingUpstream, UpstreamConn

# When the client is gone (it aborted, or the case ended with its request unfinished) the
# proxy should close the upstream connection carrying that request at once: wait up to this
# long for that before recording the upstream side.
PARTIAL_SETTLE = 0.6
SETTLE = 0.05


@dataclass
class Observation:
    client: ClientResult
    upstream: list[UpstreamConn] = field(default_factory=list)


@dataclass
class Side:
    """A proxy under test: ``kind`` envoy|sidecar, its HCM/cluster overrides."""
    label: str
    kind: str
    hcm_overrides: dict | None = None
    cluster_overrides: dict | None = None


class Harness:
    def __init__(self, sides: list[Side], lanes: int = 16, workdir: Path | None = None,
                 log_level: str = "error"):
        self.sides = sides
        self.lanes = lanes
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="h1diff-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.log_level = log_level
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.upstreams: dict[str, list[RecordingUpstream]] = {}
        self.proxies: dict[str, Proxy] = {}
        self._taken_ports: set[int] = set()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start(self) -> Harness:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="h1diff", daemon=True)
        self._thread.start()

        async def make() -> None:
            for side in self.sides:
                self.upstreams[side.label] = [await RecordingUpstream().start()
                                              for _ in range(self.lanes)]
        self._call(make())
        try:
            for side in self.sides:
                self.proxies[side.label] = self._proxy(side, 0).start()
            for side in self.sides:
                self._ready(side)
        except BaseException:
            self.stop()
            raise
        return self

    def _proxy(self, side: Side, attempt: int) -> Proxy:
        return Proxy(side.kind, side.label, self.workdir / f"{side.label}-{attempt}",
                     [u.port for u in self.upstreams[side.label]], side.hcm_overrides,
                     side.cluster_overrides, self.log_level, self._taken_ports)

    def _ready(self, side: Side) -> None:
        """Wait for the proxy; if one of its (ephemeral, picked in advance) ports was taken by
        another process meanwhile, start it again on fresh ports."""
        for attempt in range(1, 4):
            proxy = self.proxies[side.label]
            try:
                proxy.wait_ready()
                return
            except (RuntimeError, TimeoutError):
                if "in use" not in proxy.log() or attempt == 3:
                    raise
                proxy.stop()
                self.proxies[side.label] = self._proxy(side, attempt).start()

    def run(self, cases: list[Case]) -> dict[str, dict[str, Observation]]:
        """case name -> side label -> observation."""
        return self._call(self._run(cases))

    async def _run(self, cases: list[Case]) -> dict[str, dict[str, Observation]]:
        out: dict[str, dict[str, Observation]] = {c.name: {} for c in cases}

        async def lane(side: Side, i: int, queue: asyncio.Queue) -> None:
            port = self.proxies[side.label].ports[i]
            up = self.upstreams[side.label][i]
            while not queue.empty():
                case = queue.get_nowait()
                up.begin(case.replies)
                result = await play(port, case)
                await asyncio.sleep(SETTLE)
                waited = SETTLE
                while up.holding(result.aborted) and waited < PARTIAL_SETTLE:
                    await asyncio.sleep(0.02)
                    waited += 0.02
                out[case.name][side.label] = Observation(result, await up.end())

        workers = []
        for side in self.sides:
            queue: asyncio.Queue = asyncio.Queue()
            for c in cases:
                queue.put_nowait(c)
            workers += [lane(side, i, queue) for i in range(self.lanes)]
        await asyncio.gather(*workers)
        return out

    def stop(self) -> None:
        for p in self.proxies.values():
            p.stop()
        if self.loop is not None:
            async def close() -> None:
                for ups in self.upstreams.values():
                    for u in ups:
                        u.close()
            self._call(close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Harness:  # noqa: PYI034 (start() returns self)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
