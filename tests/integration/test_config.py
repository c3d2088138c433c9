"""Config validation: every error reported with the path to the bad field."""

import subprocess
import sys

import pytest
import yaml

from sidecar.config.errors import ConfigErrors
from sidecar.runtime.loader import snapshot_from_doc

GOOD = {
    "listeners": [{"name": "l", "port": 10000, "routes": [{"match": {"prefix": "/"}, "cluster": "a"}]}],
    "clusters": [{"name": "a", "endpoints": ["127.0.0.1:8080"]}],
}


def errors_of(doc):
    with pytest.raises(ConfigErrors) as ei:
        snapshot_from_doc(doc)
    return [str(e) for e in ei.value.errors]


def test_good_native_config_parses():
    snap = snapshot_from_doc(GOOD)
    assert snap.clusters[0].endpoints[0].port == 8080
    assert snap.listeners[0].route_config.virtual_hosts[0].routes[0].action.cluster == "a"


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["clusters"].append({"name": "b", "endpoints": [{"address": "1.2.3.4", "port": 70000}]}),
     "clusters[1].endpoints[0].port: must be 1..65535"),
    (lambda d: d["clusters"][0].update(lb="fastest"), "clusters[0].lb: must be one of"),
    (lambda d: d["clusters"][0].update(colour="red"), "clusters[0].colour: unknown or unsupported field"),
    (lambda d: d["listeners"][0]["routes"][0].update(cluster="missing"), "unknown cluster 'missing'"),
    (lambda d: d["listeners"][0]["routes"][0].update(match={"regex": "(["}), "listeners[0].routes[0].match.regex: invalid regular expression"),
    (lambda d: d["listeners"][0]["routes"][0].update(timeout="soon"), "listeners[0].routes[0].timeout: must be a duration"),
    (lambda d: d["listeners"][0]["routes"][0].update(retry={"retry_on": "sometimes"}), "listeners[0].routes[0].retry.retry_on: unsupported retry condition"),
    (lambda d: d["clusters"][0].update(endpoints=["nohostport"]), "clusters[0].endpoints[0]: must be host:port"),
])
def test_native_errors_carry_paths(mutate, expected):
    import copy
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    errs = errors_of(doc)
    assert any(expected in e for e in errs), errs


def test_all_errors_are_listed_not_just_the_first():
    doc = {"listeners": [{"name": "l", "port": 99999, "routes": []}],
           "clusters": [{"name": "a", "endpoints": ["h:0"]}, {"name": "b", "endpoints": [], "bogus": 1}]}
    errs = errors_of(doc)
    assert len(errs) >= 3, errs


ENVOY = {
    "static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                                                        "stat_prefix": "l",
                                                                        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "a"}}]}]},
                                                                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
        "clusters": [{"name": "a", "type": "STATIC", "connect_timeout": "1s",
                      "load_assignment": {"cluster_name": "a", "endpoints": [{"lb_endpoints": [
                          {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}]}]}}],
    }
}


def test_envoy_bootstrap_parses():
    snap = snapshot_from_doc(ENVOY)
    assert snap.source_format == "envoy"
    assert snap.clusters[0].connect_timeout_s == 1.0


def test_envoy_unsupported_filter_is_named():
    import copy
    doc = copy.deepcopy(ENVOY)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.lua", "typed_config": {"@type": "x"}})
    errs = errors_of(doc)
    assert any("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].name: "
               "unsupported HTTP filter 'envoy.filters.http.lua'" in e for e in errs), errs


def test_envoy_unknown_field_is_refused():
    import copy
    doc = copy.deepcopy(ENVOY)
    doc["static_resources"]["clusters"][0]["dns_resolvers"] = []
    errs = errors_of(doc)
    assert any("static_resources.clusters[0].dns_resolvers: unknown or unsupported field" in e for e in errs)


def test_envoy_bad_port_path():
    import copy
    doc = copy.deepcopy(ENVOY)
    sa = doc["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    sa["port_value"] = 70000
    errs = errors_of(doc)
    assert any(e.startswith("static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0]"
                            ".endpoint.address.socket_address.port_value: must be 0..65535") for e in errs), errs


def test_cli_validate_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, "clusters": [{"name": "a", "endpoints": [{"address": "x", "port": 0}]}]}))
    ok = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    ko = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1
    assert "clusters[0].endpoints[0].port: must be 1..65535" in ko.stderr


def test_cli_run_with_invalid_config_exits_before_binding(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [{name: l, port: 1, routes: [{cluster: nope}]}]\n")
    r = subprocess.run([sys.executable, "-m", "sidecar", "run", "-c", str(bad)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert "unknown cluster 'nope'" in r.stderr


def test_validate_builds_route_chains_too(tmp_path):
    """Errors only found while building a route's filters (a per-route JWT override naming a
    requirement that does not exist) fail `validate`, as they would fail `run`."""
    import base64
    import copy
    import json

    from filters.jwt_authn.config import PER_ROUTE_TYPE_URL, TYPE_URL
    doc = copy.deepcopy(ENVOY)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": TYPE_URL, "providers": {"p": {"issuer": "https://issuer.test",
                                               "local_jwks": {"inline_string": json.dumps({"keys": [
            {"kty": "oct", "alg": "HS256", "kid": "k",
             "k": base64.urlsafe_b64encode(b"s" * 32).rstrip(b"=").decode()}]})}}},
        "requirement_map": {"need_p": {"provider_name": "p"}}}})
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["typed_per_filter_config"] = {"envoy.filters.http.jwt_authn": {
        "@type": PER_ROUTE_TYPE_URL, "requirement_name": "missing"}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "not in requirement_map: 'missing'" in r.stderr
    route["typed_per_filter_config"]["envoy.filters.http.jwt_authn"]["requirement_name"] = "need_p"
    bad.write_text(yaml.safe_dump(doc))
    ok = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(bad)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
