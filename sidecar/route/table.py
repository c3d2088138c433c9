"""Compiled routing: virtual host by Host, then the first matching route.

Compiled once per snapshot. Route selection stays fast with 10,000 routes: exact paths and
prefixes are indexed by dict (one lookup per distinct prefix length), so only candidate routes
are checked in full, still in config order (first match wins, as in Envoy).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Protocol

from sidecar.config.route import Route, RouteAction, RouteConfig, RouteMatch, VirtualHost
from sidecar.core.body import Headers
from sidecar.core.filter import Handler
from sidecar.core.limits import NO_RATE_LIMITS, RouteRateLimits
from sidecar.core.message import Request, Response


class ClusterChoiceLike(Protocol):
    def pick(self, req: Request) -> tuple[str, object]: ...


async def _unbuilt(req: Request) -> Response:
    raise RuntimeError("route stack not built")


class CompiledRoute:
    """One route with everything the hot path needs precomputed; ``handler`` is its stack
    (``sidecar.route.stack.build_route_stack``)."""

    __slots__ = ("index", "config", "name", "match", "handler", "vhost", "cluster_names",
                 "stat_name", "_m_simple", "choice", "rate_limits", "path_only")

    def __init__(self, index: int, config: Route, vhost: "CompiledVirtualHost"):
        self.index = index
        self.config = config
        self.vhost = vhost
        self.name = config.name or f"{vhost.name}/{index}"
        self.stat_name = config.name or vhost.name   # bounded metric label
        self.match: RouteMatch = config.match
        self.handler: Handler = _unbuilt
        self.choice: ClusterChoiceLike | None = None   # set with the stack (cluster routes)
        m = self.match
        # path-only routes need no further check once the index picked them
        self._m_simple = not (m.headers or m.query_params or m.methods or m.cookies
                              or m.runtime_fraction is not None or m.grpc)
        # a plain prefix or exact path: the index's hit is the whole match
        self.path_only = (self._m_simple and m.regex is None
                          and m.path_separated_prefix is None)
        action = config.action
        names = []
        for attr in ("cluster",):
            v = getattr(action, attr, None)
            if v:
                names.append(v)
        for wc in getattr(action, "weighted_clusters", ()) or ():
            names.append(wc.name)
        self.cluster_names = tuple(names)
        # Envoy: only routes to a cluster have rate limits (a direct response has no entry)
        self.rate_limits: RouteRateLimits = NO_RATE_LIMITS
        if isinstance(action, RouteAction) and (action.rate_limits or vhost.config.rate_limits):
            self.rate_limits = RouteRateLimits(action.rate_limits, vhost.config.rate_limits,
                                               action.include_vh_rate_limits)

    @property
    def vhost_name(self) -> str:
        return self.vhost.name

    def pick_cluster(self, req: Request) -> str:
        """The cluster this request will go to ("" for direct responses and redirects): filters
        that apply per upstream cluster (fault's ``upstream_cluster``) ask this, so the
        weighted draw is made in one place."""
        return self.choice.pick(req)[0] if self.choice is not None else ""

    def matches_rest(self, method: str, path: str, query: str, headers: Headers) -> bool:
        """Everything except the path prefix/exact part, which the index already checked."""
        m = self.match
        if m.regex is not None and m.regex.fullmatch(path) is None:
            return False
        if self._m_simple:
            return True
        if m.methods and method not in m.methods:
            return False
        if m.grpc and not headers.get("content-type", "").startswith("application/grpc"):
            return False
        for h in m.headers:
            if not h.matches(headers):
                return False
        if m.query_params:
            params = parse_query_first(query)
            for q in m.query_params:
                v = params.get(q.name)
                if v is None:
                    if q.present:
                        return False
                    continue
                if q.value is not None and not q.value.matches(v):
                    return False
        if m.cookies:
            jar = parse_cookies(headers.getall("cookie", ()))
            for name, sm in m.cookies:
                v = jar.get(name)
                if v is None or not sm.matches(v):
                    return False
        if m.runtime_fraction is not None and random.random() * 100.0 >= m.runtime_fraction:
            return False
        return True


def parse_query_first(query: str) -> dict[str, str]:
    """Envoy's query matching: the first value of each name, compared without percent-decoding."""
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        if k not in out:
            out[k] = v
    return out


def parse_cookies(values: Iterable[str]) -> dict[str, str]:
    jar: dict[str, str] = {}
    for v in values:
        for part in v.split(";"):
            k, sep, val = part.strip().partition("=")
            if sep and k not in jar:
                jar[k] = val.strip('"')
    return jar


class CompiledVirtualHost:
    __slots__ = ("name", "config", "routes", "_exact", "_prefix", "_prefix_ci", "_prefix_lens",
                 "_prefix_ci_lens", "_scan", "_exact_ci", "_has_ci")

    def __init__(self, config: VirtualHost):
        self.name = config.name
        self.config = config
        self.routes = [CompiledRoute(i, r, self) for i, r in enumerate(config.routes)]
        self._exact: dict[str, list[int]] = {}
        self._exact_ci: dict[str, list[int]] = {}
        self._prefix: dict[str, list[int]] = {}
        self._prefix_ci: dict[str, list[int]] = {}
        self._scan: list[int] = []           # regex routes: always candidates
        for r in self.routes:
            m = r.match
            if m.path is not None:
                (self._exact if m.case_sensitive else self._exact_ci).setdefault(
                    m.path if m.case_sensitive else m.path.lower(), []).append(r.index)
            elif m.prefix is not None:
                (self._prefix if m.case_sensitive else self._prefix_ci).setdefault(
                    m.prefix if m.case_sensitive else m.prefix.lower(), []).append(r.index)
            elif m.path_separated_prefix is not None:
                # indexed as a prefix; the separator rule is checked in match()
                self._prefix.setdefault(m.path_separated_prefix, []).append(r.index)
            else:
                self._scan.append(r.index)
        self._prefix_lens = sorted({len(p) for p in self._prefix})
        self._prefix_ci_lens = sorted({len(p) for p in self._prefix_ci})
        self._has_ci = bool(self._exact_ci or self._prefix_ci)

    def _other_candidates(self, path: str, cands: list[int] | None,
                          sources: int) -> tuple[list[int] | None, int]:
        """``cands`` plus the case-insensitive index hits and the routes never indexed."""
        more: list[list[int] | None] = []
        if self._has_ci:
            low = path.lower()
            plen = len(path)
            more.append(self._exact_ci.get(low))
            more += [self._prefix_ci.get(low[:n]) for n in self._prefix_ci_lens if n <= plen]
        more.append(self._scan or None)
        for hit in more:
            if hit is not None:
                cands = hit if cands is None else cands + hit
                sources += 1
        return cands, sources

    def match(self, method: str, path: str, query: str, headers: Headers) -> CompiledRoute | None:
        # candidates in config order: one index hit is used as is (the common case); hits from
        # several places are concatenated into a new list and sorted (index lists are shared)
        cands = self._exact.get(path)
        sources = 0 if cands is None else 1
        plen = len(path)
        pref = self._prefix
        for n in self._prefix_lens:
            if n > plen:
                break
            hit = pref.get(path[:n])
            if hit is not None:
                cands = hit if cands is None else cands + hit
                sources += 1
        if self._has_ci or self._scan:
            cands, sources = self._other_candidates(path, cands, sources)
        if cands is None:
            return None
        if sources > 1:
            cands = sorted(cands)
        routes = self.routes
        for i in cands:
            r = routes[i]
            if r.path_only:
                return r
            psp = r.match.path_separated_prefix
            if psp is not None and len(path) > len(psp) and path[len(psp)] not in "/?#":
                continue
            if r.matches_rest(method, path, query, headers):
                return r
        return None


class RouteTable:
    """Virtual-host selection by Host, Envoy's order: exact, then longest ``*.suffix``, then
    longest ``prefix.*``, then ``*``."""

    __slots__ = ("config", "vhosts", "_exact", "_suffix", "_prefix", "_default", "_cache",
                 "strip_port", "listener_port")

    def __init__(self, config: RouteConfig, strip_port: str = "any", listener_port: int = 0):
        self.config = config
        self.strip_port = strip_port
        self.listener_port = str(listener_port)
        self.vhosts = [CompiledVirtualHost(v) for v in config.virtual_hosts]
        self._exact: dict[str, CompiledVirtualHost] = {}
        suffix, prefix = [], []
        self._default: CompiledVirtualHost | None = None
        for vh in self.vhosts:
            for d in vh.config.domains:
                if d == "*":
                    self._default = vh
                elif d.startswith("*"):
                    suffix.append((d[1:], vh))
                elif d.endswith("*"):
                    prefix.append((d[:-1], vh))
                else:
                    self._exact[d] = vh
        self._suffix = sorted(suffix, key=lambda x: -len(x[0]))
        self._prefix = sorted(prefix, key=lambda x: -len(x[0]))
        self._cache: dict[str, CompiledVirtualHost | None] = {}

    def all_routes(self) -> Iterator[CompiledRoute]:
        for vh in self.vhosts:
            yield from vh.routes

    def virtual_host(self, host: str) -> CompiledVirtualHost | None:
        cache = self._cache
        if host in cache:
            return cache[host]
        h = host.lower()
        strip = self.strip_port
        if strip != "none":
            # strip the port (keep IPv6 brackets intact)
            if h.startswith("["):
                end = h.find("]")
                port = h[end + 2:] if end != -1 and h[end + 1:end + 2] == ":" else ""
                if port and (strip == "any" or port == self.listener_port):
                    h = h[: end + 1]
            else:
                colon = h.rfind(":")
                if colon != -1 and (strip == "any" or h[colon + 1:] == self.listener_port):
                    h = h[:colon]
        vh = self._exact.get(h)
        if vh is None:
            for suf, v in self._suffix:
                if h.endswith(suf) and len(h) > len(suf):
                    vh = v
                    break
        if vh is None:
            for pre, v in self._prefix:
                if h.startswith(pre) and len(h) > len(pre):
                    vh = v
                    break
        if vh is None:
            vh = self._default
        if len(cache) >= 4096:   # Host is client-controlled: keep the cache bounded
            cache.clear()
        cache[host] = vh
        return vh
