"""External authorization: Envoy's ``envoy.filters.http.ext_authz``.

Every request (unless the route disables the filter) is first put to an authorization
service; its answer lets the request through (possibly with headers set, appended or removed,
query parameters changed, dynamic metadata under ``envoy.filters.http.ext_authz``, and headers
for the client's response), or denies it (the service's status, headers and body go to the
client; flag ``UAEX``). When the service cannot be asked (connect failure, timeout, breaker
overflow, gRPC error) the request is denied with ``status_on_error`` (403), or let through
with ``failure_mode_allow`` (and ``x-envoy-auth-failure-mode-allowed: true`` upstream with
``failure_mode_allow_header_add``).

* ``http_service``: the request's method and path (after ``path_prefix``, or
  ``path_override``) to ``server_uri.cluster`` through that cluster's ``Cluster.send`` (its
  balancing, breakers, TLS), with ``Host``, ``Authorization``, the headers that match
  ``allowed_headers`` (minus ``disallowed_headers``) and ``headers_to_add``. A 200 allows; any
  other status denies with that status. ``allowed_upstream_headers`` (set),
  ``allowed_upstream_headers_to_append``, ``x-envoy-auth-headers-to-remove``,
  ``allowed_client_headers`` (on denial; all but framing headers by default),
  ``allowed_client_headers_on_success`` and ``dynamic_metadata_from_headers`` pick what is
  copied from the service's answer.
* ``grpc_service``: ``envoy.service.auth.v3.Authorization/Check`` through ``envoy_grpc``'s
  cluster (``cluster_name``, which must speak HTTP/2: its balancer, breakers, health, TLS and
  counters apply; a cluster not configured makes every call an error, as in Envoy) or over
  ``google_grpc`` (a direct channel to ``target_uri``, as Envoy's Google gRPC client); ``timeout``
  (200 ms) bounds each call and is sent as ``grpc-timeout``. ``CheckRequest`` carries the source and
  destination addresses, the peer's verified identity as ``principal``, the request's
  id, method, path, host, scheme, protocol, headers (or ``header_map`` with
  ``encode_raw_headers``), body, ``context_extensions`` (per route) and
  ``metadata_context`` (``metadata_context_namespaces``).
* ``with_request_body``: the body (up to ``max_request_bytes``; more is 413 unless
  ``allow_partial_message``) goes to the service; per route ``disable_request_body_buffering``.
* ``filter_enabled`` (its ``default_value``), ``deny_at_disable``, ``status_on_error``,
  ``max_denied_response_body_bytes``, ``enable_dynamic_metadata_ingestion``.
* Per route ``ExtAuthzPerRoute``: ``disabled``, or ``check_settings`` (context extensions,
  body settings, another ``http_service`` / ``grpc_service``).

Metrics: ``sidecar_ext_authz_total{outcome}`` (``ok``, ``denied``, ``error``,
``failure_mode_allowed``, ``disabled``).
"""

from __future__ import annotations

import random
from urllib.parse import parse_qsl, urlencode

from multidict import MultiDict

from filters.ext_authz.check import (
    Decision,
    GrpcAuthorizer,
    GrpcChannels,
    HttpAuthorizer,
    Outcome,
    RequestFacts,
)
from filters.ext_authz.config import (
    PER_ROUTE_TYPE_URL,
    TYPE_URL,
    BodySettings,
    ExtAuthzConfig,
    ExtAuthzPerRoute,
    from_envoy,
    per_route_from_envoy,
)
from sidecar import sdk
from sidecar.sdk import ConfigError

NAMESPACE = "envoy.filters.http.ext_authz"
FLAG = "UAEX"


class ExtAuthzState:
    __slots__ = ("channels", "ok", "denied", "error", "allowed_on_failure", "disabled")

    def __init__(self, env: sdk.FilterEnv):
        self.channels = GrpcChannels()
        c = sdk.counter(env.metrics, "sidecar_ext_authz_total",
                        "External authorization checks by outcome", ("outcome",))
        self.ok = c.labels("ok")
        self.denied = c.labels("denied")
        self.error = c.labels("error")
        self.allowed_on_failure = c.labels("failure_mode_allowed")
        self.disabled = c.labels("disabled")


class ExtAuthzFilter(sdk.Filter):
    __slots__ = ("cfg", "authorizer", "body", "extensions", "state")

    def __init__(self, cfg: ExtAuthzConfig, authorizer: HttpAuthorizer | GrpcAuthorizer,
                 body: BodySettings | None, extensions: tuple[tuple[str, str], ...],
                 state: ExtAuthzState):
        self.cfg = cfg
        self.authorizer = authorizer
        self.body = body
        self.extensions = extensions
        self.state = state

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        cfg = self.cfg
        state = self.state
        if cfg.enabled < 1.0 and random.random() >= cfg.enabled:
            state.disabled.inc()
            if cfg.deny_at_disable:
                return self._error_reply(req)
            return await next(req)
        body = None
        settings = self.body
        if settings is not None:
            try:
                body = await req.read_body(settings.max_bytes) if settings.allow_partial is False \
                    else await _read_prefix(req, settings.max_bytes)
            except sdk.BodyTooLarge:
                return sdk.local_reply(req.ctx, 413, "Payload Too Large",
                                       details="request_payload_too_large")
        facts = RequestFacts(body, settings is not None and settings.pack_as_bytes,
                             self.extensions, cfg.metadata_context_namespaces)
        d = await self.authorizer.check(req, facts)
        if d.outcome is Outcome.OK:
            state.ok.inc()
            self._allow(req, d)
            resp = await next(req)
            for k, v in d.client_on_success:
                resp.headers.add(k, v)
            return resp
        if d.outcome is Outcome.DENIED:
            state.denied.inc()
            if d.metadata and cfg.ingest_metadata:
                sdk.metadata(req, NAMESPACE).update(d.metadata)
            return self._denied(req, d)
        state.error.inc()
        if cfg.failure_mode_allow:
            state.allowed_on_failure.inc()
            if cfg.failure_mode_allow_header_add:
                req.headers["x-envoy-auth-failure-mode-allowed"] = "true"
            return await next(req)
        return self._error_reply(req)

    def _allow(self, req: sdk.Request, d: Decision) -> None:
        h = req.headers
        for k in d.upstream_remove:
            if not k.startswith(":") and k != "host":
                h.popall(k, None)
        for k, v in d.upstream_set:
            h[k] = v
        for k, v in d.upstream_append:
            h.add(k, v)                     # another line of the header, as Envoy does
        if d.query_set or d.query_remove:
            params = [(k, v) for k, v in parse_qsl(req.query, keep_blank_values=True)
                      if k not in d.query_remove and k not in dict(d.query_set)]
            params.extend(d.query_set)
            req.query = urlencode(params)
        if d.metadata and self.cfg.ingest_metadata:
            sdk.metadata(req, NAMESPACE).update(d.metadata)

    def _denied(self, req: sdk.Request, d: Decision) -> sdk.Response:
        ctx = req.ctx
        ctx.flag(FLAG)
        ctx.response_code_details = "ext_authz_denied"
        h: sdk.Headers = MultiDict()
        for k, v in d.client_headers:
            h[k] = v
        body = d.body
        limit = self.cfg.max_denied_body
        if limit and len(body) > limit:
            body = body[:limit]
        if body and "content-type" not in h:
            h["content-type"] = "text/plain"
        resp = sdk.Response(d.status, h, body)
        resp.local = True
        return resp

    def _error_reply(self, req: sdk.Request) -> sdk.Response:
        resp = sdk.local_reply(req.ctx, self.cfg.status_on_error, "", FLAG,
                               details="ext_authz_error")
        resp.headers.popall("content-type", None)
        return resp


async def _read_prefix(req: sdk.Request, limit: int) -> bytes:
    """``allow_partial_message``: the first ``limit`` bytes go to the service; the body goes on
    upstream whole, the part read here first and then the rest as it streams."""
    body = req.body
    if isinstance(body, bytes):
        return body[:limit]
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await body.read()
        if not chunk:
            if body.trailers is not None:
                req.trailers = body.trailers
            req.body = b"".join(parts)
            return req.body[:limit]
        parts.append(chunk)
        size += len(chunk)
    req.body = sdk.PrefixedStream(parts, body)
    return b"".join(parts)[:limit]


def new_state(env: sdk.FilterEnv) -> ExtAuthzState:
    return ExtAuthzState(env)


def close_state(state: ExtAuthzState) -> None:
    state.channels.close()


def build(cfg: ExtAuthzConfig, per_route: ExtAuthzPerRoute | None, state: ExtAuthzState,
          env: sdk.FilterEnv, route: sdk.RouteInfo) -> ExtAuthzFilter:
    http = cfg.http
    grpc = cfg.grpc
    body = cfg.with_request_body
    extensions: tuple[tuple[str, str], ...] = ()
    if per_route is not None:
        if per_route.http is not None or per_route.grpc is not None:
            http, grpc = per_route.http, per_route.grpc
        if per_route.disable_request_body_buffering:
            body = None
        elif per_route.with_request_body is not None:
            body = per_route.with_request_body
        extensions = per_route.context_extensions
    authorizer: HttpAuthorizer | GrpcAuthorizer
    if http is not None:
        try:
            client = env.upstream(http.cluster)
        except KeyError:
            raise ConfigError("ext_authz.http_service.server_uri.cluster",
                              f"no cluster named {http.cluster!r}") from None
        authorizer = HttpAuthorizer(http, client, cfg.allowed_headers, cfg.disallowed_headers)
    else:
        assert grpc is not None
        path = "ext_authz.grpc_service"
        if grpc.envoy is not None:
            try:
                grpc_client = env.grpc_client(grpc.envoy)
            except ValueError as e:
                raise ConfigError(f"{path}.envoy_grpc.cluster_name", str(e)) from None
            authorizer = GrpcAuthorizer(grpc, path, cfg.encode_raw_headers, client=grpc_client)
        else:
            authorizer = GrpcAuthorizer(grpc, path, cfg.encode_raw_headers,
                                        channels=state.channels)
    return ExtAuthzFilter(cfg, authorizer, body, extensions, state)


def from_native(d: object, path: str) -> ExtAuthzConfig:
    """Native YAML takes Envoy's ``ExtAuthz`` fields as they are."""
    return from_envoy(d, path)


def per_route_from_native(d: object, path: str) -> ExtAuthzPerRoute | None:
    return per_route_from_envoy(d, path)


SPEC = sdk.FilterSpec(
    name="envoy.filters.http.ext_authz",
    short="ext_authz",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
    close_state=close_state,
)
