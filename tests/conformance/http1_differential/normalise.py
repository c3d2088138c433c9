"""Turns an observation into an ``Outcome`` that two proxies can be compared on.

What legitimately differs is masked: ``date``, ``server``, the value of
``x-envoy-upstream-service-time`` (a timing; its presence says the response came from the
upstream), generated ``x-request-id`` values, header order between different names, the
text and length of a local reply's body (each proxy words its errors its own way; the status
is what counts), FIN versus RST when a proxy closes, the spelling of a Content-Length value
(``005`` and ``5`` frame the same body), and upstream connections that carried no byte
(Envoy connects as soon as a request's headers are complete; when the body then turns out to
be malformed it resets the stream before writing anything, while the sidecar, reading the whole
request at once, never connects: nothing reached the upstream either way). Everything else is
compared: the
final statuses and 1xx seen by the client, the proxied responses' headers and bodies, when
the client connection closed, and for every upstream connection the requests that reached it
(request line, headers, body and its framing), any bytes that did not frame as a request, and
whether the proxy closed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .cases import Case
from .runner import Observation
from .wire import Message, parse_requests, parse_responses, request_methods

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_RESPONSE_DROP = frozenset({"date", "server", "x-request-id"})
_LOCAL_DROP = frozenset({"content-length", "content-type"})


@dataclass(frozen=True)
class Outcome:
    statuses: tuple[int, ...]                 # final responses, in order
    interim: tuple[int, ...]                  # 1xx the client saw
    responses: tuple[tuple, ...]              # (status, origin, headers, framing, body, complete)
    client_leftover: bytes                    # bytes after the last parseable response
    connection: str                           # "open", "closed after N", "client aborted"
    upstream_conns: int                       # connections that carried at least one byte
    upstream_requests: tuple[tuple, ...]      # per connection: normalised requests
    upstream_leftover: tuple[bytes, ...]      # per connection: bytes that framed no request
    upstream_closed: tuple[bool, ...]         # per connection: the proxy closed it

    ASPECTS = ("statuses", "interim", "connection", "upstream_conns", "upstream_requests",
               "upstream_leftover", "upstream_closed", "responses", "client_leftover")


def _value(name: str, value: str) -> str:
    if name == "x-request-id" and _UUID.match(value):
        return "<uuid>"
    if name == "content-length" and value.isdigit():
        return str(int(value))
    return value


def _request(m: Message) -> tuple:
    headers = tuple(sorted(((k, _value(k, v)) for k, v in m.headers), key=lambda kv: kv[0]))
    return (m.start_line, headers, m.framing, m.body, tuple(m.trailers))


def _response(m: Message) -> tuple:
    proxied = any(k == "x-envoy-upstream-service-time" for k, _ in m.headers)
    drop = _RESPONSE_DROP | ({"x-envoy-upstream-service-time"} if proxied else _LOCAL_DROP)
    headers = tuple(sorted(((k, _value(k, v)) for k, v in m.headers if k not in drop),
                           key=lambda kv: kv[0]))
    if proxied:
        return (m.status, "upstream", headers, m.framing, m.body, m.complete)
    return (m.status, "local", headers, "-", b"<local reply body>", m.complete)


def outcome(case: Case, obs: Observation) -> Outcome:
    c = obs.client
    methods = list(case.methods) or request_methods(case.sent) or ["GET"]
    msgs, interim, leftover = parse_responses(c.received, methods, eof=bool(c.closed))
    if c.aborted:
        connection = "client aborted"
    elif c.closed:
        connection = f"closed after {c.closed_after}"
    else:
        connection = "open"
    reqs, lefts, closed = [], [], []
    for conn in obs.upstream:
        if not conn.data:
            continue
        rs, rest = parse_requests(conn.data, eof=True)
        reqs.append(tuple(_request(r) for r in rs))
        lefts.append(rest)
        closed.append(conn.closed_by_proxy)
    return Outcome(
        statuses=tuple(m.status for m in msgs),
        interim=tuple(interim),
        responses=tuple(_response(m) for m in msgs),
        client_leftover=leftover,
        connection=connection,
        upstream_conns=len(reqs),
        upstream_requests=tuple(reqs),
        upstream_leftover=tuple(lefts),
        upstream_closed=tuple(closed),
    )


def differences(envoy: Outcome, sidecar: Outcome) -> list[str]:
    """The aspects in which the two outcomes differ (empty: the same)."""
    return [a for a in Outcome.ASPECTS if getattr(envoy, a) != getattr(sidecar, a)]


def summary(o: Outcome) -> str:
    """One line for tables: ``statuses | client connection | upstream: [requests per upstream
    connection]``; ``1xx+`` prefixes interim responses, ``(closed)`` marks an upstream connection
    the proxy closed, ``+NB unframed`` bytes that reached it without framing as a request, and
    ``upstream: -`` means nothing reached the upstream."""
    st = ",".join(str(s) for s in o.statuses) or "no response"
    if o.interim:
        st = "+".join(str(s) for s in o.interim) + "+" + st
    up = []
    for reqs, left, closed in zip(o.upstream_requests, o.upstream_leftover, o.upstream_closed, strict=False):
        lines = [r[0].split(" ")[0] + " " + r[0].split(" ")[1][:24] if " " in r[0] else r[0][:24]
                 for r in reqs]
        d = "[" + "; ".join(lines) + (f" +{len(left)}B unframed" if left else "") + "]"
        up.append(d + (" (closed)" if closed else ""))
    return f"{st} | {o.connection} | upstream: {' '.join(up) or '-'}"


def forwarded_only_what_envoy_forwarded(envoy: Outcome, sidecar: Outcome) -> bool:
    """Every request the sidecar let through to the upstream, Envoy let through too (a
    response case's follow-up request is the client's own and is not counted)."""
    e_up = [r for conn in envoy.upstream_requests for r in conn if "/follow-up" not in r[0]]
    s_up = [r for conn in sidecar.upstream_requests for r in conn if "/follow-up" not in r[0]]
    return len(s_up) <= len(e_up) and all(r in e_up for r in s_up) and not any(
        sidecar.upstream_leftover)


def verdict(envoy: Outcome, sidecar: Outcome) -> str:
    """same / stricter / DIVERGENT, by rule. ``stricter``: at the first response where they
    part, the sidecar refused (4xx/5xx, or closed without answering) where Envoy did not, and
    every request the sidecar forwarded, Envoy forwarded too. The documented judgement
    (``expected.py``, docs/http1-differential.md) is made case by case on top of this."""
    if not differences(envoy, sidecar):
        return "same"
    if not forwarded_only_what_envoy_forwarded(envoy, sidecar):
        return "DIVERGENT"
    s_up = [r for conn in sidecar.upstream_requests for r in conn if "/follow-up" not in r[0]]
    for i, e in enumerate(envoy.responses):
        s = sidecar.responses[i] if i < len(sidecar.responses) else None
        if s == e:
            continue
        if s is None:
            # no answer at all is "stricter" only when the sidecar did not forward this request
            forwarded = sum(1 for r in envoy.responses[:i + 1] if r[1] == "upstream")
            return ("stricter" if sidecar.connection.startswith("closed") and len(s_up) < forwarded
                    else "DIVERGENT")
        return "stricter" if s[0] >= 400 and s[1] == "local" and (e[0] < 400 or e[1] != "local") \
            else "DIVERGENT"
    return "DIVERGENT"
