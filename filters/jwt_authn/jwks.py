"""Key stores: local keys, and remote JWKS with a TTL cache, background refresh before expiry,
last-good keys on failure and bounded refetches (one in flight; an unknown ``kid`` at most
once per interval).

A remote JWKS is fetched from a ``JwksSource``:

* ``ClusterSource`` (Envoy ``remote_jwks.http_uri``): a GET for the URI's path, with the URI's
  host as ``Host``, sent through the named cluster (``FilterEnv.upstream(cluster)``, i.e. the
  cluster's ``Cluster.send``: its load balancer, circuit breakers, pools and TLS), as Envoy
  does. The URI's host is never resolved.
* ``DirectSource`` (native ``jwks_uri``): aiohttp straight to the URI.

Both take at most ``MAX_JWKS_BYTES``, accept only ``200`` and follow no redirect.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from multidict import MultiDict

from filters.jwt_authn.config import MAX_JWKS_BYTES, RemoteJwks
from filters.jwt_authn.keys import KeySet, parse_jwks
from sidecar.core.body import BodyTooLarge, Headers
from sidecar.core.context import RequestContext
from sidecar.core.filter import UpstreamClient
from sidecar.core.message import Request
from sidecar.core.metrics import MetricFactory

log = logging.getLogger("sidecar.filters.jwt_authn")

REFRESH_FRACTION = 0.8          # remote JWKS refreshed in the background at 80% of its TTL


class JwksFetchError(Exception):
    pass


class JwksSource(Protocol):
    """Where a remote JWKS comes from: one fetch returns the document's bytes or raises."""

    async def fetch(self) -> bytes: ...


class ClusterSource:
    """GET the JWKS through a cluster (Envoy's ``http_uri``: ``uri`` gives path and Host,
    ``cluster`` where the request goes, ``timeout`` the whole exchange)."""

    __slots__ = ("client", "host", "path", "query", "timeout_s")

    def __init__(self, client: UpstreamClient, cfg: RemoteJwks):
        u = urlsplit(cfg.uri)
        self.client = client
        self.host = u.netloc.rpartition("@")[2]       # never send userinfo
        self.path = u.path or "/"
        self.query = u.query
        self.timeout_s = cfg.timeout_s

    async def fetch(self) -> bytes:
        loop = asyncio.get_running_loop()
        ctx = RequestContext("jwt_authn", None, time.perf_counter())
        ctx.deadline = loop.time() + self.timeout_s     # connect, head and body
        headers: Headers = MultiDict((("host", self.host), ("accept", "application/json")))
        resp = await self.client.send(Request("GET", self.path, self.query, headers, b"", ctx))
        try:
            if resp.status != 200:
                raise JwksFetchError(f"HTTP {resp.status}")
            body = resp.body
            if isinstance(body, bytes):
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksFetchError("JWKS response too large")
                return body
            try:
                return await body.read_all(MAX_JWKS_BYTES)
            except BodyTooLarge:
                raise JwksFetchError("JWKS response too large") from None
        except BaseException:
            resp.discard()          # the connection is not reused with a body half read
            raise


class DirectSource:
    """GET the JWKS from the URI itself (native ``jwks_uri``)."""

    __slots__ = ("uri", "timeout_s")

    def __init__(self, cfg: RemoteJwks):
        self.uri = cfg.uri
        self.timeout_s = cfg.timeout_s

    async def fetch(self) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.get(self.uri, allow_redirects=False,
                             headers={"accept": "application/json"}) as r:
                if r.status != 200:
                    raise JwksFetchError(f"HTTP {r.status}")
                return await _read_limited(r.content, MAX_JWKS_BYTES)


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise JwksFetchError("JWKS response too large")
        parts.append(chunk)


class LocalJwks:
    """Keys from the config (JWKS, PEM or a secret): always there."""

    __slots__ = ("keys",)
    remote = False

    def __init__(self, keys: KeySet):
        self.keys: KeySet | None = keys

    def keys_now(self) -> KeySet | None:
        return self.keys

    async def wait_keys(self) -> KeySet | None:
        return self.keys

    async def refetch_for_unknown_kid(self) -> bool:
        return False


class RemoteJwksStore:
    """A remote JWKS, kept across reloads while its config is unchanged."""

    remote = True

    def __init__(self, cfg: RemoteJwks, name: str, metrics: MetricFactory, source: JwksSource):
        self.cfg = cfg
        self.name = name
        self.source = source               # rebound at each build (the cluster's client)
        self.keys: KeySet | None = None
        self.fetched_at = -math.inf        # monotonic time of the last good fetch
        self.refresh_at = -math.inf
        self.last_attempt = -math.inf
        self.last_failure = -math.inf
        self.fetches = 0                   # attempts (tests and the admin page read this)
        self._task: asyncio.Task[None] | None = None
        fam = metrics.counter("sidecar_jwt_authn_jwks_fetches_total",
                              "Remote JWKS fetch attempts by provider and result",
                              ("provider", "result"))
        self._ok = fam.labels(name, "success")
        self._fail = fam.labels(name, "failure")
        self._nkeys = metrics.gauge("sidecar_jwt_authn_jwks_keys",
                                    "Verification keys held per provider", ("provider",)).labels(name)

    # -- reading ---------------------------------------------------------------------------
    def keys_now(self) -> KeySet | None:
        ks = self.keys
        if ks is not None and self._task is None:
            now = time.monotonic()
            if now >= self.refresh_at and now - self.last_failure >= self.cfg.failed_refetch_s:
                self.start_fetch()        # background; this request uses the current keys
        return ks

    async def wait_keys(self) -> KeySet | None:
        """No keys yet: join (or start) a fetch, unless the last one failed very recently."""
        if self.keys is not None:
            return self.keys
        if self._task is None:
            if time.monotonic() - self.last_failure < self.cfg.failed_refetch_s:
                return None
            self.start_fetch()
        await self._join()
        return self.keys

    async def refetch_for_unknown_kid(self) -> bool:
        """Fetch again for a kid we do not know, at most once per ``kid_refetch_interval``."""
        if self._task is not None:
            await self._join()
            return True
        if time.monotonic() - self.last_attempt < self.cfg.kid_refetch_interval_s:
            return False
        self.start_fetch()
        await self._join()
        return True

    async def _join(self) -> None:
        t = self._task
        if t is not None:
            try:
                await asyncio.shield(t)
            except asyncio.CancelledError:
                if t.cancelled():
                    return
                raise

    # -- fetching --------------------------------------------------------------------------
    def start_fetch(self) -> asyncio.Task[None] | None:
        if self._task is not None:
            return self._task
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self.last_attempt = time.monotonic()
        self._task = loop.create_task(self._fetch(), name=f"jwks-fetch:{self.name}")
        self._task.add_done_callback(self._done)
        return self._task

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            log.error("jwks fetch task for %s failed: %r", self.name, task.exception())

    async def _fetch(self) -> None:
        cfg = self.cfg
        err: BaseException | None = None
        delay = cfg.retry_base_s
        for attempt in range(cfg.num_retries + 1):
            self.fetches += 1
            try:
                ks = parse_jwks(await self.source.fetch())
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - any failure keeps the last good keys
                err = e
                self._fail.inc()
                if attempt < cfg.num_retries:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, cfg.retry_max_s)
                continue
            now = time.monotonic()
            if self.keys is None or self.keys.digest != ks.digest:
                self.keys = ks             # a new generation: cached verifications re-run
            self.fetched_at = now
            self.refresh_at = now + cfg.cache_duration_s * REFRESH_FRACTION
            self._ok.inc()
            self._nkeys.set(len(self.keys.keys))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("jwks for provider %s: %d keys", self.name, len(self.keys.keys))
            return
        self.last_failure = time.monotonic()
        if self.keys is not None:
            # keep serving the last good keys; try again after failed_refetch
            self.refresh_at = self.last_failure + cfg.failed_refetch_s
        log.warning("jwks fetch for provider %s failed (%s); %s", self.name,
                    err if isinstance(err, (JwksFetchError, ValueError)) else type(err).__name__,
                    "keeping the last good keys" if self.keys is not None else "no keys yet")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


KeyStore = LocalJwks | RemoteJwksStore
