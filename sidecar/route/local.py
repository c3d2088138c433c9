"""Routes the proxy answers itself: ``direct_response`` and ``redirect`` (Envoy semantics)."""

from __future__ import annotations

from sidecar.config.route import DirectResponse, HeaderMutation, Redirect
from sidecar.core.message import Request, Response
from sidecar.route.action import apply_response_mutation


class DirectResponder:
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


class Redirector:
    __slots__ = ("action", "mutation", "match_prefix")

    def __init__(self, action: Redirect, mutation: HeaderMutation, match_prefix: str | None):
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
