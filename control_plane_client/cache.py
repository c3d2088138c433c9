"""Last-known-good cache: the xDS resources of every accepted snapshot, on local disk.

One JSON file per node (``xds-lkg-<node id>.json``)::

    {"format": "pysidecar-xds-lkg", "format_version": 1, "generation": 42,
     "saved_at": 1700000000.0, "node_id": "sidecar-1",
     "versions": {"lds": "...", "cds": "...", "rds": "...", "eds": "..."},
     "resources": {"<type url>": [{"name": ..., "version": ..., "resource": {...}}, ...]},
     "sha256": "<hex digest of the canonical JSON of everything above>"}

Writes are atomic (temp file in the same directory, fsync, rename, fsync of the directory), so
a crash leaves the old file or the new one, never half of one. On load, a file whose format,
version, node or checksum does not match is refused (``CacheError``), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from typing import Any

FORMAT = "pysidecar-xds-lkg"
FORMAT_VERSION = 1
MAX_BYTES = 64 * 1024 * 1024


class CacheError(Exception):
    """The cache file exists but cannot be trusted."""


def default_cache_dir() -> str:
    env = os.environ.get("SIDECAR_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pysidecar")


def cache_file_name(node_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node_id or "default")[:100]
    return f"xds-lkg-{safe}.json"


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(_canonical(body)).hexdigest()


class LkgCache:
    def __init__(self, path: str, node_id: str):
        self.path = path
        self.node_id = node_id
        self.generation = 0
        self.last_saved_at = 0.0
        self.last_error = ""

    # ---- write ---------------------------------------------------------------------------
    def encode(self, versions: dict[str, str],
               resources: dict[str, list[dict[str, object]]]) -> bytes:
        self.generation += 1
        doc: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generation": self.generation,
            "saved_at": time.time(), "node_id": self.node_id, "versions": versions,
            "resources": resources,
        }
        doc["sha256"] = _digest(doc)
        return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode()

    def write(self, data: bytes) -> None:
        """Atomic replace (blocking: run it in an executor)."""
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".xds-lkg-", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        self.last_saved_at = time.time()

    # ---- read ----------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        """The verified document, None if there is no cache file; CacheError if it is bad."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheError(f"cannot stat {self.path}: {e.strerror}") from None
        if st.st_size > MAX_BYTES:
            raise CacheError(f"{self.path} is {st.st_size} bytes (limit {MAX_BYTES})")
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise CacheError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(f"{self.path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CacheError(f"{self.path}: not a {FORMAT} file")
        if doc.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{self.path}: format_version {doc.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}")
        if doc.get("sha256") != _digest(doc):
            raise CacheError(f"{self.path}: checksum mismatch (file corrupted or edited)")
        if doc.get("node_id") != self.node_id:
            raise CacheError(f"{self.path}: saved for node {doc.get('node_id')!r}, this node is "
                             f"{self.node_id!r}")
        res = doc.get("resources")
        if not isinstance(res, dict) or not all(isinstance(v, list) for v in res.values()):
            raise CacheError(f"{self.path}: resources must map type URLs to lists")
        gen = doc.get("generation")
        if isinstance(gen, int):
            self.generation = max(self.generation, gen)
        return doc
