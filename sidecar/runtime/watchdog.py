"""The event-loop watchdog: finds code that blocks the loop, and names the filter it was in.

Everything on a worker shares one event loop, so a filter that blocks it (a synchronous HTTP
call, a CPU-heavy loop, ``time.sleep``) stalls every request on that worker. Two parts:

* on the loop, a heartbeat every ``interval`` records when it ran; when it runs late by more
  than ``threshold`` the stall is over and is reported: a log line (with the filter and the
  line it was stuck on) and ``sidecar_event_loop_blocked_total{filter}`` /
  ``sidecar_event_loop_blocked_seconds`` (histogram of stall durations);
* a daemon thread checks the heartbeat; while a stall is going on it samples the loop
  thread's stack once (``sys._current_frames``), which is the only moment the culprit can be
  seen, and names the innermost frame that belongs to a user filter's source file (``filter``
  is ``none`` when the proxy itself or a built-in was running).

The thread wakes ``1/interval`` times a second and takes the GIL only to read a timestamp.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from sidecar.core.metrics import NULL
from sidecar.observability.metrics import Metrics

log = logging.getLogger("sidecar.watchdog")

DEFAULT_THRESHOLD_S = 0.25
STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class LoopWatchdog:
    __slots__ = ("threshold", "interval", "files", "_blocked", "_seconds", "_last", "_culprit",
                 "_loop", "_handle", "_thread", "_stop", "_loop_thread", "stalls")

    def __init__(self, metrics: Metrics, files: Callable[[], dict[str, str]],
                 threshold_s: float = DEFAULT_THRESHOLD_S):
        self.threshold = threshold_s
        self.interval = min(0.05, threshold_s / 2)
        self.files = files       # user filter source file -> filter name (the current config)
        self._blocked = NULL if not metrics.enabled else metrics.counter(
            "sidecar_event_loop_blocked_total",
            "Times the event loop was blocked longer than the watchdog threshold, by the user "
            "filter that was running (none: not in a user filter)", ("filter",))
        self._seconds = NULL if not metrics.enabled else metrics.histogram(
            "sidecar_event_loop_blocked_seconds", "How long each detected loop stall lasted",
            buckets=STALL_BUCKETS)
        self._last = 0.0
        self._culprit: tuple[str, str] | None = None     # (filter, "file:line in func")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread = 0
        self.stalls: list[tuple[float, str, str]] = []    # recent (seconds, filter, where)

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        self._handle = loop.call_later(self.interval, self._beat)
        self._thread = threading.Thread(target=self._watch, name="sidecar-loop-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    # ---- on the loop ----------------------------------------------------------------------
    def _beat(self) -> None:
        now = time.monotonic()
        late = now - self._last - self.interval
        self._last = now
        if late > self.threshold:
            culprit = self._culprit
            self._culprit = None
            name, where = culprit if culprit is not None else ("none", "unknown")
            self._blocked.labels(name).inc()
            self._seconds.observe(late)
            self.stalls.append((late, name, where))
            del self.stalls[:-20]
            if name != "none":
                log.warning("event loop blocked for %.3f s by filter %s at %s: every request on "
                            "this worker waited (use async I/O, or run blocking work with "
                            "asyncio.to_thread)", late, name, where)
            else:
                log.warning("event loop blocked for %.3f s at %s", late, where)
        else:
            self._culprit = None      # a sample taken as a short stall ended
        assert self._loop is not None
        if not self._stop.is_set():
            self._handle = self._loop.call_later(self.interval, self._beat)

    # ---- on the watchdog thread -----------------------------------------------------------
    def _watch(self) -> None:
        sampled_for = 0.0
        while not self._stop.wait(self.interval):
            last = self._last
            if time.monotonic() - last > self.threshold and sampled_for != last:
                sampled_for = last          # one sample per stall
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None:
                    self._culprit = self._attribute(frame)

    def _attribute(self, frame: FrameType) -> tuple[str, str]:
        files = self.files()
        innermost = _where(frame)
        f: FrameType | None = frame
        while f is not None:
            name = files.get(f.f_code.co_filename)
            if name is not None:
                return name, _where(f)
            f = f.f_back
        return "none", innermost


def _where(f: FrameType) -> str:
    return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}"
