"""Per-route chains, built once per config snapshot.

The whole stack for one route is assembled in ``build_route_chain``, outermost first, so the
order is visible in one place (linkerd2-proxy's shape):

    route filters in listener config order (jwt_authn, rbac, ratelimit, fault, ...)
      -> RouterStage: header mutation, cluster choice, rewrites, shadowing,
         route timeout, retries (sidecar.retry_layer), per-attempt upstream call
"""

from __future__ import annotations

import logging
from typing import Optional

import filters as filter_registry
from sidecar.core.http import Handler, Request, Response
from sidecar.config.model import DirectResponse, HeaderMutation, Redirect

log = logging.getLogger("sidecar.chain")


def _compose(filter_obj, next_handler: Handler) -> Handler:
    async def call(req: Request) -> Response:
        return await filter_obj(req, next_handler)
    call.filter = filter_obj  # type: ignore[attr-defined]
    return call


def merged_mutations(*muts: HeaderMutation) -> HeaderMutation:
    """Route-level first, then virtual host, then route config (Envoy's default order:
    the most specific wins when appending with overwrite)."""
    out = HeaderMutation()
    for m in muts:
        out = HeaderMutation(
            request_add=out.request_add + m.request_add,
            request_remove=out.request_remove + m.request_remove,
            response_add=out.response_add + m.response_add,
            response_remove=out.response_remove + m.response_remove,
        )
    return out


def apply_request_mutation(m: HeaderMutation, headers) -> None:
    for name in m.request_remove:
        headers.popall(name, None)
    for opt in m.request_add:
        if opt.append:
            headers.add(opt.name, opt.value)
        else:
            headers[opt.name] = opt.value


def apply_response_mutation(m: HeaderMutation, headers) -> None:
    for name in m.response_remove:
        headers.popall(name, None)
    for opt in m.response_add:
        if opt.append:
            headers.add(opt.name, opt.value)
        else:
            headers[opt.name] = opt.value


class DirectResponseStage:
    __slots__ = ("status", "body", "mutation")

    def __init__(self, action: DirectResponse, mutation: HeaderMutation):
        self.status = action.status
        self.body = action.body.encode()
        self.mutation = mutation

    async def __call__(self, req: Request) -> Response:
        resp = Response(self.status, body=self.body)
        if self.body:
            resp.headers["content-type"] = "text/plain"
        apply_response_mutation(self.mutation, resp.headers)
        return resp


class RedirectStage:
    __slots__ = ("action", "mutation", "match_prefix")

    def __init__(self, action: Redirect, mutation: HeaderMutation, match_prefix: Optional[str]):
        self.action = action
        self.mutation = mutation
        self.match_prefix = match_prefix

    async def __call__(self, req: Request) -> Response:
        """Envoy's redirect rules: host_redirect replaces host and port; a scheme change drops
        only the original scheme's default port; otherwise the request's port is kept."""
        a = self.action
        orig_scheme = "https" if req.ctx.tls else "http"
        scheme = a.scheme or orig_scheme
        host, port = split_host_port(req.headers.get("host", ""))
        if a.host:
            host, port = split_host_port(a.host)
        if a.port:
            port = str(a.port)
        elif scheme != orig_scheme and port == ("443" if orig_scheme == "https" else "80"):
            port = ""
        authority = f"{host}:{port}" if port else host
        path = req.path
        if a.path is not None:
            path = a.path
        elif a.prefix_rewrite is not None and self.match_prefix is not None:
            path = a.prefix_rewrite + path[len(self.match_prefix):]
        query = "" if a.strip_query else req.query
        loc = f"{scheme}://{authority}{path}" + (f"?{query}" if query and "?" not in path else "")
        resp = Response(a.status)
        resp.headers["location"] = loc
        apply_response_mutation(self.mutation, resp.headers)
        return resp


def split_host_port(authority: str) -> tuple[str, str]:
    """``host:port`` -> (host, port); IPv6 literals keep their brackets."""
    if authority.startswith("["):
        end = authority.find("]")
        if end != -1:
            rest = authority[end + 1:]
            return authority[: end + 1], rest[1:] if rest.startswith(":") else ""
        return authority, ""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return host, port
    return authority, ""


def build_route_chain(route, listener, runtime, clusters, built: list) -> Handler:
    """The handler for one compiled route: filters (outermost first) around the router."""
    from sidecar.route.router import RouterStage

    cfg = route.config
    vh = route.vhost.config
    rc = listener.route_config
    mutation = merged_mutations(cfg.headers, vh.headers, rc.headers if rc else HeaderMutation())
    action = cfg.action
    if isinstance(action, DirectResponse):
        handler: Handler = DirectResponseStage(action, mutation)
    elif isinstance(action, Redirect):
        handler = RedirectStage(action, mutation, cfg.match.prefix)
    else:
        handler = RouterStage(route, action, mutation, listener, runtime, clusters, vh)

    per_route = dict(vh.per_filter)
    per_route.update(cfg.per_filter)
    for hf in reversed(listener.http_filters):
        spec = filter_registry.lookup(hf.name)
        override_present = hf.name in per_route
        override = per_route.get(hf.name)
        if override_present and override is None:
            continue            # disabled on this route
        if hf.disabled and not override_present:
            continue
        f = spec.build(hf.config, override, runtime, route)
        if f is None:
            continue
        built.append(f)
        handler = _compose(f, handler)
    return handler
