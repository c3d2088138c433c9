import pytest
import yaml

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
