"""Finding tokens in a request (header with prefix, query parameter, cookie) and removing
them when the provider does not forward them."""

from __future__ import annotations

import re
from urllib.parse import unquote

from filters.jwt_authn.config import TokenLocation
from sidecar.core.message import Request

TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-.]+")
# after the prefix: optional blanks, then the credential up to a blank or a comma (several
# Authorization values joined by "," keep only the first)
_CREDENTIAL = re.compile(r"[ \t]*([^ \t,]*)")


def extract_one(req: Request, loc: TokenLocation) -> str | None:
    if loc.kind == "header":
        v = req.headers.get(loc.name)
        if v is None:
            return None
        if loc.prefix:
            if not v.startswith(loc.prefix):
                return None
            start = len(loc.prefix)
        else:
            start = 0
        tok = v[start:] if start else v
        if " " in tok or "," in tok or "\t" in tok:
            m = _CREDENTIAL.match(v, start)
            tok = m.group(1) if m is not None else ""
        return tok or None
    if loc.kind == "query":
        q = req.query
        if not q or loc.name not in q:
            return None
        for part in q.split("&"):
            k, sep, val = part.partition("=")
            if sep and unquote(k) == loc.name:
                val = unquote(val)
                return val if TOKEN_CHARS.fullmatch(val) else (val or None)
        return None
    cookie = req.headers.get("cookie")
    if not cookie or loc.name not in cookie:
        return None
    for part in cookie.split(";"):
        k, sep, val = part.strip().partition("=")
        if sep and k == loc.name:
            val = val.strip().strip('"')
            return val or None
    return None


def extract(req: Request, locations: tuple[TokenLocation, ...]) -> list[tuple[str, TokenLocation]]:
    """Every distinct token found, with where it was found, in location order."""
    out: list[tuple[str, TokenLocation]] = []
    for loc in locations:
        tok = extract_one(req, loc)
        if tok and not any(t == tok for t, _ in out):
            out.append((tok, loc))
    return out


def remove(req: Request, loc: TokenLocation) -> None:
    """Drop the token from the request (a cookie is left in place, as Envoy does)."""
    if loc.kind == "header":
        req.headers.popall(loc.name, None)
    elif loc.kind == "query":
        name = loc.name
        req.query = "&".join(p for p in req.query.split("&")
                             if not (p.partition("=")[1] and unquote(p.partition("=")[0]) == name))
