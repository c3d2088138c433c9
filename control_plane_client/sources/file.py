"""File source: xDS resources from a watched file or directory (Envoy's ``path_config_source``).

A file is YAML or JSON holding either a DiscoveryResponse (``{version_info, resources: [...]}``,
Envoy's format for ``path_config_source``), a list of resources, or one resource. Every resource
carries its ``@type`` (or takes the response's ``type_url``). A directory is every ``*.yaml``,
``*.yml`` and ``*.json`` file in it (not recursive; dot-files are skipped), so one directory can
hold listeners, routes, clusters and endpoints together.

The path is polled (stat: mtime, size, inode) every ``poll_interval``: this sees atomic renames
and Kubernetes ConfigMap symlink swaps on every filesystem. A change is read, then delivered per
type through the same validation and swap as the network sources; a file that does not parse
rejects the update (the old config keeps serving).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os

import yaml

from control_plane_client.resources import ORDER, resource_name, short
from control_plane_client.sources.transport import DiscoveryHandler, Subscription, Transport
from sidecar.config.control_plane import SourceSpec

log = logging.getLogger("sidecar.xds.file")

_EXTS = (".yaml", ".yml", ".json")


class FileFormatError(Exception):
    pass


FileSignature = tuple[tuple[object, ...], ...]
"""What a poll compares: (file, mtime, size, inode) of every file (or the error)."""


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path)
                      if n.endswith(_EXTS) and not n.startswith("."))
    return [path]


def signature(path: str) -> FileSignature:
    out: list[tuple[object, ...]] = []
    try:
        files = _files(path)
    except OSError as e:
        return (("error", str(e)),)
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((f, None))
    return tuple(out)


FileResources = dict[str, tuple[list[dict[str, object]], str | None]]
"""type_url -> (resources, version_info when a single file gave one for that type)."""


def read_resources(path: str) -> FileResources:
    """type_url -> (resources, version_info when a single file gave one for that type)."""
    by_type: dict[str, list[dict[str, object]]] = {}
    versions: dict[str, list[str | None]] = {}
    try:
        files = _files(path)
    except OSError as e:
        raise FileFormatError(f"{path}: {e.strerror}") from None
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            raise FileFormatError(f"{f}: {e.strerror}") from None
        try:
            doc = json.loads(text) if f.endswith(".json") else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise FileFormatError(f"{f}: not valid YAML/JSON: {e}") from None
        if doc is None:
            continue
        version = None
        default_type = None
        items: object
        if isinstance(doc, dict) and "resources" in doc and "@type" not in doc:
            extra = set(doc) - {"version_info", "resources", "type_url", "nonce"}
            if extra:
                raise FileFormatError(f"{f}: unknown DiscoveryResponse field(s) {sorted(extra)}")
            version = doc.get("version_info")
            default_type = doc.get("type_url")
            items = doc.get("resources") or []
        elif isinstance(doc, list):
            items = doc
        else:
            items = [doc]
        if not isinstance(items, list):
            raise FileFormatError(f"{f}: resources must be a list")
        seen_types: set[str] = set()
        for i, r in enumerate(items):
            if not isinstance(r, dict):
                raise FileFormatError(f"{f}: resources[{i}] must be a mapping")
            t = r.get("@type") or default_type
            if t == "type.googleapis.com/envoy.service.discovery.v3.Resource":
                inner = r.get("resource")
                t = inner.get("@type") if isinstance(inner, dict) else None
            if not t or not isinstance(t, str):
                raise FileFormatError(f"{f}: resources[{i}] has no @type")
            if "@type" not in r:
                r = {**r, "@type": t}
            by_type.setdefault(t, []).append(r)
            seen_types.add(t)
        for t in seen_types:
            versions.setdefault(t, []).append(str(version) if version is not None else None)
    out: FileResources = {}
    for t, typed in by_type.items():
        vs = versions.get(t, [])
        out[t] = (typed, vs[0] if len(vs) == 1 else None)
    return out


def content_version(items: list[dict[str, object]]) -> str:
    h = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
    return f"sha256:{h[:16]}"


def _name(type_url: str, r: dict[str, object]) -> str:
    """A resource's name, looking inside a discovery ``Resource`` envelope."""
    inner = r.get("resource", r)
    return resource_name(type_url, inner) if isinstance(inner, dict) else ""


class FileTransport(Transport):
    kind = "file"

    def __init__(self, spec: SourceSpec, handler: DiscoveryHandler, *, poll_interval: float = 0.5,
                 backoff: tuple[float, float] = (0.5, 30.0)):
        super().__init__(spec, handler, backoff=backoff)
        self.path = spec.path
        self.poll_interval = poll_interval
        self._sig: FileSignature | None = None
        self._content: FileResources | None = None
        # type -> (version, names) last delivered
        self._delivered: dict[str, tuple[str, Subscription]] = {}
        self._wake = asyncio.Event()
        self.loads = 0

    def subscribe(self, type_url: str, names: Subscription) -> None:
        if type_url in self.subscriptions and self.subscriptions[type_url] == names:
            return
        self.subscriptions[type_url] = names
        self._wake.set()

    def start(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._run()))

    async def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.exception("file source %s: check failed", self.path)
                self.failed(None, f"internal error: {e!r}")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass

    async def _check(self) -> None:
        sig = signature(self.path)
        if sig != self._sig:
            # let a writer finish: the change must hold still for a moment
            await asyncio.sleep(min(0.05, self.poll_interval))
            again = signature(self.path)
            if again != sig:
                return
            self._sig = sig
            self.loads += 1
            try:
                if not os.path.exists(self.path):
                    raise FileFormatError(f"{self.path}: does not exist")
                self._content = read_resources(self.path)
            except FileFormatError as e:
                self._content = None
                self.connected = False
                msg = str(e)
                log.error("file source %s: %s (keeping the running config)", self.path, msg)
                for t in ORDER:
                    if t in self.subscriptions:
                        await self.handler.on_response(self, t, "", [], error=msg)
                self.failed(None, msg)
                return
            self.connected = True
        if self._content is None:
            return
        for t in ORDER:
            if t not in self.subscriptions:
                continue
            names = self.subscriptions[t]
            items, given = self._content.get(t, ([], None))
            if names is not None:
                if not names:
                    continue
                items = [r for r in items if _name(t, r) in names]
            version = given or content_version(items)
            key = (version, names)
            if self._delivered.get(t) == key:
                continue
            self._delivered[t] = key
            err = await self.handler.on_response(self, t, version, list(items))
            self.record(t, version, err)
        self.handler.on_contact(self, None)

    def dump(self) -> dict[str, object]:
        d = super().dump()
        d["path"] = self.path
        d["loads"] = self.loads
        d["rejected_versions"] = {short(t): v for t, v in self.rejected.items()}
        return d
