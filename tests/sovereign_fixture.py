"""A real sovereign xDS control plane (REST/JSON), started by the tests on 127.0.0.1.

It runs from a copy of ``shared/controlplane/sovereign`` (the verified setup beside the
repository) in a temp dir, with ``@DIR@`` replaced, the listener port the templates render set to
a free port, and ``services.yaml`` written by the test. The binary comes from ``SOVEREIGN_BIN``,
``/opt/sovereign-venv/bin/sovereign`` (what ``.ci/install-sovereign.sh`` installs) or ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from sidecar.testing import free_port, stop_process

REPO = Path(__file__).resolve().parents[1]


def sovereign_dir() -> Path | None:
    env = os.environ.get("SOVEREIGN_CONFIG_DIR")
    cands = [Path(env)] if env else []
    cands += [REPO.parent / "shared" / "controlplane" / "sovereign",
              Path("/work/shared/controlplane/sovereign")]
    for c in cands:
        if (c / "sovereign.yaml").is_file():
            return c
    return None


def sovereign_bin() -> str | None:
    for c in (os.environ.get("SOVEREIGN_BIN"), "/opt/sovereign-venv/bin/sovereign",
              shutil.which("sovereign")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def skip_reason() -> str | None:
    if sovereign_bin() is None:
        return ("sovereign is not installed (run .ci/install-sovereign.sh, or set SOVEREIGN_BIN)")
    if sovereign_dir() is None:
        return "shared/controlplane/sovereign (the sovereign test setup) is not beside the repo"
    return None


requires_sovereign = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def service(name: str, endpoints: list[int], domains: list[str] | None = None,
            prefix: str = "/") -> dict:
    return {"name": name, "service_clusters": ["*"], "domains": domains or ["*"],
            "prefix": prefix, "endpoints": [{"address": "127.0.0.1", "port": p} for p in endpoints]}


class Sovereign:
    def __init__(self, tmpdir: str | Path, services: list[dict] | None, listen_port: int,
                 port: int | None = None, refresh_rate: float = 1,
                 src: Path | None = None):
        self.dir = Path(tmpdir) / "sovereign"
        self.port = port or free_port()
        self.listen_port = listen_port
        self.proc: subprocess.Popen | None = None
        src = src or sovereign_dir()
        shutil.copytree(src, self.dir)
        for p in self.dir.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
                text = p.read_text()
                if "@DIR@" in text:
                    p.write_text(text.replace("@DIR@", str(self.dir)))
        cfg = yaml.safe_load((self.dir / "sovereign.yaml").read_text())
        cfg["template_context"]["context"]["listen_port"]["path"] = str(listen_port)
        cfg["source_config"]["refresh_rate"] = refresh_rate
        (self.dir / "sovereign.yaml").write_text(yaml.safe_dump(cfg))
        if services is not None:
            self.set_services(services)
        self.log_path = self.dir / "sovereign.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_services(self, services: list[dict]) -> None:
        tmp = self.dir / ".services.yaml.tmp"
        tmp.write_text(yaml.safe_dump(services))
        os.replace(tmp, self.dir / "services.yaml")

    def start(self, timeout: float = 20.0) -> "Sovereign":
        env = dict(os.environ)
        env.update(SOVEREIGN_CONFIG=f"file://{self.dir}/sovereign.yaml", SOVEREIGN_HOST="127.0.0.1",
                   SOVEREIGN_PORT=str(self.port), SOVEREIGN_WORKERS="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sovereign_bin()], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sovereign exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.address}/healthcheck", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"sovereign did not answer /healthcheck in {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def bootstrap(self, node_id: str = "sidecar-1", refresh_delay: str = "0.3s",
                  admin_port: int = 0) -> dict:
        """The shared Envoy bootstrap, pointed at this sovereign (as a sidecar or Envoy uses it)."""
        b = yaml.safe_load((self.dir / "envoy-bootstrap.yaml").read_text())
        b["node"]["id"] = node_id
        b["admin"]["address"]["socket_address"]["port_value"] = admin_port
        for k in ("cds_config", "lds_config"):
            b["dynamic_resources"][k]["api_config_source"]["refresh_delay"] = refresh_delay
        ep = b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        ep["endpoint"]["address"]["socket_address"]["port_value"] = self.port
        return b
