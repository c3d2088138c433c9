"""The client's use of the last-known-good cache (the file itself: ``cache.py``).

Every accepted update is written in the background (the latest one wins when writes queue up);
at start, when no source answered within the initial fetch timeout, the client loads the file
and serves it, and says so in ``/ready``, ``/config_dump``, logs and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from control_plane_client.cache import LkgCache, cache_file_name, default_cache_dir
from control_plane_client.metrics import XdsMetrics
from sidecar.config.control_plane import ControlPlaneConfig

log = logging.getLogger("sidecar.xds")


def open_cache(cfg: ControlPlaneConfig, node_id: str, cache_dir: str | None) -> LkgCache | None:
    """The cache file of this node; None when the cache is disabled. ``cache_dir``: the
    process default (``--cache-dir``), used when the config names none."""
    if not cfg.cache_enabled:
        return None
    d = cfg.cache_dir or cache_dir or default_cache_dir()
    return LkgCache(os.path.join(d, cache_file_name(node_id)), node_id)


class LastKnownGood:
    def __init__(self, cache: LkgCache | None, metrics: XdsMetrics) -> None:
        self.cache = cache
        self.metrics = metrics
        self.status = "disabled" if cache is None else "empty"
        self.error = ""                   # why the file was refused
        self.active = False               # serving resources loaded from the cache
        self.loaded_at = 0.0
        self.tried = False                # loading was attempted (once per process)
        self._pending: bytes | None = None
        self._writer: asyncio.Task[None] | None = None

    # ---- writing ------------------------------------------------------------------------------
    def save(self, versions: dict[str, str], resources: dict[str, list[dict[str, object]]]) -> None:
        """Persist the accepted resources (in the background)."""
        if self.cache is None or self.active:
            # while serving from the cache, the file already holds exactly that
            return
        self._pending = self.cache.encode(versions, resources)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(self.cache))

    async def _write_loop(self, cache: LkgCache) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending is not None:
                data, self._pending = self._pending, None
                try:
                    await loop.run_in_executor(None, cache.write, data)
                    self.status = "saved"
                    self.metrics.lkg_saves.labels("ok").inc()
                except OSError as e:
                    self.status = f"save failed: {e}"
                    log.error("control plane: cannot write the last-known-good cache %s: %s",
                              cache.path, e)
                    self.metrics.lkg_saves.labels("error").inc()
        finally:
            self._writer = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except BaseException:  # noqa: BLE001 - it was cancelled or had failed
                pass

    # ---- loading ------------------------------------------------------------------------------
    def missing(self) -> None:
        self.status = "missing"
        self.metrics.lkg_loads.labels("missing").inc()

    def refused(self, error: str) -> None:
        self.error = error
        self.status = f"refused: {error}"
        self.metrics.lkg_loads.labels("refused").inc()

    def loaded(self, saved_at: float, generation: object) -> None:
        """The cached resources serve now."""
        self.active = True
        self.loaded_at = time.time()
        if self.cache is not None:
            self.cache.last_saved_at = saved_at
        self.status = f"loaded (generation {generation})"
        self.metrics.lkg_loads.labels("loaded").inc()
        self.metrics.lkg_active.set(1)

    def replaced(self) -> None:
        """The control plane answered: its config replaces the cached one."""
        self.active = False
        self.metrics.lkg_active.set(0)

    # ---- visibility ---------------------------------------------------------------------------
    def saved_ago(self) -> float:
        saved = (self.cache.last_saved_at if self.cache is not None else 0.0) or self.loaded_at
        return time.time() - saved

    def describe(self) -> dict[str, object]:
        c = self.cache
        return {
            "enabled": c is not None,
            "path": c.path if c else None,
            "status": self.status,
            "serving_from_cache": self.active,
            "generation": c.generation if c else None,
            "last_saved_at": (c.last_saved_at or None) if c else None,
        }
