"""Kafka broker filter and topic ACL config: accepted as documented, everything else refused
by name."""

from __future__ import annotations

import pytest

from sidecar.config.errors import ConfigError
from sidecar.config.kafka import (
    KAFKA_BROKER_FILTER,
    KAFKA_BROKER_TYPE,
    TOPIC_ACL_FILTER,
    TOPIC_ACL_TYPE,
    AclAction,
    BrokerAddressRewriteRule,
    TopicOperation,
    kafka_broker_from_envoy,
    kafka_broker_from_envoy_chain,
    kafka_broker_from_native,
    topic_acl_from_envoy,
    topic_acl_from_native,
)

P = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def envoy(**fields):
    return {"@type": KAFKA_BROKER_TYPE, **fields}


def refused(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


def test_envoy_config_as_is() -> None:
    cfg = kafka_broker_from_envoy(envoy(
        stat_prefix="kafka", force_response_rewrite=True,
        id_based_broker_address_rewrite_spec={"rules": [
            {"id": 0, "host": "127.0.0.1", "port": 19092},
            {"id": "1", "host": "h", "port": 19093},
            {"id": 0, "host": "ignored", "port": 1}]}), P)
    assert cfg.stat_prefix == "kafka" and cfg.force_response_rewrite
    assert cfg.broker_address_rewrite_rules[1] == BrokerAddressRewriteRule(1, "h", 19093)
    assert cfg.broker_address(0) == ("127.0.0.1", 19092)   # first rule of an id wins (Envoy)
    assert cfg.broker_address(5) is None
    assert cfg.topic_acl is None
    minimal = kafka_broker_from_envoy(envoy(stat_prefix="k"), P)
    assert not minimal.force_response_rewrite and not minimal.rewrites_broker_addresses


@pytest.mark.parametrize("fields, path, words", [
    ({"stat_prefix": "k", "api_keys_allowed": [0]}, P + ".api_keys_allowed", "unsupported"),
    ({"stat_prefix": "k", "api_keys_denied": [0]}, P + ".api_keys_denied", "unsupported"),
    ({}, P + ".stat_prefix", "required"),
    ({"stat_prefix": ""}, P + ".stat_prefix", "empty"),
    ({"stat_prefix": "k", "force_response_rewrite": "yes"}, P + ".force_response_rewrite",
     "boolean"),
    ({"stat_prefix": "k", "id_based_broker_address_rewrite_spec": {"rules": [
        {"id": 1, "host": "h", "port": 70000}]}},
     P + ".id_based_broker_address_rewrite_spec.rules[0].port", "0..65535"),
    ({"stat_prefix": "k", "id_based_broker_address_rewrite_spec": {"rules": [
        {"id": -1, "host": "h", "port": 1}]}},
     P + ".id_based_broker_address_rewrite_spec.rules[0].id", "0.."),
    ({"stat_prefix": "k", "id_based_broker_address_rewrite_spec": {"rules": [
        {"id": 1, "port": 1}]}},
     P + ".id_based_broker_address_rewrite_spec.rules[0].host", "required"),
    ({"stat_prefix": "k", "id_based_broker_address_rewrite_spec": {"rules": [
        {"id": 1, "host": "h", "port": 1, "rack": "r"}]}},
     P + ".id_based_broker_address_rewrite_spec.rules[0].rack", "unsupported"),
    ({"stat_prefix": "k", "id_based_broker_address_rewrite_spec": {"regex": "x"}},
     P + ".id_based_broker_address_rewrite_spec.regex", "unsupported"),
])
def test_envoy_config_refusals(fields, path, words) -> None:
    err = refused(kafka_broker_from_envoy, envoy(**fields), P)
    assert err.path == path and words in err.message


def test_wrong_type_url() -> None:
    err = refused(kafka_broker_from_envoy, {"@type": "type.googleapis.com/x.Y",
                                            "stat_prefix": "k"}, P)
    assert err.path == P + ".@type"


ACL = {
    "default_action": "DENY",
    "rules": [
        {"action": "DENY", "principals": [{"any": True}], "topics": [{"exact": "audit"}],
         "operations": ["PRODUCE"]},
        {"action": "ALLOW", "principals": [{"prefix": "spiffe://td/ns/shop/"}],
         "topics": [{"prefix": "orders."}, {"exact": "audit"}],
         "operations": ["PRODUCE", "FETCH"]},
    ],
}


def test_topic_acl_decisions() -> None:
    acl = topic_acl_from_envoy({"@type": TOPIC_ACL_TYPE, **ACL}, "f")
    shop = "spiffe://td/ns/shop/sa/api"
    assert acl.decide(shop, "orders.eu", TopicOperation.PRODUCE) is AclAction.ALLOW
    assert acl.decide(shop, "audit", TopicOperation.PRODUCE) is AclAction.DENY   # first wins
    assert acl.decide(shop, "audit", TopicOperation.FETCH) is AclAction.ALLOW
    assert acl.decide("spiffe://td/ns/other/sa/x", "orders.eu",
                      TopicOperation.FETCH) is AclAction.DENY                    # default
    assert acl.decide(None, "orders.eu", TopicOperation.FETCH) is AclAction.DENY
    open_acl = topic_acl_from_native({"default_action": "ALLOW"}, "acl")
    assert open_acl.decide(None, "x", TopicOperation.PRODUCE) is AclAction.ALLOW


@pytest.mark.parametrize("acl, path, words", [
    ({"default_action": "MAYBE"}, "acl.default_action", "ALLOW, DENY"),
    ({"rules": [{"principals": [{"any": True}], "topics": [{"any": True}],
                 "operations": ["FETCH"]}]}, "acl.rules[0].action", "required"),
    ({"rules": [{"action": "ALLOW", "principals": [], "topics": [{"any": True}],
                 "operations": ["FETCH"]}]}, "acl.rules[0].principals", "at least one"),
    ({"rules": [{"action": "ALLOW", "principals": [{"exact": "alice"}],
                 "topics": [{"any": True}], "operations": ["FETCH"]}]},
     "acl.rules[0].principals[0].exact", "SPIFFE"),
    ({"rules": [{"action": "ALLOW", "principals": [{"any": True}],
                 "topics": [{"exact": "a", "prefix": "b"}], "operations": ["FETCH"]}]},
     "acl.rules[0].topics[0]", "exactly one"),
    ({"rules": [{"action": "ALLOW", "principals": [{"any": False}],
                 "topics": [{"any": True}], "operations": ["FETCH"]}]},
     "acl.rules[0].principals[0].any", "true"),
    ({"rules": [{"action": "ALLOW", "principals": [{"any": True}],
                 "topics": [{"regex": ".*"}], "operations": ["FETCH"]}]},
     "acl.rules[0].topics[0].regex", "unsupported"),
    ({"rules": [{"action": "ALLOW", "principals": [{"any": True}],
                 "topics": [{"any": True}], "operations": ["DELETE"]}]},
     "acl.rules[0].operations[0]", "PRODUCE, FETCH"),
    ({"rules": [{"action": "ALLOW", "principals": [{"any": True}],
                 "topics": [{"any": True}], "operations": ["FETCH"], "hosts": ["x"]}]},
     "acl.rules[0].hosts", "unsupported"),
])
def test_topic_acl_refusals(acl, path, words) -> None:
    err = refused(topic_acl_from_native, acl, "acl")
    assert err.path == path and words in err.message


def test_native_kafka_broker_with_topic_acl() -> None:
    cfg = kafka_broker_from_native({"stat_prefix": "k", "topic_acl": ACL}, "listeners[0].kafka")
    assert cfg.topic_acl is not None and len(cfg.topic_acl.rules) == 2
    err = refused(kafka_broker_from_native, {"stat_prefix": "k", "acl": {}}, "l.kafka")
    assert err.path == "l.kafka.acl"


def chain(*entries):
    return list(entries)


BROKER = {"name": KAFKA_BROKER_FILTER, "typed_config": envoy(stat_prefix="k")}
TOPIC_ACL = {"name": TOPIC_ACL_FILTER, "typed_config": {"@type": TOPIC_ACL_TYPE, **ACL}}
TCP = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {}}


def test_envoy_chain_pairs_the_acl_with_the_broker_filter() -> None:
    cfg = kafka_broker_from_envoy_chain(chain(TOPIC_ACL, BROKER, TCP), "fc.filters")
    assert cfg is not None and cfg.topic_acl is not None
    assert kafka_broker_from_envoy_chain(chain(BROKER, TCP), "fc.filters").topic_acl is None
    assert kafka_broker_from_envoy_chain(chain(TCP), "fc.filters") is None


@pytest.mark.parametrize("entries, path, words", [
    ((TOPIC_ACL, TCP), "fc.filters[0]", "needs"),
    ((BROKER, TOPIC_ACL, TCP), "fc.filters[1]", "before"),
    ((TOPIC_ACL, TOPIC_ACL, BROKER), "fc.filters[1].name", "twice"),
    ((BROKER, BROKER), "fc.filters[1].name", "twice"),
])
def test_envoy_chain_refusals(entries, path, words) -> None:
    err = refused(kafka_broker_from_envoy_chain, list(entries), "fc.filters")
    assert err.path == path and words in err.message
