"""Per-connection correlation tracking: which request each response answers.

A Kafka response carries only its correlation id; its api key and version (needed to decode
it) are those of the request with that id. Kafka answers the requests of one connection in
the order it received them (some clients, e.g. aiokafka, rely on it), and a Produce with
acks=0 gets no answer at all (so it is never tracked).

The tracker keeps requests in arrival order. Some are answered by the proxy itself (a request
denied by policy): their response is held until every earlier request has been answered, so
the client still sees responses in request order. When the broker answers a request, the
forwarded requests before it can no longer be answered (Kafka answers in order) and are
dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

C = TypeVar("C")

DEFAULT_MAX_IN_FLIGHT = 10_000


@dataclass(slots=True)
class InFlight(Generic[C]):
    correlation_id: int
    api_key: int
    api_version: int
    started_ns: int
    # what the processor needs again when the response comes (e.g. denied topics to merge)
    context: C | None = None
    # the whole response frame when the proxy answers this request itself
    local_response: bytes | None = None
    seq: int = 0   # arrival order on the connection, set by the tracker


@dataclass(slots=True)
class Match(Generic[C]):
    """The outcome of a broker response: its request (None if not tracked), the locally
    answered responses that must reach the client before it, and how many forwarded
    requests were dropped as never to be answered."""

    request: InFlight[C] | None
    send_before: list[bytes] = field(default_factory=list)
    dropped: int = 0


class CorrelationTracker(Generic[C]):
    __slots__ = ("_queue", "_seq", "max_in_flight")

    def __init__(self, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.max_in_flight = max_in_flight
        self._queue: OrderedDict[int, InFlight[C]] = OrderedDict()
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue)

    def track(self, request: InFlight[C]) -> bool:
        """Remember a request; False (not tracked) when full or its id is already in flight."""
        if len(self._queue) >= self.max_in_flight or request.correlation_id in self._queue:
            return False
        self._seq += 1
        request.seq = self._seq
        self._queue[request.correlation_id] = request
        return True

    def match(self, correlation_id: int) -> Match[C]:
        """Pop the request a broker response answers (see the module docstring)."""
        request = self._queue.pop(correlation_id, None)
        result: Match[C] = Match(request)
        if request is None:
            return result
        # everything still queued before it arrived earlier (OrderedDict keeps arrival order)
        while self._queue:
            cid, head = next(iter(self._queue.items()))
            if head.seq < request.seq:
                del self._queue[cid]
                if head.local_response is not None:
                    result.send_before.append(head.local_response)
                else:
                    result.dropped += 1
            else:
                break
        return result

    def take_ready(self) -> list[bytes]:
        """Locally answered responses now at the head of the queue, in order."""
        out: list[bytes] = []
        while self._queue:
            cid, head = next(iter(self._queue.items()))
            if head.local_response is None:
                break
            del self._queue[cid]
            out.append(head.local_response)
        return out

    def clear(self) -> int:
        """Forget everything (connection closed); returns how many requests were pending."""
        n = len(self._queue)
        self._queue.clear()
        return n

