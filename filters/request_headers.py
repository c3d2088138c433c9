"""A ``HeaderMatcher`` (``sidecar.config.matchers``) applied to a request, as Envoy's filters see
its headers: with the pseudo-headers ``:method``, ``:authority``, ``:path`` (path and query)
and ``:scheme``, a repeated header joined with ``,``.

RBAC permissions and principals, JWT rule matches and rate-limit ``header_value_match``
actions all match headers this way; the matchers themselves are the one set in
``sidecar.config.matchers``.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config.matchers import HeaderMatcher
from sidecar.core.message import Request

ValueGetter = Callable[[Request], "str | None"]
RequestTest = Callable[[Request], bool]


def _method(req: Request) -> str | None:
    return req.method


def _authority(req: Request) -> str | None:
    return req.headers.get("host")


def _path(req: Request) -> str | None:
    return req.url


def _scheme(req: Request) -> str | None:
    return "https" if req.ctx.tls else "http"


_PSEUDO: dict[str, ValueGetter] = {":method": _method, ":authority": _authority,
                                   "host": _authority, ":path": _path, ":scheme": _scheme}


def header_value_getter(name: str) -> ValueGetter:
    """Envoy's view of header ``name`` (lower-case), pseudo-headers included; None if absent."""
    pseudo = _PSEUDO.get(name)
    if pseudo is not None:
        return pseudo

    def get(req: Request) -> str | None:
        vals = req.headers.getall(name, None)
        if vals is None:
            return None
        return vals[0] if len(vals) == 1 else ",".join(vals)
    return get


def request_header_test(hm: HeaderMatcher) -> RequestTest:
    """``fn(req) -> bool`` for one header matcher (bound once, at build time)."""
    get = header_value_getter(hm.name)
    match = hm.matches_value
    return lambda req: match(get(req))
