"""The ways of asking an authorization service: HTTP through a cluster, gRPC
(``envoy.service.auth.v3.Authorization/Check``) through a cluster (``envoy_grpc``) or to a
``google_grpc`` target.

Both answer a ``Decision``: ``OK`` (with header changes for the upstream request and the
client response, and dynamic metadata), ``DENIED`` (the response to send the client) or
``ERROR`` (the service could not be asked: ``failure_mode_allow`` decides).
"""

from __future__ import annotations

import datetime
import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from filters.ext_authz.config import GrpcServiceConfig, HttpServiceConfig
from sidecar import sdk
from sidecar.sdk import ConfigError, StringMatcher

MAX_AUTHZ_RESPONSE = 1024 * 1024
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# never copied from an authorization response to the client or the upstream request
_NOT_COPIED = frozenset(("host", "content-length", "transfer-encoding", "connection",
                         "keep-alive", "upgrade", "proxy-connection", "te", "trailer", "date",
                         "server"))
# always sent to an HTTP authorization service (Envoy: Host, Method, Path, Content-Length,
# Authorization; method and path are the request line)
_ALWAYS = frozenset(("host", "authorization", "content-length"))


class Outcome(Enum):
    OK = "ok"
    DENIED = "denied"
    ERROR = "error"


Pairs = list[tuple[str, str]]


@dataclass(slots=True)
class Decision:
    outcome: Outcome
    status: int = 403
    body: bytes = b""
    upstream_set: Pairs = field(default_factory=list)
    upstream_append: Pairs = field(default_factory=list)
    upstream_remove: list[str] = field(default_factory=list)
    client_headers: Pairs = field(default_factory=list)       # denial response headers
    client_on_success: Pairs = field(default_factory=list)    # added to the upstream's response
    query_set: Pairs = field(default_factory=list)
    query_remove: list[str] = field(default_factory=list)
    metadata: dict[str, sdk.JsonValue] | None = None
    reason: str = ""


ERROR = Decision(Outcome.ERROR)


def matches(matchers: tuple[StringMatcher, ...], name: str) -> bool:
    for m in matchers:
        if m.matches(name):
            return True
    return False


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What is sent to the authorization service about one request."""

    body: bytes | None               # None: not buffered
    pack_as_bytes: bool              # gRPC: the body as raw_body (bytes), not body (UTF-8)
    context_extensions: tuple[tuple[str, str], ...]
    metadata_namespaces: tuple[str, ...]


# =============================================================================================
# HTTP
# =============================================================================================

class HttpAuthorizer:
    __slots__ = ("cfg", "client", "allowed", "disallowed")

    def __init__(self, cfg: HttpServiceConfig, client: sdk.UpstreamClient,
                 allowed: tuple[StringMatcher, ...] | None,
                 disallowed: tuple[StringMatcher, ...]):
        self.cfg = cfg
        self.client = client
        self.allowed = allowed if allowed is not None else cfg.allowed_headers
        self.disallowed = disallowed

    def _request_headers(self, req: sdk.Request) -> Pairs:
        out: Pairs = []
        allowed = self.allowed
        for k, v in req.headers.items():
            if k == "content-length":
                continue                  # ours: the length of what we send
            if matches(self.disallowed, k):
                continue
            if k in _ALWAYS or (allowed is not None and matches(allowed, k)):
                out.append((k, v))
        out.extend(self.cfg.headers_to_add)
        return out

    async def check(self, req: sdk.Request, facts: RequestFacts) -> Decision:
        cfg = self.cfg
        path = cfg.path_override or cfg.path_prefix + req.url
        try:
            r = await sdk.http_call(self.client, req.method, path,
                                    headers=self._request_headers(req), body=facts.body or b"",
                                    authority=req.authority, timeout=cfg.timeout_s,
                                    max_response_bytes=MAX_AUTHZ_RESPONSE)
        except (sdk.UpstreamError, sdk.BodyTooLarge) as e:
            return Decision(Outcome.ERROR, reason=str(e))
        headers = r.headers
        if r.status != 200:
            allowed = cfg.allowed_client_headers
            return Decision(Outcome.DENIED, status=r.status, body=r.body, client_headers=[
                (k, v) for k, v in headers.items()
                if k not in _NOT_COPIED and (allowed is None or matches(allowed, k))])
        d = Decision(Outcome.OK)
        for k, v in headers.items():
            if k in _NOT_COPIED:
                continue
            if k == REMOVE_HEADER:
                d.upstream_remove.extend(x.strip().lower() for x in v.split(",") if x.strip())
                continue
            if matches(cfg.allowed_upstream_headers, k):
                d.upstream_set.append((k, v))
            if matches(cfg.allowed_upstream_headers_to_append, k):
                d.upstream_append.append((k, v))
            if matches(cfg.allowed_client_headers_on_success, k):
                d.client_on_success.append((k, v))
            if matches(cfg.dynamic_metadata_from_headers, k):
                if d.metadata is None:
                    d.metadata = {}
                d.metadata[k] = v
        return d


# =============================================================================================
# gRPC
# =============================================================================================

def _grpc_modules(path: str) -> tuple[object, object, object, object]:
    """envoy-data-plane's types and grpclib: optional dependencies, imported only when a
    gRPC authorization service is configured."""
    try:
        auth = importlib.import_module("envoy_data_plane.envoy.service.auth.v3")
        core = importlib.import_module("envoy_data_plane.envoy.config.core.v3")
        pb = importlib.import_module("envoy_data_plane.google.protobuf")
        client = importlib.import_module("grpclib.client")
    except ImportError:
        raise ConfigError(path, "a gRPC authorization service needs envoy-data-plane and "
                          "grpclib (pip install 'pysidecar[ads]')") from None
    return auth, core, pb, client


class GrpcChannels:
    """One grpclib channel per target, kept across reloads (closed with the filter state)."""

    def __init__(self) -> None:
        self.channels: dict[str, object] = {}

    def get(self, target: str, path: str) -> object:
        ch = self.channels.get(target)
        if ch is None:
            _, _, _, client = _grpc_modules(path)
            host, _, port = target.rpartition(":")
            ch = client.Channel(host.strip("[]"), int(port))  # type: ignore[attr-defined]
            self.channels[target] = ch
        return ch

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()  # type: ignore[attr-defined]
        self.channels.clear()


class GrpcCallFailed(Exception):
    """The service answered a status other than OK, or could not be reached."""


def _pairs_from_options(options: list[object], default_append: bool) -> tuple[Pairs, Pairs]:
    """HeaderValueOption list -> (set, append)."""
    set_: Pairs = []
    append: Pairs = []
    for o in options:
        h = o.header  # type: ignore[attr-defined]
        if h is None or not h.key:
            continue
        value = h.value or (h.raw_value.decode("latin-1") if h.raw_value else "")
        a = o.append  # type: ignore[attr-defined]
        action = getattr(o.append_action, "name", "APPEND_IF_EXISTS_OR_ADD")  # type: ignore[attr-defined]
        appending = a if a is not None else (default_append and action == "APPEND_IF_EXISTS_OR_ADD")
        (append if appending else set_).append((h.key.lower(), value))
    return set_, append


CHECK_METHOD = "envoy.service.auth.v3.Authorization/Check"


class GrpcAuthorizer:
    """``Authorization/Check`` through the service's cluster (``envoy_grpc``: ``client``) or
    on a direct grpclib channel (``google_grpc``: ``channels``)."""

    __slots__ = ("cfg", "auth", "core", "pb", "encode_raw", "stub", "client")

    def __init__(self, cfg: GrpcServiceConfig, path: str, encode_raw: bool, *,
                 channels: GrpcChannels | None = None, client: sdk.GrpcClient | None = None):
        self.cfg = cfg
        self.auth, self.core, self.pb, _ = _grpc_modules(path)
        self.client = client
        self.stub: Any = None
        if client is None:
            assert channels is not None
            self.stub = self.auth.AuthorizationAsyncStub(  # type: ignore[attr-defined]
                channels.get(cfg.target, path))
        self.encode_raw = encode_raw

    async def _call(self, msg: object) -> object:
        """The CheckResponse; raises on any failure (the caller's ERROR decision)."""
        client = self.client
        if client is None:
            return await self.stub.check(
                msg, timeout=self.cfg.timeout_s, metadata=list(self.cfg.initial_metadata) or None)
        reply = await client.unary(CHECK_METHOD, bytes(msg),  # type: ignore[call-overload]
                                   self.cfg.timeout_s)
        if not reply.ok:
            raise GrpcCallFailed(f"grpc-status {reply.status}: {reply.message}")
        return self.auth.CheckResponse.parse(reply.payload)  # type: ignore[attr-defined]

    def _check_request(self, req: sdk.Request, facts: RequestFacts) -> object:
        a, core, pb = self.auth, self.core, self.pb
        ctx = req.ctx
        src = ctx.downstream_addr
        headers: dict[str, str] = {}
        for k in req.headers:
            if k not in headers:
                headers[k] = sdk.joined_header(req.headers, k) or ""
        # pseudo-headers as Envoy sends them
        headers.update({":method": req.method, ":path": req.url, ":authority": req.authority,
                        ":scheme": req.scheme})
        http_kw: dict[str, object] = dict(
            id=ctx.request_id, method=req.method, path=req.url, host=req.authority,
            scheme=req.scheme, protocol=ctx.protocol,
            size=len(facts.body) if facts.body is not None else -1)
        if self.encode_raw:
            http_kw["header_map"] = core.HeaderMap(headers=[  # type: ignore[attr-defined]
                core.HeaderValue(key=k, raw_value=v.encode("latin-1"))  # type: ignore[attr-defined]
                for k, v in headers.items()])
        else:
            http_kw["headers"] = headers
        if facts.body is not None:
            if facts.pack_as_bytes:
                http_kw["raw_body"] = facts.body
            else:
                http_kw["body"] = facts.body.decode("utf-8", "replace")
        md = None
        if facts.metadata_namespaces:
            md = core.Metadata(filter_metadata={  # type: ignore[attr-defined]
                ns: pb.Struct.from_dict(ctx.metadata[ns])  # type: ignore[attr-defined]
                for ns in facts.metadata_namespaces if ns in ctx.metadata})
        return a.CheckRequest(attributes=a.AttributeContext(  # type: ignore[attr-defined]
            source=a.AttributeContextPeer(  # type: ignore[attr-defined]
                address=core.Address(socket_address=core.SocketAddress(  # type: ignore[attr-defined]
                    address=src[0], port_value=src[1])) if src else None,
                principal=ctx.peer_identity or ""),
            destination=a.AttributeContextPeer(  # type: ignore[attr-defined]
                address=core.Address(socket_address=core.SocketAddress(  # type: ignore[attr-defined]
                    address="127.0.0.1", port_value=ctx.local_port))),
            request=a.AttributeContextRequest(  # type: ignore[attr-defined]
                time=datetime.datetime.now(datetime.UTC),
                http=a.AttributeContextHttpRequest(**http_kw)),  # type: ignore[attr-defined]
            context_extensions=dict(facts.context_extensions),
            metadata_context=md))

    async def check(self, req: sdk.Request, facts: RequestFacts) -> Decision:
        msg = self._check_request(req, facts)
        try:
            resp: Any = await self._call(msg)
        except Exception as e:    # a gRPC error status, a timeout, a refused or reset
            return Decision(Outcome.ERROR, reason=f"{type(e).__name__}: {e}")
        status = resp.status
        code = status.code if status is not None else 0
        metadata = resp.dynamic_metadata.to_dict() if resp.dynamic_metadata is not None else None
        if code != 0:
            denied = resp.denied_response
            d = Decision(Outcome.DENIED, reason=status.message if status else "")
            if denied is not None:
                if denied.status is not None and int(denied.status.code) >= 200:
                    d.status = int(denied.status.code)
                set_, append = _pairs_from_options(denied.headers, False)
                d.client_headers = set_ + append
                d.body = denied.body.encode()
            d.metadata = metadata
            return d
        d = Decision(Outcome.OK, metadata=metadata)
        ok = resp.ok_response
        if ok is not None:
            d.upstream_set, d.upstream_append = _pairs_from_options(ok.headers, False)
            d.upstream_remove = [h.lower() for h in ok.headers_to_remove]
            set_, append = _pairs_from_options(ok.response_headers_to_add, True)
            d.client_on_success = set_ + append
            d.query_set = [(q.key, q.value) for q in ok.query_parameters_to_set]
            d.query_remove = list(ok.query_parameters_to_remove)
            if ok.dynamic_metadata is not None and metadata is None:
                d.metadata = ok.dynamic_metadata.to_dict()
        return d
