"""``sidecar.runtime`` without sockets: the config loader (format detection, parse errors with
the file and field paths, file versions), the config store's build-aside-then-swap (applied
with ``bind=False``; requests are dispatched straight into the listener runtime) and the loop
watchdog naming the user filter whose code blocked the loop."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest
import yaml
from multidict import MultiDict

from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.core.context import RequestContext
from sidecar.core.message import Request
from sidecar.observability.metrics import Metrics
from sidecar.runtime.app import App
from sidecar.runtime.loader import (
    filter_source_files,
    is_envoy,
    load_file,
    parse_text,
    snapshot_from_doc,
)
from sidecar.runtime.watchdog import LoopWatchdog

ENVOY_BOOTSTRAP = """
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                direct_response: {status: 200, body: {inline_string: envoy}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def native(body: str = "v1", port: int = 0, name: str = "web", filters=None, **top) -> dict:
    lc: dict = {"name": name, "port": port,
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": body}}]}
    if filters is not None:
        lc["filters"] = filters
    return {"listeners": [lc], "clusters": [{"name": "api", "endpoints": ["127.0.0.1:9"]}], **top}


# ---- loader -------------------------------------------------------------------------------------

def test_parse_text_reads_yaml_and_json_by_name():
    assert parse_text("a: 1\nb: [x]\n", "c.yaml") == {"a": 1, "b": ["x"]}
    assert parse_text('{"a": 1}', "c.json") == {"a": 1}
    assert parse_text("", "empty.yaml") == {}


@pytest.mark.parametrize("text, name, fragment", [
    ("a: [1, 2\n", "broken.yaml", "broken.yaml: not valid YAML/JSON"),
    ("{'a': 1}", "single.json", "single.json: not valid YAML/JSON"),
    ("- just\n- a list\n", "list.yaml", "list.yaml: the top level must be a mapping"),
    ("42", "scalar.yaml", "scalar.yaml: the top level must be a mapping"),
])
def test_parse_text_errors_name_the_file(text, name, fragment):
    with pytest.raises(ConfigErrors) as e:
        parse_text(text, name)
    assert len(e.value.errors) == 1 and fragment in str(e.value)


def test_format_detection():
    assert is_envoy(yaml.safe_load(ENVOY_BOOTSTRAP))
    assert is_envoy({"dynamic_resources": {}})
    assert is_envoy({"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}})
    assert not is_envoy({"admin": {"address": "127.0.0.1", "port": 9901}})     # the native admin
    assert not is_envoy(native())


def test_snapshot_from_doc_for_each_format():
    env = snapshot_from_doc(yaml.safe_load(ENVOY_BOOTSTRAP))
    assert env.source_format == "envoy" and [lc.name for lc in env.listeners] == ["ingress"]
    nat = snapshot_from_doc(native())
    assert nat.source_format == "native" and [c.name for c in nat.clusters] == ["api"]


def test_every_error_of_a_native_document_is_listed_with_its_path():
    doc = native()
    doc["clusters"][0]["endpoints"] = ["127.0.0.1:70000"]
    doc["listeners"][0]["bogus_field"] = True
    doc["unknown_top"] = 1
    with pytest.raises(ConfigErrors) as e:
        snapshot_from_doc(doc)
    paths = [err.path for err in e.value.errors]
    assert "unknown_top" in str(e.value)
    assert any(p.startswith("clusters[0].endpoints[0]") for p in paths)
    assert any(p.startswith("listeners[0]") and "bogus_field" in str(err)
               for p, err in zip(paths, e.value.errors, strict=True))


def test_an_envoy_error_is_reported_with_its_path():
    doc = yaml.safe_load(ENVOY_BOOTSTRAP)
    doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = 70000
    with pytest.raises(ConfigErrors) as e:
        snapshot_from_doc(doc)
    assert e.value.errors[0].path.startswith("static_resources.listeners[0].address")


def test_load_file_versions_by_mtime_and_keeps_an_explicit_version(tmp_path):
    p = tmp_path / "sidecar.yaml"
    p.write_text(yaml.safe_dump(native()))
    snap = load_file(str(p))
    assert snap.version == f"file-{int(p.stat().st_mtime)}"
    p.write_text(ENVOY_BOOTSTRAP)
    assert load_file(str(p)).source_format == "envoy"


def test_load_file_that_cannot_be_read(tmp_path):
    with pytest.raises(ConfigErrors) as e:
        load_file(str(tmp_path / "absent.yaml"))
    assert "cannot read" in str(e.value) and "absent.yaml" in str(e.value)


USER_FILTER = '''
from sidecar import sdk


class Tag(sdk.UserFilter):
    async def __call__(self, req, next):
        resp = await next(req)
        resp.headers["x-tag"] = "1"
        return resp


class Boom(sdk.UserFilter):
    def __init__(self, config, setup):
        super().__init__(config, setup)
        raise RuntimeError("cannot start")
'''


def test_relative_filter_modules_resolve_beside_the_config_and_are_watched(tmp_path):
    (tmp_path / "tag.py").write_text(USER_FILTER)
    p = tmp_path / "sidecar.yaml"
    p.write_text(yaml.safe_dump(native(filters=[{"python": {"name": "tagger", "module": "tag.py",
                                                            "class": "Tag"}}])))
    snap = load_file(str(p))
    assert filter_source_files(snap) == {str(tmp_path / "tag.py"): "tagger"}


def test_a_missing_filter_module_is_an_error_at_its_path(tmp_path):
    p = tmp_path / "sidecar.yaml"
    p.write_text(yaml.safe_dump(native(filters=[{"python": {"module": "nope.py", "class": "X"}}])))
    with pytest.raises(ConfigErrors) as e:
        load_file(str(p))
    assert e.value.errors[0].path == "listeners[0].filters[0].python.module"


# ---- the config store: build aside, then swap -------------------------------------------------

def request(path: str = "/") -> Request:
    return Request("GET", path, "", MultiDict({"host": "svc"}), b"",
                   RequestContext("web", ("127.0.0.1", 5000), 0.0))


async def answer(target, path: str = "/") -> bytes:
    resp = await target.dispatch(request(path))
    return resp.body if isinstance(resp.body, bytes) else await resp.body.read_all(1 << 20)


@pytest.fixture
async def app():
    a = App(snapshot_from_doc(native("v1")), metrics_enabled=False, watch_config=False,
            loop_lag_threshold_s=0)
    yield a
    await a.close()


async def test_a_new_snapshot_swaps_routes_in_the_same_listener(app):
    await app.store.apply(app.initial, bind=False)
    lr = app.store.listeners["web"]
    assert await answer(lr) == b"v1"
    v1_manager = lr.hcm
    applied: list[str] = []
    app.store.on_applied.append(lambda s: applied.append(s.version))
    v2 = snapshot_from_doc({**native("v2"), "version": "2"})
    await app.store.apply(v2, bind=False)
    assert app.store.listeners["web"] is lr                 # same socket: only the routes swap
    assert await answer(lr) == b"v2"
    assert await answer(v1_manager) == b"v1"                # a request that started on v1 ends on it
    assert app.store.snapshot is v2 and applied == ["2"]
    assert [v for v, _ in app.store.history] == ["0", "2"]


async def test_a_snapshot_that_fails_to_build_changes_nothing(app, tmp_path):
    (tmp_path / "boom.py").write_text(USER_FILTER)
    await app.store.apply(app.initial, bind=False)
    lr = app.store.listeners["web"]
    before = lr.hcm
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(native("v3", filters=[{"python": {"module": "boom.py", "class": "Boom"}}])))
    bad = load_file(str(p))                                 # parses: the class exists
    with pytest.raises(ConfigError) as e:
        await app.store.apply(bad, bind=False)               # building its route stack fails
    assert e.value.path == "listeners[0].filters[0].python"
    assert "cannot start" in str(e.value)
    assert lr.hcm is before and app.store.snapshot is app.initial
    assert await answer(lr) == b"v1"


async def test_validate_listener_builds_without_binding_and_raises_the_same_error(app, tmp_path):
    (tmp_path / "boom.py").write_text(USER_FILTER)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(native(filters=[{"python": {"module": "boom.py", "class": "Boom"}}])))
    bad = load_file(str(p))
    with pytest.raises(ConfigError):
        app.store.validate_listener(bad.listeners[0])
    assert app.store.listeners == {}


async def test_a_refused_before_apply_check_changes_nothing(app):
    await app.store.apply(app.initial, bind=False)
    lr = app.store.listeners["web"]
    resized = snapshot_from_doc(native("v2", shared_state={"counter_rows": 8192}))
    assert resized.stores.shared_state != app.initial.stores.shared_state
    with pytest.raises(ConfigError) as e:
        await app.store.apply(resized, bind=False)
    assert e.value.path == "shared_state"
    assert await answer(lr) == b"v1" and app.store.snapshot is app.initial


async def test_a_moved_listener_gets_a_new_runtime_and_a_removed_one_goes(app):
    await app.store.apply(app.initial, bind=False)
    old = app.store.listeners["web"]
    moved = snapshot_from_doc(native("moved", port=10001))
    await app.store.apply(moved, bind=False)
    new = app.store.listeners["web"]
    assert new is not old and new.config.port == 10001
    assert await answer(new) == b"moved"
    renamed = snapshot_from_doc(native("other", port=10001, name="api-gw"))
    await app.store.apply(renamed, bind=False)
    assert list(app.store.listeners) == ["api-gw"]


async def test_unmatched_requests_get_404_nr(app):
    doc = native()
    doc["listeners"][0]["routes"][0]["match"] = {"prefix": "/only"}
    await app.store.apply(snapshot_from_doc(doc), bind=False)
    req = request("/elsewhere")
    resp = await app.store.listeners["web"].dispatch(req)
    assert resp.status == 404 and resp.local and req.ctx.flags == ["NR"]


# ---- the loop watchdog ------------------------------------------------------------------------

FILTER_FILE = "/virtual/user_filters/slow_filter.py"
_SLOW_SOURCE = """
def handle(callback):
    return callback()
"""


def user_code(callback):
    """Run ``callback`` from inside a function whose code lives in FILTER_FILE."""
    ns: dict = {}
    exec(compile(_SLOW_SOURCE, FILTER_FILE, "exec"), ns)
    return ns["handle"](callback)


def test_attribution_names_the_innermost_user_filter_frame():
    wd = LoopWatchdog(Metrics(False), lambda: {FILTER_FILE: "slow-auth"})
    name, where = user_code(lambda: wd._attribute(sys._getframe()))
    assert name == "slow-auth"
    assert where == f"{FILTER_FILE}:3 in handle"


def test_attribution_outside_user_filters_is_none_with_the_innermost_frame():
    wd = LoopWatchdog(Metrics(False), lambda: {})
    name, where = user_code(lambda: wd._attribute(sys._getframe()))
    assert name == "none"
    assert where.startswith(__file__) and "<lambda>" in where


async def test_a_stall_sampled_by_the_watchdog_thread_is_reported_with_the_filter():
    metrics = Metrics(True)
    wd = LoopWatchdog(metrics, lambda: {FILTER_FILE: "slow-auth"}, threshold_s=0.1)
    parked = threading.Event()
    release = threading.Event()

    def block_in_user_code():
        user_code(lambda: (parked.set(), release.wait(30)))

    # a thread parked inside user filter code stands for the blocked loop thread
    blocked = threading.Thread(target=block_in_user_code, daemon=True)
    blocked.start()
    assert parked.wait(30)
    wd._loop_thread = blocked.ident
    wd._last = time.monotonic() - 10.0          # the heartbeat is 10 s late: a stall is on
    watcher = threading.Thread(target=wd._watch, daemon=True)
    watcher.start()
    for _ in range(3000):                        # until the watchdog thread took its sample
        if wd._culprit is not None:
            break
        time.sleep(0.01)
    wd._stop.set()
    watcher.join(30)
    release.set()
    blocked.join(30)
    assert wd._culprit is not None and wd._culprit[0] == "slow-auth"
    # the heartbeat finally runs: the stall is over and reported
    wd._loop = asyncio.get_running_loop()
    wd._stop.clear()
    wd._beat()
    wd.stop()
    (late, name, where), = wd.stalls
    assert name == "slow-auth" and where.startswith(f"{FILTER_FILE}:3")
    assert late > wd.threshold
    text = metrics.render()[0].decode()
    assert 'sidecar_event_loop_blocked_total{filter="slow-auth"} 1.0' in text
    assert "sidecar_event_loop_blocked_seconds_count 1.0" in text


async def test_a_beat_on_time_reports_nothing_and_drops_a_stale_sample():
    wd = LoopWatchdog(Metrics(False), lambda: {}, threshold_s=0.25)
    wd._loop = asyncio.get_running_loop()
    wd._last = time.monotonic() + 60.0           # the previous beat is (as if) just now
    wd._culprit = ("slow-auth", "somewhere")
    wd._beat()
    wd.stop()
    assert wd.stalls == [] and wd._culprit is None


async def test_a_stall_without_a_sample_is_reported_as_none():
    wd = LoopWatchdog(Metrics(False), lambda: {}, threshold_s=0.25)
    wd._loop = asyncio.get_running_loop()
    wd._last = time.monotonic() - 10.0
    wd._beat()
    wd.stop()
    assert [(n, w) for _, n, w in wd.stalls] == [("none", "unknown")]
