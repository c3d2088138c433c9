"""Permission and principal tests: the building blocks both parsers compile policies from.

Each returns a ``RequestTest`` (``fn(req) -> bool``) bound at config time. Header tests come
from ``filters.request_headers`` (Envoy's view, pseudo-headers included) over the one set of
matchers in ``sidecar.config.matchers``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable

from filters.request_headers import RequestTest
from sidecar.config.matchers import StringMatcher
from sidecar.core.context import JsonValue
from sidecar.core.message import Request

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressGetter = Callable[[Request], "str | None"]
JsonTest = Callable[[JsonValue], bool]
"""A test over one JSON value of a JWT payload (``MISSING`` when the value is absent)."""


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: JsonValue = _Missing()


# ---- combinators -----------------------------------------------------------------------------

def always(req: Request) -> bool:
    return True


def any_of(tests: Iterable[RequestTest]) -> RequestTest:
    t = tuple(tests)
    if len(t) == 1:
        return t[0]
    return lambda req: any(f(req) for f in t)


def all_of(tests: Iterable[RequestTest]) -> RequestTest:
    t = tuple(tests)
    if len(t) == 1:
        return t[0]
    return lambda req: all(f(req) for f in t)


def negate(test: RequestTest) -> RequestTest:
    return lambda req: not test(req)


# ---- request properties ----------------------------------------------------------------------

def path_test(sm: StringMatcher) -> RequestTest:
    """The path without the query (Envoy's ``url_path``)."""
    m = sm.matches
    return lambda req: m(req.path)


def methods_test(methods: frozenset[str]) -> RequestTest:
    return lambda req: req.method in methods


def host_test(sm: StringMatcher) -> RequestTest:
    """The Host header, with or without its port."""
    m = sm.matches

    def host_match(req: Request) -> bool:
        h = req.headers.get("host")
        if h is None:
            return False
        if h.endswith("]") or ":" not in h:      # no port (or bare IPv6 literal)
            return m(h)
        return m(h) or m(h.rsplit(":", 1)[0])
    return host_match


def local_port_test(lo: int, hi: int) -> RequestTest:
    """The listener's port in ``[lo, hi)``."""
    def in_range(req: Request) -> bool:
        p = req.ctx.local_port
        return bool(p) and lo <= p < hi
    return in_range


def peer_test(sm: StringMatcher | None) -> RequestTest:
    """An mTLS peer (its URI SAN matched by ``sm`` when given)."""
    if sm is None:
        return lambda req: req.ctx.peer_identity is not None
    m = sm.matches

    def peer(req: Request) -> bool:
        ident = req.ctx.peer_identity
        return ident is not None and m(ident)
    return peer


# ---- addresses -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _parse_ip(s: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def direct_ip(req: Request) -> str | None:
    """The TCP peer's address."""
    a = req.ctx.downstream_addr
    return a[0] if a else None


def remote_ip(req: Request) -> str | None:
    """The trusted client address (XFF-derived) when the listener computed one, else the peer."""
    return req.ctx.remote_ip or direct_ip(req)


def ip_in(net: IpNetwork, getter: AddressGetter) -> RequestTest:
    def match(req: Request) -> bool:
        s = getter(req)
        if not s:
            return False
        ip = _parse_ip(s)
        if ip is None:
            return False
        if ip.version != net.version:
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            if mapped is None or net.version != 4:
                return False
            ip = mapped
        return ip in net
    return match


# ---- JWT payloads (the jwt_authn filter's dynamic metadata) ----------------------------------

def walk(value: JsonValue, keys: tuple[str, ...]) -> JsonValue:
    """``value[k1][k2]...``, ``MISSING`` when a step is absent or not an object."""
    for k in keys:
        if not isinstance(value, dict):
            return MISSING
        value = value.get(k, MISSING)
        if value is MISSING:
            return MISSING
    return value


def metadata_test(head: str, rest: tuple[str, ...], test: JsonTest, invert: bool) -> RequestTest:
    """Envoy's ``metadata`` matcher over ``envoy.filters.http.jwt_authn``: ``head`` names the
    payload (provider or ``payload_in_metadata``), ``rest`` the path in it."""
    def match(req: Request) -> bool:
        payload: JsonValue = req.ctx.jwt_payloads.get(head, MISSING)
        v = payload if payload is MISSING else walk(payload, rest)
        return test(v) != invert
    return match


def claim_value_test(sm: StringMatcher) -> JsonTest:
    """A claim as a string (booleans ``true``/``false``, numbers as written); a list claim
    (groups, roles, scp) matches when any scalar element does."""
    def test(v: JsonValue) -> bool:
        if isinstance(v, str):
            return sm.matches(v)
        if isinstance(v, bool):
            return sm.matches("true" if v else "false")
        if isinstance(v, (int, float)):
            return sm.matches(str(v))
        if isinstance(v, list):
            return any(test(x) for x in v if not isinstance(x, (list, dict)))
        return False
    return test


def split_scopes(inner: JsonTest) -> JsonTest:
    """A space-separated claim (OAuth ``scope``) matched scope by scope."""
    def test(x: JsonValue) -> bool:
        if isinstance(x, str):
            return any(inner(p) for p in x.split())
        return inner(x)
    return test


def claim_test(provider: str | None, keys: tuple[str, ...], test: JsonTest,
               want: bool) -> RequestTest:
    """A claim of one provider's payload (any verified payload when ``provider`` is None)
    passing ``test``; ``want=False`` inverts (claim absent or not matching)."""
    def match(req: Request) -> bool:
        payloads = req.ctx.jwt_payloads
        if provider is not None:
            p = payloads.get(provider)
            cands: Iterable[dict[str, JsonValue]] = (p,) if p is not None else ()
        else:
            cands = payloads.values()
        for p in cands:
            x = walk(p, keys)
            if x is not MISSING and test(x):
                return want
        return not want
    return match
