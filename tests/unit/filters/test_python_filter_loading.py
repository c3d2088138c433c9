"""User filters (filters/python.py): loading from a file or a module name, config validation
with paths, named instances and per-route overrides in both config formats, the 500 guard."""

from __future__ import annotations

import os
import textwrap

import pytest

from filters import python as P
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.runtime.loader import filter_source_files, snapshot_from_doc
from sidecar.sdk import Response
from sidecar.testing import FilterTestEnv, RecordingNext, build_filter, build_user_filter, make_request

FILTER = '''
from dataclasses import dataclass
from sidecar import sdk

@dataclass(frozen=True)
class Config:
    header: str
    value: str = "{value}"

@dataclass(frozen=True)
class PerRoute:
    value: str

class Tag(sdk.UserFilter):
    config_type = Config
    per_route_type = PerRoute

    def __init__(self, config, setup):
        super().__init__(config, setup)
        self.value = setup.per_route.value if setup.per_route else config.value

    async def __call__(self, req, next):
        req.headers[self.config.header] = self.value
        return await next(req)
'''


def write(tmp_path, name="tag.py", value="v1", text=FILTER):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text.replace("{value}", value)))
    return p


def native(module, cls="Tag", config=None, name=None, route_filters=None):
    py = {"module": str(module), "class": cls, "config": config if config is not None
          else {"header": "x-tag"}}
    if name:
        py["name"] = name
    route = {"match": {"prefix": "/"}, "cluster": "svc"}
    if route_filters:
        route["filters"] = route_filters
    return {"listeners": [{"name": "l", "port": 0, "filters": [{"python": py}], "routes": [route]}],
            "clusters": [{"name": "svc", "endpoints": ["127.0.0.1:1"]}]}


def errors(doc) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        snapshot_from_doc(doc)
    return [str(x) for x in e.value.errors]


def test_native_loads_the_class_and_its_config(tmp_path):
    p = write(tmp_path)
    snap = snapshot_from_doc(native(p, name="tagger", route_filters={"tagger": {"value": "r"}}))
    hf = snap.listeners[0].http_filters[0]
    assert (hf.name, hf.kind) == ("tagger", P.NAME)
    assert hf.config.cls.__name__ == "Tag" and hf.config.config.header == "x-tag"
    route = snap.listeners[0].route_config.virtual_hosts[0].routes[0]
    assert route.per_filter == (("tagger", P.UserPerRoute({"value": "r"},
                                                           "listeners[0].routes[0].filters.tagger")),)
    assert filter_source_files(snap) == {str(p): "tagger"}


def test_envoy_format_names_the_instance_and_finds_it_by_type(tmp_path):
    p = write(tmp_path)
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "s",
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{
               "match": {"prefix": "/"}, "route": {"cluster": "svc"},
               "typed_per_filter_config": {"my-tag": {
                   "@type": "type.googleapis.com/pysidecar.filter.v1.PythonFilterPerRoute",
                   "config": {"value": "r"}}}}]}]},
           "http_filters": [
               {"name": "my-tag", "typed_config": {
                   "@type": "type.googleapis.com/pysidecar.filter.v1.PythonFilter",
                   "module": str(p), "class": "Tag", "config": {"header": "x-tag"}}},
               {"name": "envoy.filters.http.router", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    doc = {"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "svc", "load_assignment": {"cluster_name": "svc", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}]}}
    snap = snapshot_from_doc(doc)
    hf = snap.listeners[0].http_filters[0]
    assert (hf.name, hf.kind, hf.config.name) == ("my-tag", P.NAME, "my-tag")
    route = snap.listeners[0].route_config.virtual_hosts[0].routes[0]
    assert route.per_filter[0][0] == "my-tag"
    hcm["http_filters"][0]["typed_config"]["config"] = {"header": 5}
    assert errors(doc) == ["static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
                           ".http_filters[0].typed_config.config.header: must be a string, got int"]


def test_validate_errors_name_the_path(tmp_path):
    base = "listeners[0].filters[0].python"
    assert errors(native(tmp_path / "nope.py")) == [
        f"{base}.module: no such file: {tmp_path / 'nope.py'}"]
    assert errors(native("no_such_module_anywhere")) == [
        f"{base}.module: no module named 'no_such_module_anywhere' on the Python path (give the "
        "path of a .py file, or install the module)"]
    broken = write(tmp_path, "broken.py", text="x = 1\ndef f(:\n")
    (msg,) = errors(native(broken))
    assert msg.startswith(f"{base}.module: loading {broken} failed: line 2: SyntaxError")
    raising = write(tmp_path, "raising.py", text="import os\nx = os.environ['NO_SUCH_VAR_X']\n")
    (msg,) = errors(native(raising))
    assert msg == f"{base}.module: loading {raising} failed: line 2: KeyError: 'NO_SUCH_VAR_X'"
    p = write(tmp_path)
    assert errors(native(p, cls="Nope")) == [
        f"{base}.class: module {str(p)!r} has no class 'Nope' (its filter classes: Tag)"]
    assert errors(native(p, cls="Config")) == [
        f"{base}.class: {p}.Config must be a class that subclasses sidecar.sdk.UserFilter"]
    assert errors(native(p, config={"header": "h", "colour": "red"})) == [
        f"{base}.config.colour: unknown or unsupported field"]


def test_a_module_is_executed_once_per_version(tmp_path):
    p = write(tmp_path)
    m1, _ = P.load_module(str(p), "m")
    m2, _ = P.load_module(str(p), "m")
    assert m1 is m2                                   # unchanged source: not executed again
    write(tmp_path, value="v2")
    m3, _ = P.load_module(str(p), "m")
    assert m3 is not m1 and m3.Config("h").value == "v2"
    write(tmp_path, text="def broken(:\n")
    with pytest.raises(ConfigError):
        P.load_module(str(p), "m")
    write(tmp_path, value="v2")
    assert P.load_module(str(p), "m")[0] is m3        # the last good version is kept


def test_importable_module_name(tmp_path, monkeypatch):
    pkg = tmp_path / "acme_filters"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tag.py").write_text(textwrap.dedent(FILTER.replace("{value}", "pkg")))
    monkeypatch.syspath_prepend(str(tmp_path))
    snap = snapshot_from_doc(native("acme_filters.tag"))
    assert snap.listeners[0].http_filters[0].config.source_file == str(pkg / "tag.py")


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    write(tmp_path)
    with P.config_dir(str(tmp_path)):
        snap = snapshot_from_doc(native("tag.py"))
    assert snap.listeners[0].http_filters[0].config.source_file == os.path.join(str(tmp_path), "tag.py")


def test_duplicate_instance_names_are_refused(tmp_path):
    p = write(tmp_path)
    doc = native(p)
    doc["listeners"][0]["filters"].append({"python": {"module": str(p), "class": "Tag",
                                                      "config": {"header": "x"}}})
    assert errors(doc) == ["listeners[0].filters[1].python: filter name 'Tag' is already used by "
                           "listeners[0].filters[0]; give this one a name"]


async def test_an_exception_is_a_500_for_that_request_only():
    from sidecar import sdk

    class Flaky(sdk.UserFilter):
        async def __call__(self, req, next):
            if req.path == "/boom":
                raise RuntimeError("boom")
            if req.path == "/none":
                return None
            return await next(req)

    env = FilterTestEnv()
    f = build_user_filter(Flaky, env=env, name="flaky")
    upstream = RecordingNext()
    req = make_request(path="/boom")
    resp = await f(req, upstream)
    assert (resp.status, resp.body, req.ctx.flags) == (500, b"filter error", ["FE"])
    assert (await f(make_request(path="/none"), upstream)).status == 500
    assert (await f(make_request(path="/ok"), upstream)).status == 200
    assert env.metric("sidecar_filter_errors_total", filter="flaky") == 2


async def test_state_survives_rebuilds():
    from sidecar import sdk

    class Counting(sdk.UserFilter):
        @classmethod
        def new_state(cls, env):
            return {"n": 0}

        async def __call__(self, req, next):
            self.setup.state["n"] += 1
            return Response(200, body=str(self.setup.state["n"]).encode())

    env = FilterTestEnv()
    for expected in (b"1", b"2"):
        f = build_user_filter(Counting, env=env)      # a new build, as after a reload
        assert (await f(make_request(), RecordingNext())).body == expected


def test_build_errors_are_config_errors(tmp_path):
    from sidecar import sdk

    class NeedsCluster(sdk.UserFilter):
        def __init__(self, config, setup):
            super().__init__(config, setup)
            setup.upstream("missing")

    with pytest.raises(ConfigError, match="no cluster named 'missing'"):
        build_user_filter(NeedsCluster)
    cfg = P.UserFilterConfig("n", "m", "NeedsCluster", "", NeedsCluster, None, "l.filters[0]")
    with pytest.raises(ConfigError, match=r"^l.filters\[0\]: no cluster named 'missing'"):
        build_filter(P.SPEC, cfg)
