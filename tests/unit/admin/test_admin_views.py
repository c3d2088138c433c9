"""The admin views from a built snapshot, without a server: ``config_dump`` and ``clusters_view``
read a real ``App`` whose snapshot was applied with ``bind=False``, and the admin routes are
resolved and called in memory (``runtime.local_http``'s router, no socket)."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest

from sidecar.admin.config_dump import clusters_view, config_dump, to_jsonable
from sidecar.admin.server import make_admin_app
from sidecar.runtime.app import App
from sidecar.runtime.loader import snapshot_from_doc
from sidecar.runtime.local_http import LocalRequest

DOC = {
    "version": "42",
    "listeners": [{
        "name": "web", "port": 0,
        "routes": [
            {"match": {"path": "/healthz"}, "direct_response": {"status": 200, "body": "ok"}},
            {"match": {"regex": "^/api/v[0-9]+/.*"}, "cluster": "api"},
            {"match": {"prefix": "/"}, "cluster": "web"},
        ],
    }],
    "clusters": [
        {"name": "web", "endpoints": ["127.0.0.1:8082"]},
        {"name": "api", "endpoints": ["127.0.0.1:8081", "127.0.0.1:8083"]},
    ],
}


@pytest.fixture
async def app():
    a = App(snapshot_from_doc(DOC), metrics_enabled=False, watch_config=False, loop_lag_threshold_s=0)
    await a.store.apply(a.initial, bind=False)
    yield a
    await a.close()


# ---- to_jsonable ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Inner:
    pattern: re.Pattern
    tags: frozenset
    source: object = "the raw document"      # never dumped


def test_to_jsonable_turns_config_types_into_json():
    out = to_jsonable({"k": (_Inner(re.compile("^a.*$"), frozenset({"b", "a"})),), 3: object})
    assert out == {"k": [{"pattern": "^a.*$", "tags": ["a", "b"]}], "3": repr(object)}
    json.dumps(out)


# ---- config_dump ----------------------------------------------------------------------------------

async def test_config_dump_shows_the_applied_snapshot(app):
    dump = config_dump(app)
    json.dumps(dump)                                       # the admin serves it as JSON
    assert dump["version"] == "42" and dump["source_format"] == "native"
    assert dump["applied_at"] == app.store.applied_at > 0
    assert [lc["name"] for lc in dump["listeners"]] == ["web"]
    assert sorted(c["name"] for c in dump["clusters"]) == ["api", "web"]
    text = json.dumps(dump["listeners"])
    assert "^/api/v[0-9]+/.*" in text                      # a regex shows its pattern
    assert '"source"' not in json.dumps(dump)              # raw documents are not echoed
    assert dump["updates"] == {"accepted": 0, "rejected": 0, "last_error": ""}
    assert "control_plane" not in dump                     # file config: no xDS state


async def test_config_dump_counts_updates_and_keeps_the_last_error(app):
    app.count_update("file", True)
    app.count_update("file", False, "listeners[0].port: must be 0..65535")
    assert config_dump(app)["updates"] == {"accepted": 1, "rejected": 1,
                                           "last_error": "listeners[0].port: must be 0..65535"}


async def test_config_dump_before_any_snapshot():
    a = App(snapshot_from_doc(DOC), metrics_enabled=False, watch_config=False, loop_lag_threshold_s=0)
    try:
        dump = config_dump(a)
        assert (dump["version"], dump["listeners"], dump["clusters"]) == (None, [], [])
    finally:
        await a.close()


# ---- clusters_view ----------------------------------------------------------------------------

async def test_clusters_view_lists_clusters_by_name_with_their_hosts(app):
    view = clusters_view(app)["clusters"]
    assert [c["name"] for c in view] == ["api", "web"]
    api = view[0]
    assert [h["address"] for h in api["hosts"]] == ["127.0.0.1:8081", "127.0.0.1:8083"]
    for h in api["hosts"]:
        assert (h["healthy"], h["health_flags"], h["ejected"], h["rq_total"], h["cx_active"]) == \
            (True, "healthy", False, 0, 0)
    cb = api["circuit_breakers"]
    assert (cb["max_connections"], cb["max_pending_requests"], cb["max_requests"], cb["max_retries"]) \
        == (1024, 1024, 1024, 3)                          # Envoy's defaults
    assert cb["open"] is False and api["rq_active"] == 0 and api["warm"] is True


async def test_clusters_view_shows_failed_health_checks_and_ejections(app):
    api = next(c for c in app.clusters.clusters() if c.name == "api")
    first, second = api.hosts
    first.hc_healthy = False
    second.ejected_until = time.monotonic() + 30.0
    second.ejections = 1
    view = next(c for c in clusters_view(app)["clusters"] if c["name"] == "api")
    h1, h2 = view["hosts"]
    assert (h1["healthy"], h1["health_flags"], h1["ejected"]) == (False, "/failed_active_hc", False)
    assert (h2["healthy"], h2["health_flags"], h2["ejected"], h2["ejections"]) == \
        (False, "/failed_outlier_check", True, 1)
    assert 0 < h2["ejected_for_s"] <= 30.0


# ---- the admin routes, called in memory ------------------------------------------------------------

class _Reply:
    def __init__(self, status: int, body: bytes):
        self.status, self.body, self.text = status, body, body.decode()


async def call(app, method: str, path: str):
    router = make_admin_app(app)
    target, _, query = path.partition("?")
    resp = await router.handle(LocalRequest(method, target, query))
    assert resp.status not in (404, 405), f"{method} {path} is not routed"
    assert isinstance(resp.body, bytes)
    return _Reply(resp.status, resp.body)


async def test_clusters_text_format_is_envoys(app):
    resp = await call(app, "GET", "/clusters")
    lines = resp.text.splitlines()
    assert "api::127.0.0.1:8081::health_flags::healthy" in lines
    assert "web::127.0.0.1:8082::weight::1" in lines
    assert "api::127.0.0.1:8083::cx_connect_fail::0" in lines
    as_json = await call(app, "GET", "/clusters?format=json")
    assert json.loads(as_json.body)["clusters"][0]["name"] == "api"


async def test_ready_follows_the_health_check_switch(app):
    assert (await call(app, "GET", "/ready")).status == 200
    await call(app, "POST", "/healthcheck/fail")
    resp = await call(app, "GET", "/ready")
    assert resp.status == 503 and "health check failed" in resp.text
    await call(app, "POST", "/healthcheck/ok")
    assert (await call(app, "GET", "/ready")).status == 200


async def test_config_dump_and_server_info_routes(app):
    dump = json.loads((await call(app, "GET", "/config_dump")).body)
    assert dump["version"] == "42"
    info = json.loads((await call(app, "GET", "/server_info")).body)
    assert (info["state"], info["config_version"]) == ("LIVE", "42")
