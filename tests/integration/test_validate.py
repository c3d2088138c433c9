"""`sidecar validate -c FILE`: exit 0 for good configs; exit 1 for broken ones, naming the path
of every bad field (``static_resources.clusters[0]....port_value: must be ...``).

Each case takes a known-good config (the Envoy-format example and the native local-dev
example), breaks one or two fields, and runs the real CLI as a child process. All the
processes run in parallel, once per module, to keep this file fast.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.paths import REPO

ROOT = REPO
ENVOY_EXAMPLE = ROOT / "examples" / "envoy" / "envoy.yaml"
NATIVE_EXAMPLE = ROOT / "examples" / "local-dev" / "sidecar.yaml"

HCM = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ROUTE0 = f"{HCM}.route_config.virtual_hosts[0].routes"
EP0 = ("static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]"
       ".endpoint.address.socket_address")


def envoy_doc() -> dict:
    return yaml.safe_load(ENVOY_EXAMPLE.read_text())


def native_doc() -> dict:
    return yaml.safe_load(NATIVE_EXAMPLE.read_text())


def hcm(d: dict) -> dict:
    return d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def routes(d: dict) -> list:
    return hcm(d)["route_config"]["virtual_hosts"][0]["routes"]


def endpoint_sa(d: dict, cluster: int = 0) -> dict:
    return (d["static_resources"]["clusters"][cluster]["load_assignment"]["endpoints"][0]
            ["lb_endpoints"][0]["endpoint"]["address"]["socket_address"])


# ---- the broken variants: name -> (document builder, [(path, message fragment), ...]) ----

def _port_out_of_range():
    d = envoy_doc()
    endpoint_sa(d)["port_value"] = 70000
    return d


def _unknown_route_field():
    d = envoy_doc()
    routes(d)[0]["bogus_field"] = True
    return d


def _unsupported_filter():
    d = envoy_doc()
    hcm(d)["http_filters"].insert(0, {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"}})
    return d


def _router_not_last():
    d = envoy_doc()
    hcm(d)["http_filters"] = []
    return d


def _bad_regex():
    d = envoy_doc()
    routes(d)[0]["match"] = {"safe_regex": {"regex": "/api/(unclosed"}}
    return d


def _bad_duration():
    d = envoy_doc()
    d["static_resources"]["clusters"][1]["connect_timeout"] = "soon"
    return d


def _bad_lb_policy():
    d = envoy_doc()
    d["static_resources"]["clusters"][0]["lb_policy"] = "FASTEST"
    return d


def _unknown_cluster():
    d = envoy_doc()
    routes(d)[1]["route"]["cluster"] = "nope"
    return d


def _two_errors():
    d = envoy_doc()
    endpoint_sa(d)["port_value"] = -1
    d["static_resources"]["clusters"][1]["type"] = "MAGIC"
    return d


def _unknown_top_level():
    d = envoy_doc()
    d["watchdogs"] = {}
    return d


def _native_bad_endpoint():
    d = native_doc()
    d["clusters"][0]["endpoints"] = ["127.0.0.1:70000"]
    return d


def _native_unknown_key():
    d = native_doc()
    d["listeners"][0]["routes"][1]["clusterr"] = "api"
    return d


def _native_unknown_cluster():
    d = native_doc()
    d["listeners"][0]["routes"][1]["cluster"] = "nope"
    return d


def _native_bad_status():
    d = native_doc()
    d["listeners"][0]["routes"][0]["direct_response"]["status"] = 99
    return d


BROKEN = {
    "envoy-port-out-of-range": (_port_out_of_range, [(f"{EP0}.port_value", "65535")]),
    "envoy-unknown-route-field": (_unknown_route_field, [(f"{ROUTE0}[0].bogus_field", "")]),
    "envoy-unsupported-http-filter": (_unsupported_filter,
                                      [(f"{HCM}.http_filters[0]", "envoy.filters.http.lua")]),
    "envoy-router-filter-missing": (_router_not_last, [(f"{HCM}.http_filters", "router")]),
    "envoy-bad-regex": (_bad_regex, [(f"{ROUTE0}[0].match.safe_regex.regex", "")]),
    "envoy-bad-duration": (_bad_duration, [("static_resources.clusters[1].connect_timeout", "")]),
    "envoy-bad-lb-policy": (_bad_lb_policy, [("static_resources.clusters[0].lb_policy", "FASTEST")]),
    "envoy-unknown-cluster": (_unknown_cluster, [(f"{ROUTE0}[1].route", "nope")]),
    "envoy-every-error-listed": (_two_errors, [(f"{EP0}.port_value", ""),
                                               ("static_resources.clusters[1].type", "MAGIC")]),
    "envoy-unknown-top-level-field": (_unknown_top_level, [("watchdogs", "")]),
    "native-bad-endpoint-port": (_native_bad_endpoint, [("clusters[0].endpoints[0]", "65535")]),
    "native-unknown-key": (_native_unknown_key, [("listeners[0].routes[1].clusterr", "")]),
    "native-unknown-cluster": (_native_unknown_cluster, [("listeners[0].routes[1]", "nope")]),
    "native-bad-direct-response-status": (
        _native_bad_status, [("listeners[0].routes[0].direct_response.status", "")]),
}


def _run_all(tmp: Path) -> dict:
    files = {"example-envoy": ENVOY_EXAMPLE, "example-native": NATIVE_EXAMPLE}
    for name, (make, _) in BROKEN.items():
        p = tmp / f"{name}.yaml"
        p.write_text(yaml.safe_dump(make(), sort_keys=False))
        files[name] = p
    bad_yaml = tmp / "not-yaml.yaml"
    bad_yaml.write_text("static_resources: [unclosed\n")
    files["not-yaml"] = bad_yaml
    files["missing-file"] = tmp / "does-not-exist.yaml"
    procs = {name: subprocess.Popen([sys.executable, "-m", "sidecar", "validate", "-c", str(p)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=ROOT)
             for name, p in files.items()}
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=60)
        out[name] = (proc.returncode, text)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run_all(tmp_path_factory.mktemp("validate"))


@pytest.mark.parametrize("name", ["example-envoy", "example-native"])
def test_examples_are_valid(results, name):
    code, out = results[name]
    assert code == 0, out
    assert "OK" in out


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_config_names_the_field(results, name):
    code, out = results[name]
    assert code == 1, out
    for path, fragment in BROKEN[name][1]:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(path + ":")
                 or ln.strip().startswith(path + ".") or ln.strip().startswith(path + "[")]
        assert lines, f"no error line for {path!r} in:\n{out}"
        assert any(fragment in ln for ln in lines), f"{fragment!r} not in {lines}"


def test_port_error_reads_like_the_docs(results):
    """The exact shape the docs promise: full path, colon, the allowed range."""
    code, out = results["envoy-port-out-of-range"]
    assert f"{EP0}.port_value: must be 0..65535" in out, out


def test_every_error_is_listed(results):
    code, out = results["envoy-every-error-listed"]
    assert "2 error(s)" in out, out


@pytest.mark.parametrize("name", ["not-yaml", "missing-file"])
def test_unreadable_file(results, name):
    code, out = results[name]
    assert code == 1, out
    assert out.strip()


def test_run_with_invalid_config_exits_before_binding(tmp_path):
    """`sidecar run` with an invalid file exits non-zero and never binds its listener."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = native_doc()
    d["listeners"][0]["port"] = port
    d["admin"]["port"] = 0
    d["clusters"][0]["endpoints"] = ["127.0.0.1:70000"]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    bound = False
    end = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(0.1)
            bound = bound or s.connect_ex(("127.0.0.1", port)) == 0
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode not in (0, None), out
    assert not bound, "the listener was bound although the config is invalid"
    assert "clusters[0].endpoints[0]" in out
