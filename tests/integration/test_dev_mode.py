"""``sidecar dev``: tiny config, reload on save (errors shown, last good config kept), coloured
request log, admin on loopback only."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml

from sidecar.cli.dev import dev_snapshot
from sidecar.config.errors import ConfigErrors
from sidecar.testing import Upstream, free_port, wait_for_port
from tests.paths import REPO

ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---- the tiny format ------------------------------------------------------------------------------

def test_tiny_config_becomes_a_native_snapshot():
    text = """
port: 12345
routes:
  /: localhost:3000
  /api: [127.0.0.1:8081, 127.0.0.1:8082]
  /auth: {to: "http://127.0.0.1:9000", timeout: 2s, retry: {retries: 2}}
  /ext: https://api.example.com
  /health: {status: 200, body: ok}
"""
    snap, notes = dev_snapshot(text, "dev.yaml")
    assert notes == []
    (lst,) = snap.listeners
    assert (lst.host, lst.port) == ("127.0.0.1", 12345)
    assert lst.access_log[0].format == "dev"
    prefixes = [r.match.prefix for r in lst.route_config.virtual_hosts[0].routes]
    assert prefixes == ["/health", "/auth", "/api", "/ext", "/"]      # longest prefix first
    clusters = {c.name: c for c in snap.clusters}
    assert [e.address for e in clusters["api"].endpoints] == ["127.0.0.1:8081", "127.0.0.1:8082"]
    assert [e.address for e in clusters["auth"].endpoints] == ["127.0.0.1:9000"]
    assert clusters["ext"].tls.sni == "api.example.com" and clusters["ext"].tls.check_hostname
    assert [e.address for e in clusters["ext"].endpoints] == ["api.example.com:443"]
    auth = lst.route_config.virtual_hosts[0].routes[1]
    assert auth.action.timeout_s == 2.0 and auth.action.retry_policy.num_retries == 2
    assert (snap.admin.host, snap.admin.port) == ("127.0.0.1", 9901)


@pytest.mark.parametrize("text, errors", [
    ("routes: {/api: nohost}", ["routes./api: must be host:port or http(s)://host[:port], got 'nohost'"]),
    ("routes: {api: 'a:1'}", ["routes.api: a route key is a path prefix starting with /"]),
    ("prot: 1\nroutes: {/: 'a:1'}", ["prot: unknown field (the tiny dev config has port, address, "
                                     "admin_port and routes; for more, write a native config with listeners:)"]),
    ("routes: {/a: {to: 'a:1', timeout: soon}}", None),
    ("routes: {/a: {to: 'a:1', retry: {retries: -1}}}", None),
    ("port: 1\n", ["routes: is required"]),
    ("routes: [\n", None),
])
def test_tiny_config_errors_point_at_what_the_user_wrote(text, errors):
    with pytest.raises(ConfigErrors) as e:
        dev_snapshot(text, "dev.yaml")
    got = [str(x) for x in e.value.errors]
    if errors is not None:
        assert got == errors
    elif "soon" in text:
        assert len(got) == 1 and got[0].startswith("routes./a.timeout:"), got
    elif "retries" in text:
        assert len(got) == 1 and got[0].startswith("routes./a.retry.retries:"), got
    else:
        assert "not valid YAML" in got[0] and "line" in got[0]


def test_native_config_in_dev_mode_keeps_admin_on_loopback():
    cfg = {"admin": {"address": "0.0.0.0", "port": 9000},
           "listeners": [{"name": "l", "port": 0, "routes": [{"match": {"prefix": "/"},
                                                             "direct_response": {"status": 200}}]}]}
    snap, notes = dev_snapshot(yaml.safe_dump(cfg), "dev.yaml")
    assert snap.admin.host == "127.0.0.1" and snap.admin.port == 9000
    assert notes and "loopback" in notes[0]
    assert snap.listeners[0].access_log[0].format == "dev"
    envoy = {"admin": {"address": {"socket_address": {"address": "0.0.0.0", "port_value": 9000}}},
             "static_resources": {"listeners": [], "clusters": []}}
    snap, notes = dev_snapshot(yaml.safe_dump(envoy), "envoy.yaml")
    assert snap.admin.host == "127.0.0.1" and notes


# ---- the dev proxy, end to end -----------------------------------------------------------------

class DevProcess:
    def __init__(self, tmp_path, text: str, *args: str):
        self.path = tmp_path / "sidecar.dev.yaml"
        self.path.write_text(text)
        self.out_path = tmp_path / "out.log"
        self._out = open(self.out_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "dev", str(self.path), *args],
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.out_path.read_text()

    def save(self, text: str) -> None:
        tmp = str(self.path) + ".swp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    async def wait_output(self, needle: str, timeout: float = 5.0, start: int = 0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.output()
            if needle in ANSI.sub("", out[start:]):
                return out
            await asyncio.sleep(0.05)
        raise AssertionError(f"{needle!r} not in output:\n{self.output()}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._out.close()
        return rc


async def get(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.text()


async def test_dev_proxy_reloads_on_save_and_keeps_last_good_config(tmp_path):
    port, admin = free_port(), free_port()
    async with Upstream(name="api") as api, Upstream(name="web") as web:
        tiny = f"port: {port}\nadmin_port: {admin}\nroutes:\n  /api: {api.address}\n  /: {web.address}\n"
        dev = DevProcess(tmp_path, tiny, "--color", "always")
        try:
            await asyncio.to_thread(wait_for_port, port, 15)
            out = await dev.wait_output("watching")
            assert f"listening on http://127.0.0.1:{port}" in ANSI.sub("", out)
            status, body = await get(f"http://127.0.0.1:{port}/api/users")
            assert status == 200 and api.requests[-1].path == "/api/users"
            # the coloured request log line: time, green status, method, path -> cluster (host)
            out = await dev.wait_output("GET    /api/users")
            line = next(l for l in out.splitlines() if "/api/users" in l)
            assert "\x1b[32m200\x1b[0m" in line
            assert f"-> api ({api.address})" in ANSI.sub("", line)
            assert (await get(f"http://127.0.0.1:{port}/missing"))[0] == 200    # -> web
            # a broken save: errors with paths, and the old config keeps serving
            mark = len(dev.output())
            dev.save(tiny + "  /new: nohost\n  /bad: {to: 'x:1', timeout: later}\n")
            out = await dev.wait_output("still serving the last good config", start=mark)
            tail = ANSI.sub("", out[mark:])
            assert "2 error(s)" in tail
            assert "routes./new: must be host:port" in tail
            assert "routes./bad.timeout:" in tail
            assert (await get(f"http://127.0.0.1:{port}/api/x"))[0] == 200
            # a YAML syntax error is reported with its line
            mark = len(dev.output())
            dev.save("port: [\n")
            out = await dev.wait_output("still serving", start=mark)
            assert "line" in out[mark:]
            # a good save is applied: a new route appears
            mark = len(dev.output())
            dev.save(tiny + "  /hello: {status: 200, body: hi}\n")
            await dev.wait_output("reloaded", start=mark)
            assert await get(f"http://127.0.0.1:{port}/hello") == (200, "hi")
            assert (await get(f"http://127.0.0.1:{port}/api/y"))[0] == 200
        finally:
            assert dev.stop() == 0


async def test_dev_admin_is_loopback_only_and_bad_start_waits_for_a_fix(tmp_path):
    port, admin = free_port(), free_port()
    cfg = {"admin": {"address": "0.0.0.0", "port": admin},
           "listeners": [{"name": "l", "address": "127.0.0.1", "port": port,
                          "routes": [{"match": {"prefix": "/"}, "cluster": "nope"}]}]}
    dev = DevProcess(tmp_path, yaml.safe_dump(cfg), "--color", "never")
    try:
        out = await dev.wait_output("waiting for a good save", timeout=10)
        assert "unknown cluster 'nope'" in out
        cfg["listeners"][0]["routes"][0] = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": "fixed"}}
        dev.save(yaml.safe_dump(cfg))
        await dev.wait_output("loaded", timeout=10)
        await asyncio.to_thread(wait_for_port, port, 15)
        await asyncio.to_thread(wait_for_port, admin, 15)
        assert await get(f"http://127.0.0.1:{port}/") == (200, "fixed")
        out = dev.output()
        assert "admin address 0.0.0.0 -> 127.0.0.1" in out
        assert "\x1b[" not in out                                  # --color never
        # admin answers on 127.0.0.1 but not on another loopback address (not bound to 0.0.0.0)
        assert (await get(f"http://127.0.0.1:{admin}/ready"))[0] == 200
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.2", admin)) != 0
    finally:
        assert dev.stop() == 0


def test_dev_init_and_missing_config(tmp_path):
    path = tmp_path / "sidecar.dev.yaml"
    r = subprocess.run([sys.executable, "-m", "sidecar", "dev", str(path)], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 2 and "sidecar dev --init" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sidecar", "dev", "--init", str(path)], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 0 and path.exists()
    snap, _ = dev_snapshot(path.read_text(), str(path))
    assert snap.listeners[0].port == 10000
    r = subprocess.run([sys.executable, "-m", "sidecar", "dev", "--init", str(path)], capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 1


def test_dev_example_config():
    root = str(REPO)
    path = os.path.join(root, "examples", "dev", "sidecar.dev.yaml")
    with open(path) as f:
        snap, notes = dev_snapshot(f.read(), path)
    routes = snap.listeners[0].route_config.virtual_hosts[0].routes
    assert [r.match.prefix for r in routes] == ["/health", "/auth", "/api", "/"]
    assert snap.listeners[0].port == 10000 and snap.admin.host == "127.0.0.1"
    assert {c.name for c in snap.clusters} == {"auth", "api", "root"}
