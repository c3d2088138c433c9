"""Request buffering: Envoy's ``envoy.filters.http.buffer``.

The whole request body is read before the request goes on, so the upstream never sees a slow
or partial upload; a body over ``max_request_bytes`` is answered 413 ``Payload Too Large``
(a ``content-length`` over the limit at once, without reading). The buffered request is sent
with a ``content-length`` (a chunked upload is re-framed), as Envoy does.

Envoy: ``Buffer {max_request_bytes}``; per route ``BufferPerRoute {disabled | buffer}``.
Native::

    filters:
      - buffer: {max_request_bytes: 1048576}
    routes:
      - match: {prefix: /upload}
        filters: {buffer: disabled}                 # or {max_request_bytes: 10485760}

Metrics: ``sidecar_buffer_rq_too_large_total``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar import sdk
from sidecar.sdk import ConfigError, wire

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute"
MAX_LIMIT = 4 * 1024 * 1024 * 1024 - 1       # uint32, as in Envoy's proto


@dataclass(frozen=True, slots=True)
class BufferConfig:
    max_request_bytes: int


def _config(d: object, path: str) -> BufferConfig:
    m = wire.check_keys(d, ("max_request_bytes",), path)
    return BufferConfig(wire.integer(m, "max_request_bytes", path, lo=1, hi=MAX_LIMIT))


def from_envoy(d: object, path: str) -> BufferConfig:
    return _config(d, path)


def from_native(d: object, path: str) -> BufferConfig:
    return _config(d, path)


def per_route_from_envoy(d: object, path: str) -> BufferConfig | None:
    """``BufferPerRoute``: ``disabled: true`` or ``buffer: {...}`` (None means disabled)."""
    m = wire.check_keys(d, ("disabled", "buffer"), path)
    kind = wire.one_of(m, ("disabled", "buffer"), path)
    if kind == "disabled":
        if not wire.boolean(m, "disabled", path):
            raise ConfigError(wire.join(path, "disabled"), "must be true (or set buffer)")
        return None
    return _config(m["buffer"], wire.join(path, "buffer"))


class BufferState:
    __slots__ = ("too_large",)

    def __init__(self, env: sdk.FilterEnv):
        self.too_large = sdk.counter(env.metrics, "sidecar_buffer_rq_too_large_total",
                                     "Requests answered 413 by the buffer filter")


class BufferFilter(sdk.Filter):
    __slots__ = ("limit", "too_large")

    def __init__(self, limit: int, state: BufferState):
        self.limit = limit
        self.too_large = state.too_large

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        body = req.body
        if isinstance(body, bytes):
            if len(body) > self.limit:
                return self._too_large(req)
            req.chunked = False      # sent on with a content-length, as Envoy does
            return await next(req)
        length = req.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large(req)
        try:
            await req.read_body(self.limit)
        except sdk.BodyTooLarge:
            return self._too_large(req)
        req.chunked = False          # sent on with a content-length
        return await next(req)

    def _too_large(self, req: sdk.Request) -> sdk.Response:
        self.too_large.inc()
        return sdk.local_reply(req.ctx, 413, "Payload Too Large",
                               details="request_payload_too_large")


def new_state(env: sdk.FilterEnv) -> BufferState:
    return BufferState(env)


def build(config: BufferConfig, per_route: BufferConfig | None, state: BufferState,
          env: sdk.FilterEnv, route: sdk.RouteInfo) -> BufferFilter:
    return BufferFilter((per_route or config).max_request_bytes, state)


SPEC = sdk.FilterSpec(
    name="envoy.filters.http.buffer",
    short="buffer",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=from_native,
)
