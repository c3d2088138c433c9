"""The route action: header mutations, path and host rewrites, hash policy, and the choice of
cluster; then the chosen cluster's part of the stack. Upstream failures become Envoy's local
replies here (503 UF/UC/UH/UO/NC, 502 UPE, 504 UT).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable
from urllib.parse import parse_qs

from multidict import MultiDict

from sidecar.config.route import HashPolicy, HeaderMutation, HeaderValueOption, RouteAction
from sidecar.core.body import Headers
from sidecar.core.context import RequestContext
from sidecar.core.errors import NoCluster, UpstreamError
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response, local_reply
from sidecar.route.table import parse_cookies

RESET_BODY = "upstream connect error or disconnect/reset before headers. reset reason: "


def local_reply_for_error(ctx: RequestContext, e: UpstreamError,
                          suppress_envoy_headers: bool = False) -> Response:
    flag = e.flag
    # response code details as Envoy words them (%RESPONSE_CODE_DETAILS%)
    if flag == "UT":
        return local_reply(ctx, 504, "upstream request timeout", "UT",
                           details="upstream_response_timeout")
    if flag == "UF":
        return local_reply(ctx, 503, RESET_BODY + "remote connection failure", "UF",
                           details=_RESET_DETAILS + "{remote_connection_failure}")
    if flag == "UPE":
        return local_reply(ctx, 502, RESET_BODY + "protocol error", "UPE",
                           details=_RESET_DETAILS + "{protocol_error}")
    if flag == "UO":
        h: Headers = MultiDict()
        if not suppress_envoy_headers:
            h["x-envoy-overloaded"] = "true"
        return local_reply(ctx, 503, RESET_BODY + "overflow", "UO", h,
                           details=_RESET_DETAILS + "{overflow}")
    if flag == "UH":
        return local_reply(ctx, 503, "no healthy upstream", "UH", details="no_healthy_upstream")
    if flag == "NC":
        return local_reply(ctx, 503, "", "NC", details="cluster_not_found")
    return local_reply(ctx, 503, RESET_BODY + "connection termination", flag or "UC",
                       details=_RESET_DETAILS + "{connection_termination}")


_RESET_DETAILS = "upstream_reset_before_response_started"


# ---- header mutations -----------------------------------------------------------------------

def merged_mutations(*muts: HeaderMutation) -> HeaderMutation:
    """Route-level first, then virtual host, then route config (Envoy's default order)."""
    out = HeaderMutation()
    for m in muts:
        out = HeaderMutation(
            request_add=out.request_add + m.request_add,
            request_remove=out.request_remove + m.request_remove,
            response_add=out.response_add + m.response_add,
            response_remove=out.response_remove + m.response_remove,
        )
    return out


def _apply(adds: tuple[HeaderValueOption, ...], removes: tuple[str, ...], headers: Headers) -> None:
    for name in removes:
        headers.popall(name, None)
    for opt in adds:
        if opt.append:
            headers.add(opt.name, opt.value)
        else:
            headers[opt.name] = opt.value


def apply_request_mutation(m: HeaderMutation, headers: Headers) -> None:
    _apply(m.request_add, m.request_remove, headers)


def apply_response_mutation(m: HeaderMutation, headers: Headers) -> None:
    _apply(m.response_add, m.response_remove, headers)


# ---- cluster choice -------------------------------------------------------------------------

def weighted_point(request_id: str, total: int) -> int | None:
    """The weighted-cluster draw: stable for a request id (retries and replays of one request
    land on the same cluster); None when there is no id (then the draw is random)."""
    if not request_id:
        return None
    return zlib.crc32(request_id.encode()) % total


class ClusterChoice:
    """Which cluster a request goes to: a fixed one, a weighted draw, or a request header."""

    __slots__ = ("single", "weighted", "header", "total")

    def __init__(self, action: RouteAction):
        self.single = action.cluster
        self.header = action.cluster_header
        cum = 0
        weighted: list[tuple[int, str, HeaderMutation]] = []
        for wc in action.weighted_clusters:
            cum += wc.weight
            weighted.append((cum, wc.name, wc.headers))
        self.weighted = tuple(weighted)
        self.total = cum

    def pick(self, req: Request) -> tuple[str, HeaderMutation | None]:
        """(cluster name, that weighted cluster's header mutation or None)."""
        if self.single is not None:
            return self.single, None
        if self.weighted:
            point = weighted_point(req.ctx.request_id, self.total)
            if point is None:
                point = random.getrandbits(32) % self.total
            for cum, name, mut in self.weighted:
                if point < cum:
                    return name, mut
        if self.header is not None:
            return req.headers.get(self.header, ""), None
        return "", None

    def names(self) -> tuple[str, ...]:
        if self.single is not None:
            return (self.single,)
        return tuple(name for _, name, _ in self.weighted)


def request_hash(policies: tuple[HashPolicy, ...], req: Request) -> int | None:
    """Envoy's hash_policy: combine the values of the policies that apply (terminal stops)."""
    h = None
    for p in policies:
        v = None
        if p.header is not None:
            v = req.headers.get(p.header)
        elif p.cookie is not None:
            v = parse_cookies(req.headers.getall("cookie", ())).get(p.cookie)
        elif p.query_parameter is not None:
            vals = parse_qs(req.query).get(p.query_parameter)
            v = vals[0] if vals else None
        elif p.source_ip and req.ctx.downstream_addr:
            v = req.ctx.downstream_addr[0]
        if v is None:
            continue
        x = zlib.crc32(v.encode("utf-8", "surrogateescape"))
        h = x if h is None else ((h * 31) ^ x) & 0xFFFFFFFF
        if p.terminal:
            break
    return h


UpstreamStackFactory = Callable[[str], Handler]


async def _no_cluster(req: Request) -> Response:
    raise NoCluster(req.ctx.cluster)
"""Builds the part of a route's stack after the cluster choice, for one cluster name."""


class RouteActionLayer:
    """Mutations and rewrites, the cluster choice, then that cluster's stack (built once per
    cluster at stack build time; ``cluster_header`` routes build theirs on first use)."""

    __slots__ = ("mutation", "choice", "stacks", "make_stack", "prefix_rewrite", "prefix_len",
                 "regex_rewrite", "host_rewrite", "hash_policy", "_header_stacks", "configured",
                 "single", "single_stack", "mutates_request", "mutates_response",
                 "idle_timeout", "max_stream_duration", "suppress_envoy_headers", "plain")

    MAX_HEADER_STACKS = 256     # cluster_header names are client-controlled: bound the cache

    def __init__(self, action: RouteAction, match_len: int, mutation: HeaderMutation,
                 make_stack: UpstreamStackFactory,
                 configured: Callable[[str], bool] = lambda name: True,
                 suppress_envoy_headers: bool = False):
        self.suppress_envoy_headers = suppress_envoy_headers
        self.mutation = mutation
        # a cluster_header names clusters at request time: only configured ones get a stack
        # (the header is client-controlled; unknown names answer 503 NC and cost nothing)
        self.configured = configured
        self.choice = ClusterChoice(action)
        self.make_stack = make_stack
        self.stacks: dict[str, Handler] = {name: make_stack(name) for name in self.choice.names()}
        # the common case, one fixed cluster, takes no choice and no lookup per request
        self.single = action.cluster
        self.single_stack = self.stacks[action.cluster] if action.cluster is not None else None
        self.mutates_request = bool(mutation.request_add or mutation.request_remove)
        self.mutates_response = bool(mutation.response_add or mutation.response_remove)
        self._header_stacks: dict[str, Handler] = {}
        self.prefix_rewrite = action.prefix_rewrite
        self.prefix_len = match_len if action.prefix_rewrite is not None else 0
        self.regex_rewrite: tuple[re.Pattern[str], str] | None = action.regex_rewrite
        self.host_rewrite = action.host_rewrite
        self.hash_policy = action.hash_policy
        self.idle_timeout = action.idle_timeout_s
        self.max_stream_duration = action.max_stream_duration_s
        # nothing to do but hand the request to its one cluster (the common route)
        self.plain = (self.single_stack is not None and not self.mutates_request
                      and not self.mutates_response and self.prefix_rewrite is None
                      and self.regex_rewrite is None and self.host_rewrite is None
                      and not self.hash_policy and self.idle_timeout is None
                      and self.max_stream_duration is None)

    def _stack_for(self, name: str) -> Handler:
        stack = self.stacks.get(name)
        if stack is None:
            hs = self._header_stacks
            stack = hs.get(name)
            if stack is None:
                if not self.configured(name):
                    return _no_cluster
                if len(hs) >= self.MAX_HEADER_STACKS:
                    hs.clear()
                stack = hs[name] = self.make_stack(name)
        return stack

    async def __call__(self, req: Request) -> Response:
        ctx = req.ctx
        if self.plain:
            ctx.cluster = self.single      # type: ignore[assignment]
            try:
                return await self.single_stack(req)     # type: ignore[misc]
            except UpstreamError as e:
                return local_reply_for_error(ctx, e, self.suppress_envoy_headers)
        headers = req.headers
        if self.idle_timeout is not None:
            ctx.stream_idle_timeout = self.idle_timeout      # enforced by the codec's sweep
        if self.max_stream_duration is not None:
            ctx.max_stream_duration = self.max_stream_duration
        stack = self.single_stack
        extra: HeaderMutation | None = None
        if stack is not None:
            ctx.cluster = self.single      # type: ignore[assignment]
        else:
            name, extra = self.choice.pick(req)
            ctx.cluster = name
            if not name:
                return local_reply(ctx, 503, "", "NC")   # a cluster_header naming none
            stack = self._stack_for(name)
        if self.mutates_request:
            apply_request_mutation(self.mutation, headers)
        if extra is not None:
            apply_request_mutation(extra, headers)
        if self.prefix_rewrite is not None or self.regex_rewrite is not None:
            headers["x-envoy-original-path"] = req.url
            ctx.original_path = req.path
            if self.prefix_rewrite is not None:
                path = self.prefix_rewrite + req.path[self.prefix_len:]
                req.path = path if path.startswith("/") else "/" + path
            else:
                rx, sub = self.regex_rewrite       # type: ignore[misc]
                req.path = rx.sub(sub, req.path)
        if self.host_rewrite is not None:
            headers["x-envoy-original-host"] = headers.get("host", "")
            headers["host"] = self.host_rewrite
        if self.hash_policy:
            ctx.hash_key = request_hash(self.hash_policy, req)
        try:
            resp = await stack(req)
        except UpstreamError as e:
            return local_reply_for_error(ctx, e, self.suppress_envoy_headers)
        if extra is not None:
            apply_response_mutation(extra, resp.headers)
        if self.mutates_response:
            apply_response_mutation(self.mutation, resp.headers)
        return resp
