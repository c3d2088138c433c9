"""The case model shared by the corpora and the runner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pause:
    """Client or upstream step: wait this long before the next step."""
    seconds: float


@dataclass(frozen=True)
class AwaitResponse:
    """Client step: wait until ``count`` final responses arrived in all (or the connection
    closed, or nothing came for a while), then go on."""
    count: int = 1


@dataclass(frozen=True)
class Abort:
    """Client step: close the connection now (``reset``: with an RST instead of a FIN)."""
    reset: bool = False


ClientStep = bytes | Pause | AwaitResponse | Abort


@dataclass(frozen=True)
class Reply:
    """The upstream's answer to one complete request: raw bytes (a float is a pause), then
    ``keep`` the connection, ``close`` it (FIN) or ``reset`` it (RST)."""
    parts: tuple[bytes | float, ...]
    then: str = "keep"


def ok_reply(k: int, method: str = "GET") -> Reply:
    """The default answer to the k-th request of a case (0-based); no body bytes for HEAD."""
    body = b"upstream reply %d" % k
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(body)
    return Reply((head if method == "HEAD" else head + body,))


@dataclass(frozen=True)
class Case:
    """One exchange, run identically against Envoy and the sidecar.

    ``steps``: what the client does on one connection (bytes, pauses, waits, abort).
    ``replies``: the upstream's scripted answers to the 1st, 2nd... complete request it
    receives during the case (over all its connections); later ones get ``ok_reply``.
    ``source``: where the case comes from (RFC section, paper, mutation rule).
    ``methods``: the request methods in order when they cannot be read from the bytes (HEAD).
    """
    name: str
    source: str
    steps: tuple[ClientStep, ...]
    kind: str = "request"           # "request" (client bytes vary) or "response" (upstream bytes vary)
    replies: tuple[Reply, ...] = ()
    methods: tuple[str, ...] = ()

    @property
    def sent(self) -> bytes:
        return b"".join(s for s in self.steps if isinstance(s, bytes))

    @property
    def aborts(self) -> bool:
        return any(isinstance(s, Abort) for s in self.steps)


def request_case(name: str, source: str, *steps: ClientStep, **kw) -> Case:
    return Case(name, source, tuple(steps), "request", **kw)


def response_case(name: str, source: str, *replies: Reply, request: bytes = b"",
                  follow_up: bool = True, method: str = "GET", pause: float = 0.0, **kw) -> Case:
    """An upstream-response case: a simple request, the scripted reply, then (``follow_up``)
    a second request on the same client connection, which shows whether anything of the first
    response leaked into the next exchange (response desync) or the connection was dropped."""
    req = request or (b"%s /r HTTP/1.1\r\nHost: resp.test\r\n\r\n" % method.encode())
    steps: list[ClientStep] = [req]
    methods = [method]
    if follow_up:
        steps.append(AwaitResponse(1))
        if pause:
            steps.append(Pause(pause))
        steps.append(b"GET /follow-up HTTP/1.1\r\nHost: resp.test\r\n\r\n")
        methods.append("GET")
    return Case(name, source, tuple(steps), "response", tuple(replies), tuple(methods), **kw)
