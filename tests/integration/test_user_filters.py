"""User filters through real traffic: the three examples (native YAML in-process, Envoy format
in a child process), a filter that raises (500 FE for that request only), one that blocks the
loop (the watchdog names it), reloading a changed module (a broken version is refused), and
``sidecar validate`` errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar.testing import ProxyProcess, Upstream, free_port, native_config, running_proxy
from tests.jwt_helpers import AUDIENCE, ISSUER, jwks, mint, public_jwk, rsa_key
from tests.paths import REPO

EXAMPLES = REPO / "examples" / "filters"


async def app_handler(request: web.Request) -> web.StreamResponse:
    """The upstream app: echoes what it got, plus a field the JSON filter must redact."""
    body = await request.read()
    return web.json_response({"headers": {k.lower(): v for k, v in request.headers.items()},
                              "body": body.decode(), "password": "hunter2"})


async def auth_handler(request: web.Request) -> web.StreamResponse:
    """The auth service the AuthServiceRule example asks: alice may write, nobody else."""
    q = await request.json()
    return web.json_response({"allow": q["user"] == "alice", "reason": f"{q['user']} may not"})


def jwt_native() -> dict:
    return {"jwt_authn": {"providers": {"idp": {
        "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": jwks(public_jwk(rsa_key("a"), "k1"))}},
        "rules": [{"match": {"prefix": "/"}, "requires": "idp"}]}}


def example_filters(module_dir: Path | str) -> list[dict]:
    d = str(module_dir)
    return [
        {"python": {"name": "claims", "module": f"{d}/claim_header.py", "class": "ClaimHeader",
                    "config": {"claim": "sub", "header": "x-user"}}},
        {"python": {"name": "auth-rule", "module": f"{d}/auth_rule.py", "class": "AuthServiceRule",
                    "config": {"cluster": "auth", "methods": ["POST"], "timeout": "1s"}}},
        {"python": {"name": "json", "module": f"{d}/json_transform.py", "class": "JsonTransform",
                    "config": {"set": {"source": "edge"}, "redact": ["password"]}}},
    ]


async def check_examples(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        alice = {"Authorization": "Bearer " + mint(sub="alice"), "x-user": "mallory"}
        async with s.post(url + "/orders", json={"item": 1}, headers=alice) as r:
            assert r.status == 200
            got = await r.json()
        assert got["headers"]["x-user"] == "alice"                     # from the claim
        assert json.loads(got["body"]) == {"item": 1, "source": "edge"}   # request transformed
        assert "password" not in got                                      # response redacted
        bob = {"Authorization": "Bearer " + mint(sub="bob")}
        async with s.post(url + "/orders", json={}, headers=bob) as r:
            assert (r.status, await r.text()) == (403, "bob may not")
        async with s.get(url + "/orders", headers=bob) as r:             # GET is not guarded
            assert r.status == 200


async def test_examples_native_yaml_through_the_proxy():
    async with Upstream(app_handler) as app, Upstream(auth_handler, name="auth") as auth:
        cfg = native_config(clusters={"app": [app.address], "auth": [auth.address]},
                            filters=[jwt_native(), *example_filters(EXAMPLES)],
                            routes=[{"match": {"prefix": "/"}, "cluster": "app"}])
        async with running_proxy(cfg) as proxy:
            await check_examples(proxy.url(""))
        assert len(auth.requests) == 2                 # asked through the auth cluster


def envoy_bootstrap(listen: int, admin: int, app: str, auth: str, filters: list[dict]) -> dict:
    def cluster(name: str, address: str) -> dict:
        host, port = address.split(":")
        return {"name": name, "connect_timeout": "1s", "load_assignment": {
            "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": int(port)}}}}]}]}}

    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "in",
           "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "app"}}]}]},
           "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "in", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                    "typed_config": hcm}]}]}],
                "clusters": [cluster("app", app), cluster("auth", auth)]}}


def python_entry(name: str, module: str, cls: str, config: dict) -> dict:
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/pysidecar.filter.v1.PythonFilter",
        "module": module, "class": cls, "config": config}}


async def test_examples_envoy_format_in_a_child_process(tmp_path):
    # the modules sit beside the config file and are named by relative paths
    shutil.copytree(EXAMPLES, tmp_path / "filters", ignore=shutil.ignore_patterns("__pycache__"))
    jwt_filter = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"idp": {"issuer": ISSUER, "audiences": [AUDIENCE], "local_jwks": {
            "inline_string": json.dumps(jwks(public_jwk(rsa_key("a"), "k1")))}}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}]}}
    async with Upstream(app_handler) as app, Upstream(auth_handler, name="auth") as auth:
        listen, admin = free_port(), free_port()
        doc = envoy_bootstrap(listen, admin, app.address, auth.address, [
            jwt_filter,
            python_entry("claims", "filters/claim_header.py", "ClaimHeader",
                         {"claim": "sub", "header": "x-user"}),
            python_entry("auth-rule", "filters/auth_rule.py", "AuthServiceRule",
                         {"cluster": "auth", "methods": ["POST"], "timeout": "1s"}),
            python_entry("json", "filters/json_transform.py", "JsonTransform",
                         {"set": {"source": "edge"}, "redact": ["password"]})])
        path = tmp_path / "envoy.yaml"
        path.write_text(yaml.safe_dump(doc))
        proc = ProxyProcess(str(path), str(tmp_path))
        await asyncio.to_thread(proc.start, listen)
        try:
            await check_examples(f"http://127.0.0.1:{listen}")
        finally:
            proc.stop()


FLAKY = '''
import time
from sidecar import sdk

class Flaky(sdk.UserFilter):
    async def __call__(self, req, next):
        if req.path == "/raise":
            raise ValueError("bad input in the filter")
        if req.path == "/block":
            time.sleep(0.4)          # blocks the event loop: the watchdog must name us
        return await next(req)
'''


async def test_a_raising_filter_answers_500_and_a_blocking_one_is_reported(tmp_path, caplog):
    mod = tmp_path / "flaky.py"
    mod.write_text(FLAKY)
    caplog.set_level(logging.WARNING)
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            filters=[{"python": {"name": "flaky", "module": str(mod),
                                                 "class": "Flaky"}}],
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, loop_lag_threshold=0.15) as proxy:
            metric = proxy.app.metrics.registry.get_sample_value
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    async with s.get(proxy.url("/raise")) as r:
                        assert (r.status, await r.text()) == (500, "filter error")
                async with s.get(proxy.url("/fine")) as r:
                    assert r.status == 200                # the worker is still serving
                async with s.get(proxy.url("/block")) as r:
                    assert r.status == 200
                await asyncio.sleep(0.2)                  # the heartbeat after the stall
            assert metric("sidecar_filter_errors_total", {"filter": "flaky"}) == 3
            assert metric("sidecar_event_loop_blocked_total", {"filter": "flaky"}) == 1
    assert any("filter flaky raised" in r.getMessage() for r in caplog.records)
    blocked = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert blocked and "by filter flaky at" in blocked[0] and "flaky.py:10" in blocked[0]


TAGGER = '''
from sidecar import sdk

class Tagger(sdk.UserFilter):
    async def __call__(self, req, next):
        resp = await next(req)
        resp.headers["x-tag"] = "{version}"
        return resp
'''


async def wait_for(cond, timeout=8.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await cond():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_changed_module_is_reloaded_and_a_broken_one_refused(tmp_path):
    mod = tmp_path / "tagger.py"
    mod.write_text(TAGGER.replace("{version}", "v1"))
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            filters=[{"python": {"module": "tagger.py", "class": "Tagger"}}],
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        cfg["listeners"][0]["port"] = free_port()
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        from sidecar.runtime.loader import load_file
        async with running_proxy(load_file(str(path)), config_path=str(path)) as proxy:
            async with aiohttp.ClientSession() as s:
                async def tag():
                    async with s.get(proxy.url("/")) as r:
                        return r.headers.get("x-tag")

                assert await tag() == "v1"
                mod.write_text(TAGGER.replace("{version}", "v2"))
                os.utime(mod, (time.time() + 2, time.time() + 2))
                assert await wait_for(lambda: _eq(tag(), "v2"))
                failed = proxy.app.reloads_failed
                mod.write_text("class Tagger(:\n")
                os.utime(mod, (time.time() + 4, time.time() + 4))

                async def refused():
                    return proxy.app.reloads_failed > failed
                assert await wait_for(refused)
                assert "SyntaxError" in proxy.app.last_reload_error
                assert await tag() == "v2"                # the last good version serves on


async def _eq(coro, value):
    return (await coro) == value


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("module, cls, config, error", [
    ("missing.py", "X", {}, "listeners[0].filters[0].python.module: no such file: "),
    ("broken.py", "X", {}, "listeners[0].filters[0].python.module: loading "),
    ("no_such_pkg.filters", "X", {}, "listeners[0].filters[0].python.module: cannot import "
                                     "'no_such_pkg.filters': ModuleNotFoundError"),
    ("json", "X", {}, "listeners[0].filters[0].python.class: module 'json' has no class 'X'"),
    ("tagger.py", "Tagger", {"x": 1}, "listeners[0].filters[0].python.config: Tagger takes no config"),
    ("filters/claim_header.py", "ClaimHeader", {"claim": 1},
     "listeners[0].filters[0].python.config.claim: must be a string, got int"),
])
def test_validate_reports_filter_errors_with_their_path(tmp_path, module, cls, config, error):
    (tmp_path / "broken.py").write_text("import no_such_dependency_x\n")
    (tmp_path / "tagger.py").write_text(TAGGER.replace("{version}", "v"))
    shutil.copytree(EXAMPLES, tmp_path / "filters", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = native_config(clusters={"svc": ["127.0.0.1:1"]},
                        filters=[{"python": {"module": module, "class": cls, "config": config}}],
                        routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = validate(path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert error in r.stderr, r.stderr
    if module == "broken.py":
        assert "line 1: ModuleNotFoundError: No module named 'no_such_dependency_x'" in r.stderr


def test_validate_accepts_the_examples(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "filters", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = native_config(clusters={"app": ["127.0.0.1:1"], "auth": ["127.0.0.1:2"]},
                        filters=example_filters("filters"),
                        routes=[{"match": {"prefix": "/"}, "cluster": "app"}])
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = validate(path)
    assert r.returncode == 0, r.stderr
    cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "auth"]
    path.write_text(yaml.safe_dump(cfg))
    r = validate(path)                                # found when the stacks are built
    assert r.returncode == 1 and "no cluster named 'auth'" in r.stderr, r.stderr
