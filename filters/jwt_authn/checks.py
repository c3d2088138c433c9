"""Requirements compiled to checks: one provider, any / all of several, allow missing (or
failed). A check returns ``None`` (passed; the tokens' outputs are applied) or the ``Status``
that answers the request."""

from __future__ import annotations

import logging

from filters.jwt_authn.config import (
    ReqAll,
    ReqAllowMissingOrFailed,
    ReqAny,
    ReqProvider,
    Requirement,
    TokenLocation,
)
from filters.jwt_authn.status import MISSING, UNKNOWN_ISSUER, Status
from filters.jwt_authn.verify import ProviderRuntime
from sidecar.config.errors import ConfigError
from sidecar.core.message import Request

log = logging.getLogger("sidecar.filters.jwt_authn")

MemoKey = tuple[int, str, "frozenset[str] | None"]


class Memo:
    """Per-request results, so one token verified by one provider is verified once."""

    __slots__ = ("results",)

    def __init__(self) -> None:
        self.results: dict[MemoKey, Status | None] = {}


async def _verify_and_apply(prt: ProviderRuntime, req: Request, tok: str, loc: TokenLocation,
                            aud: frozenset[str] | None, memo: Memo | None) -> Status | None:
    """Verify one token and apply its outputs. ``memo`` (composite requirements only) makes
    a token checked by several branches cost one verification."""
    key: MemoKey | None = None
    if memo is not None:
        key = (id(prt), tok, aud)
        if key in memo.results:
            return memo.results[key]
    res = await prt.verify(tok, aud)
    if isinstance(res, Status):
        prt.count[res.outcome].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("jwt provider %s: %s", prt.name, res.outcome)   # never the token
        if memo is not None and key is not None:
            memo.results[key] = res
        return res
    prt.apply(req, res, loc)
    if memo is not None and key is not None:
        memo.results[key] = None
    return None


def _rank(st: Status) -> int:
    """The most specific failure answers a composite requirement ("missing" last)."""
    return 2 if st is MISSING else 1 if st is UNKNOWN_ISSUER else 0


class ProviderCheck:
    __slots__ = ("prt", "aud")

    def __init__(self, prt: ProviderRuntime, aud: frozenset[str] | None):
        self.prt = prt
        self.aud = aud

    async def check(self, req: Request, memo: Memo | None) -> Status | None:
        prt = self.prt
        toks = prt.extract(req)
        if not toks:
            prt.count["missing"].inc()
            return MISSING
        for tok, loc in toks:
            st = await _verify_and_apply(prt, req, tok, loc, self.aud, memo)
            if st is not None:
                return st
        return None


class AnyCheck:
    __slots__ = ("children",)

    def __init__(self, children: tuple[Check, ...]):
        self.children = children

    async def check(self, req: Request, memo: Memo | None) -> Status | None:
        best: Status | None = None
        for c in self.children:
            st = await c.check(req, memo)
            if st is None:
                return None
            if best is None or _rank(st) < _rank(best):
                best = st
        return best


class AllCheck:
    __slots__ = ("children",)

    def __init__(self, children: tuple[Check, ...]):
        self.children = children

    async def check(self, req: Request, memo: Memo | None) -> Status | None:
        for c in self.children:
            st = await c.check(req, memo)
            if st is not None:
                return st
        return None


class AllowCheck:
    """allow_missing (a present token must verify with some provider) and
    allow_missing_or_failed (anything passes; valid tokens still produce outputs)."""

    __slots__ = ("prts", "failed_ok")

    def __init__(self, prts: list[ProviderRuntime], failed_ok: bool):
        self.prts = prts
        self.failed_ok = failed_ok

    async def check(self, req: Request, memo: Memo | None) -> Status | None:
        found: dict[str, list[tuple[ProviderRuntime, TokenLocation]]] = {}
        for prt in self.prts:
            for tok, loc in prt.extract(req):
                found.setdefault(tok, []).append((prt, loc))
        for tok, cands in found.items():
            best: Status | None = None
            for prt, loc in cands:
                st = await _verify_and_apply(prt, req, tok, loc, None, memo)
                if st is None:
                    best = None
                    break
                if best is None or _rank(st) < _rank(best):
                    best = st
            if best is not None and not self.failed_ok:
                return best
        return None


Check = ProviderCheck | AnyCheck | AllCheck | AllowCheck


def compile_requirement(req: Requirement, prts: dict[str, ProviderRuntime], path: str) -> Check:
    if isinstance(req, ReqProvider):
        prt = prts.get(req.name)
        if prt is None:
            raise ConfigError(path, f"unknown jwt_authn provider {req.name!r}")
        return ProviderCheck(prt, frozenset(req.audiences) if req.audiences is not None else None)
    if isinstance(req, ReqAny):
        return AnyCheck(tuple(compile_requirement(c, prts, path) for c in req.children))
    if isinstance(req, ReqAll):
        return AllCheck(tuple(compile_requirement(c, prts, path) for c in req.children))
    return AllowCheck(list(prts.values()), isinstance(req, ReqAllowMissingOrFailed))
