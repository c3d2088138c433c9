"""xDS v3 REST/JSON client: ``POST /v3/discovery:<type>``, polled every ``refresh_delay``.

One poller per resource type. A poll sends the last accepted ``version_info``; ``304`` means no
change. A rejected response is NACKed the way Envoy does over REST: silently, by sending the
last accepted version again (the same bad version is not re-validated on every poll).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time

import aiohttp

from control_plane_client.resources import BY_NAME, REST_PATH, short
from control_plane_client.sources.transport import DiscoveryHandler, Subscription, Transport
from sidecar.config.control_plane import SourceSpec
from sidecar.core.backoff import Backoff

log = logging.getLogger("sidecar.xds.rest")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class RestTransport(Transport):
    kind = "rest"

    def __init__(self, spec: SourceSpec, handler: DiscoveryHandler,
                 endpoints: list[tuple[str, int]], ssl_context: ssl.SSLContext | None = None, *,
                 backoff: tuple[float, float], user_agent: str = "pysidecar"):
        super().__init__(spec, handler, backoff=backoff)
        if not endpoints:
            raise ValueError(f"no endpoints for control-plane source {self.name}")
        self.endpoints = list(endpoints)
        self.ssl = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self._ep = 0
        self._session: aiohttp.ClientSession | None = None
        self._wake: dict[str, asyncio.Event] = {}
        self._polls: dict[str, int] = {}
        self._not_modified: dict[str, int] = {}
        self.user_agent = user_agent

    # ---- subscriptions -------------------------------------------------------------------
    def subscribe(self, type_url: str, names: Subscription) -> None:
        old = self.subscriptions.get(type_url, frozenset() if type_url in BY_NAME else None)
        if type_url in self.subscriptions and old == names:
            return
        self.subscriptions[type_url] = names
        if type_url in BY_NAME and names != old:
            # new names: ask for everything again, so a version-only 304 cannot hide them
            self.versions.pop(type_url, None)
            self.rejected.pop(type_url, None)
        ev = self._wake.get(type_url)
        if ev is None:
            ev = self._wake[type_url] = asyncio.Event()
            if self._session is not None:
                self._tasks.append(asyncio.get_running_loop().create_task(self._poll_loop(type_url)))
        ev.set()

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=8, ssl=self.ssl if self.ssl is not None else False),
            headers={"user-agent": self.user_agent, "content-type": "application/json"})
        loop = asyncio.get_running_loop()
        for t in list(self._wake):
            self._tasks.append(loop.create_task(self._poll_loop(t)))

    async def close(self) -> None:
        await super().close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- polling -------------------------------------------------------------------------
    def _url(self, type_url: str) -> str:
        host, port = self.endpoints[self._ep % len(self.endpoints)]
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{port}{REST_PATH[type_url]}"

    async def _poll_loop(self, type_url: str) -> None:
        backoff = Backoff(*self.backoff_cfg)
        wake = self._wake[type_url]
        while not self._closed:
            names = self.subscriptions.get(type_url)
            if names is not None and not names:
                # nothing to ask for (no listener needs RDS / no cluster needs EDS)
                wake.clear()
                await wake.wait()
                continue
            wake.clear()
            try:
                ok = await self._poll_once(type_url, names)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure is a failed poll
                log.exception("xDS REST %s poll crashed", short(type_url))
                self.failed(type_url, f"internal error: {e!r}")
                ok = False
            if ok:
                backoff.reset()
                delay = self.spec.refresh_delay_s
            else:
                self._ep += 1                  # try the next control-plane endpoint
                delay = backoff.next()
            try:
                await asyncio.wait_for(wake.wait(), delay)
            except TimeoutError:
                pass

    async def _poll_once(self, type_url: str, names: Subscription) -> bool:
        session = self._session
        if session is None:               # closed meanwhile
            return False
        version = self.versions.get(type_url, "")
        body = {"version_info": version, "node": self.handler.node,
                "resource_names": sorted(names) if names else [], "type_url": type_url}
        url = self._url(type_url)
        self._polls[type_url] = self._polls.get(type_url, 0) + 1
        try:
            async with session.post(
                    url, data=json.dumps(body),
                    timeout=aiohttp.ClientTimeout(total=self.spec.request_timeout_s)) as r:
                if r.status == 304:
                    self.connected = True
                    self.last_ok_at = time.time()
                    self._not_modified[type_url] = self._not_modified.get(type_url, 0) + 1
                    self.handler.on_contact(self, type_url)
                    return True
                if r.status != 200:
                    text = (await r.content.read(300)).decode("utf-8", "replace").strip()
                    self.connected = False
                    self.failed(type_url, f"{url}: HTTP {r.status}" + (f": {text}" if text else ""))
                    return False
                if r.content_length is not None and r.content_length > MAX_RESPONSE_BYTES:
                    self.failed(type_url, f"{url}: response too large ({r.content_length} bytes)")
                    return False
                raw = await r.read()
        except TimeoutError:
            self.connected = False
            self.failed(type_url, f"{url}: timed out after {self.spec.request_timeout_s}s")
            return False
        except aiohttp.ClientError as e:
            self.connected = False
            self.failed(type_url, f"{url}: {e.__class__.__name__}: {e}")
            return False
        self.connected = True
        self.last_ok_at = time.time()
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.failed(type_url, f"{url}: response is not JSON: {e}")
            return False
        if not isinstance(doc, dict):
            self.failed(type_url, f"{url}: response is not a DiscoveryResponse object")
            return False
        new_version = doc.get("version_info", "")
        if not isinstance(new_version, str):
            new_version = str(new_version)
        resources = doc.get("resources") or []
        rt = doc.get("type_url")
        if rt and rt != type_url:
            self.failed(type_url, f"{url}: response type_url {rt} is not {type_url}")
            return False
        if new_version and new_version == self.rejected.get(type_url):
            # Envoy's REST NACK: keep the last good version; do not re-validate the same bad one
            self.handler.on_contact(self, type_url)
            return True
        if not isinstance(resources, list):
            resources = [resources]
        err = await self.handler.on_response(self, type_url, new_version, resources)
        if self.subscriptions.get(type_url) != names:
            return True        # the names changed meanwhile: ask again from scratch
        self.record(type_url, new_version, err)
        return True

    def dump(self) -> dict[str, object]:
        d = super().dump()
        d["endpoints"] = [f"{h}:{p}" for h, p in self.endpoints]
        d["refresh_delay_s"] = self.spec.refresh_delay_s
        d["polls"] = {short(t): n for t, n in self._polls.items()}
        d["not_modified"] = {short(t): n for t, n in self._not_modified.items()}
        d["rejected_versions"] = {short(t): v for t, v in self.rejected.items()}
        return d
