import pytest
import yaml

from filters.ratelimit.config import (
    DestinationClusterAction,
    GenericKeyAction,
    RemoteAddressAction,
    RequestHeadersAction,
    RouteRateLimit,
    descriptor_for,
    filter_from_envoy,
    route_rate_limits_from_envoy,
)
from sidecar.config.errors import ConfigError
from sidecar.config.stores import (
    FailurePolicy,
    SharedStateConfig,
    StoreRef,
    store_ref_from_native,
    stores_from_native,
)
from sidecar.shared.rls import (
    RlsCode,
    RlsDescriptorStatus,
    RlsLimit,
    RlsResponse,
    RlsUnit,
    x_ratelimit_headers,
)

NATIVE = yaml.safe_load("""
shared_state:
  counter_rows: 1024
  replay_entries: 5000
stores:
  main:
    redis:
      address: 127.0.0.1:6380
      db: 2
      password_env: REDIS_PASSWORD
      timeout: 25ms
      retry_backoff: {base: 50ms, max: 2s}
""")


def test_native_stores():
    s = stores_from_native(NATIVE)
    assert s.shared_state == SharedStateConfig(counter_rows=1024, bucket_rows=4096,
                                               replay_entries=5000)
    r = s.get("main")
    assert (r.host, r.port, r.db, r.timeout_s, r.backoff.base_s, r.backoff.max_s) == \
        ("127.0.0.1", 6380, 2, 0.025, 0.05, 2.0)
    assert r.describe() == "redis://127.0.0.1:6380/2"


def test_default_is_in_process():
    s = stores_from_native({})
    assert s.redis == () and s.shared_state == SharedStateConfig()
    assert store_ref_from_native({}, "p", s, FailurePolicy.FAIL_CLOSED) is None


def test_credentials_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    r = stores_from_native(NATIVE).get("main")
    assert r.credentials() == (None, "s3cret")
    assert "s3cret" not in repr(r) and "s3cret" not in r.describe()


@pytest.mark.parametrize("body,path,msg", [
    ({"stores": {"m": {"redis": {"password": "x"}}}}, "stores.m.redis.password", "password_env"),
    ({"stores": {"m": {"redis": {"address": "nohost"}}}}, "stores.m.redis.address", "host:port"),
    ({"stores": {"m": {"redis": {"timeout": "1h"}}}}, "stores.m.redis.timeout", "between"),
    ({"stores": {"m": {"redis": {"tls": {}}}}}, "stores.m.redis.tls", "not supported"),
    ({"stores": {"m": {"redis": {"colour": 1}}}}, "stores.m.redis.colour", "unknown"),
    ({"stores": {"m": {"memcached": {}}}}, "stores.m.memcached", "unknown"),
    ({"stores": {"m": {"redis": {"retry_backoff": {"base": "2s", "max": "1s"}}}}},
     "stores.m.redis.retry_backoff", "base <= max"),
    ({"shared_state": {"counter_rows": 1}}, "shared_state.counter_rows", "16"),
    ({"shared_state": {"rows": 1}}, "shared_state.rows", "unknown"),
])
def test_errors_carry_paths(body, path, msg):
    with pytest.raises(ConfigError) as e:
        stores_from_native(body)
    assert e.value.path == path and msg in e.value.message


def test_store_ref():
    s = stores_from_native(NATIVE)
    ref = store_ref_from_native({"store": "main", "on_store_error": "fail_open"}, "jwt.rp", s,
                                FailurePolicy.FAIL_CLOSED)
    assert ref == StoreRef("main", FailurePolicy.FAIL_OPEN)
    assert store_ref_from_native({"store": "main"}, "p", s, FailurePolicy.FAIL_CLOSED) \
        .on_store_error is FailurePolicy.FAIL_CLOSED
    with pytest.raises(ConfigError) as e:
        store_ref_from_native({"store": "nope"}, "jwt.rp", s, FailurePolicy.FAIL_CLOSED)
    assert e.value.path == "jwt.rp.store" and "main" in e.value.message
    with pytest.raises(ConfigError) as e:
        store_ref_from_native({"on_store_error": "fail_open"}, "jwt.rp", s,
                              FailurePolicy.FAIL_CLOSED)
    assert e.value.path == "jwt.rp.on_store_error"
    with pytest.raises(ConfigError):
        store_ref_from_native({"store": "main", "on_store_error": "maybe"}, "p", s,
                              FailurePolicy.FAIL_CLOSED)


# ---- envoy.filters.http.ratelimit -----------------------------------------------------------

FILTER = yaml.safe_load("""
domain: edge
timeout: 0.05s
failure_mode_deny: true
enable_x_ratelimit_headers: DRAFT_VERSION_03
rate_limited_status: {code: 503}
rate_limit_service:
  transport_api_version: V3
  grpc_service: {envoy_grpc: {cluster_name: ratelimit}}
""")


def test_filter_config():
    c = filter_from_envoy(FILTER, "f")
    assert (c.domain, c.service_cluster, c.timeout_s, c.failure_mode_deny,
            c.x_ratelimit_headers, c.rate_limited_status, c.status_on_error) == \
        ("edge", "ratelimit", 0.05, True, True, 503, 500)
    d = filter_from_envoy({"domain": "x", "rate_limit_service": FILTER["rate_limit_service"]}, "f")
    assert d.timeout_s == 0.020 and not d.failure_mode_deny and d.x_envoy_ratelimited


@pytest.mark.parametrize("patch,path", [
    ({"stage": 1}, "f.stage"),
    ({"request_type": "internal"}, "f.request_type"),
    ({"filter_enabled": {"default_value": {"numerator": 50}}}, "f.filter_enabled"),
    ({"rate_limits": [{"actions": []}]}, "f.rate_limits"),
    ({"rate_limit_service": {"grpc_service": {"google_grpc": {}}}},
     "f.rate_limit_service.grpc_service.google_grpc"),
    ({"rate_limit_service": {"transport_api_version": "V2", "grpc_service": {}}},
     "f.rate_limit_service.transport_api_version"),
    ({"enable_x_ratelimit_headers": "ON"}, "f.enable_x_ratelimit_headers"),
    ({"bogus": 1}, "f.bogus"),
])
def test_filter_config_refusals(patch, path):
    with pytest.raises(ConfigError) as e:
        filter_from_envoy({**FILTER, **patch}, "f")
    assert e.value.path == path


ROUTE = yaml.safe_load("""
- actions:
  - request_headers: {header_name: X-User, descriptor_key: user, skip_if_absent: true}
  - remote_address: {}
  - generic_key: {descriptor_value: api}
  hits_addend: {number: 2}
- actions:
  - destination_cluster: {}
  - request_headers: {header_name: x-tenant, descriptor_key: tenant}
""")


class View:
    def __init__(self, headers, ip="10.0.0.9", cluster="svc"):
        self.headers, self.remote_address, self.route_cluster = headers, ip, cluster

    def header(self, name):
        return self.headers.get(name)


def test_route_actions_build_descriptors():
    a, b = route_rate_limits_from_envoy(ROUTE, "r")
    assert a == RouteRateLimit((RequestHeadersAction("x-user", "user", True),
                                RemoteAddressAction(), GenericKeyAction("api")), 2)
    assert b.actions == (DestinationClusterAction(), RequestHeadersAction("x-tenant", "tenant"))
    full = View({"x-user": "ann", "x-tenant": "t1"})
    assert descriptor_for(a, full) == (("user", "ann"), ("remote_address", "10.0.0.9"),
                                       ("generic_key", "api"))
    assert descriptor_for(b, full) == (("destination_cluster", "svc"), ("tenant", "t1"))
    bare = View({})
    # skip_if_absent drops the entry only; a missing header without it drops the descriptor
    assert descriptor_for(a, bare) == (("remote_address", "10.0.0.9"), ("generic_key", "api"))
    assert descriptor_for(b, bare) is None
    assert descriptor_for(a, View({}, ip=None)) is None


@pytest.mark.parametrize("item,path", [
    ({"actions": [{"source_cluster": {}}]}, "r[0].actions[0].source_cluster"),
    ({"actions": [{"header_value_match": {}}]}, "r[0].actions[0].header_value_match"),
    ({"actions": []}, "r[0].actions"),
    ({"actions": [{"generic_key": {}}]}, "r[0].actions[0].generic_key.descriptor_value"),
    ({"actions": [{"remote_address": {}}], "limit": {}}, "r[0].limit"),
    ({"actions": [{"remote_address": {}}], "stage": 2}, "r[0].stage"),
    ({"actions": [{"remote_address": {}, "generic_key": {"descriptor_value": "x"}}]},
     "r[0].actions[0]"),
])
def test_route_action_refusals(item, path):
    with pytest.raises(ConfigError) as e:
        route_rate_limits_from_envoy([item], "r")
    assert e.value.path == path


def test_x_ratelimit_headers_from_least_remaining():
    resp = RlsResponse(RlsCode.OK, (
        RlsDescriptorStatus(RlsCode.OK, RlsLimit(100, RlsUnit.MINUTE), 40, 30),
        RlsDescriptorStatus(RlsCode.OK, None, 0, None),
        RlsDescriptorStatus(RlsCode.OK, RlsLimit(10, RlsUnit.SECOND, "per-ip"), 3, 1),
    ))
    assert dict(x_ratelimit_headers(resp)) == {
        "x-ratelimit-limit": '10, 100;w=60, 10;w=1;name="per-ip"',
        "x-ratelimit-remaining": "3", "x-ratelimit-reset": "1"}
    assert x_ratelimit_headers(RlsResponse(RlsCode.OK, ())) == ()
