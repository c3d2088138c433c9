"""Config of the Kafka broker network filter and of its topic ACL, parsed once, frozen.

Envoy's ``envoy.filters.network.kafka_broker`` (contrib, type
``envoy.extensions.filters.network.kafka_broker.v3.KafkaBroker``) is accepted as is:
``stat_prefix``, ``force_response_rewrite`` and ``id_based_broker_address_rewrite_spec``
(``rules``: ``id``, ``host``, ``port``). Anything else (e.g. the newer ``api_keys_allowed`` /
``api_keys_denied``) is refused by name.

The topic ACL is the sidecar's own: in an Envoy-format file it is a network filter placed
before kafka_broker in the same chain, named ``pysidecar.filters.network.kafka_topic_acl``
with ``@type: type.googleapis.com/pysidecar.kafka.v1.TopicAcl``; in the native YAML it is the
``topic_acl`` key of ``kafka_broker``. Both take the same fields (see docs/l4-kafka.md).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.config.errors import ConfigError

KAFKA_BROKER_FILTER = "envoy.filters.network.kafka_broker"
KAFKA_BROKER_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.kafka_broker.v3."
                     "KafkaBroker")
TOPIC_ACL_FILTER = "pysidecar.filters.network.kafka_topic_acl"
TOPIC_ACL_TYPE = "type.googleapis.com/pysidecar.kafka.v1.TopicAcl"
SPIFFE_SCHEME = "spiffe://"


# ---- model -----------------------------------------------------------------------------------

class AclAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class TopicOperation(enum.Enum):
    PRODUCE = "PRODUCE"
    FETCH = "FETCH"


@dataclass(frozen=True, slots=True)
class NameMatcher:
    """Exactly one of: ``exact``, ``prefix``, ``any`` (any value, even none)."""

    exact: str | None = None
    prefix: str | None = None
    any: bool = False

    def matches(self, value: str | None) -> bool:
        if self.any:
            return True
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        return self.prefix is not None and value.startswith(self.prefix)


@dataclass(frozen=True, slots=True)
class TopicAclRule:
    action: AclAction
    principals: tuple[NameMatcher, ...]
    topics: tuple[NameMatcher, ...]
    operations: frozenset[TopicOperation]

    def matches(self, principal: str | None, topic: str, operation: TopicOperation) -> bool:
        return (operation in self.operations
                and any(m.matches(principal) for m in self.principals)
                and any(m.matches(topic) for m in self.topics))


@dataclass(frozen=True, slots=True)
class TopicAclConfig:
    """First matching rule decides; no match -> ``default_action`` (DENY unless set)."""

    rules: tuple[TopicAclRule, ...]
    default_action: AclAction = AclAction.DENY

    def decide(self, principal: str | None, topic: str, operation: TopicOperation) -> AclAction:
        for rule in self.rules:
            if rule.matches(principal, topic, operation):
                return rule.action
        return self.default_action


@dataclass(frozen=True, slots=True)
class BrokerAddressRewriteRule:
    id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class KafkaBrokerConfig:
    stat_prefix: str
    force_response_rewrite: bool = False
    broker_address_rewrite_rules: tuple[BrokerAddressRewriteRule, ...] = ()
    topic_acl: TopicAclConfig | None = None
    # id -> (host, port); the first rule of an id wins, as in Envoy
    _addresses: Mapping[int, tuple[str, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        addresses: dict[int, tuple[str, int]] = {}
        for rule in self.broker_address_rewrite_rules:
            addresses.setdefault(rule.id, (rule.host, rule.port))
        object.__setattr__(self, "_addresses", addresses)

    def broker_address(self, broker_id: int) -> tuple[str, int] | None:
        return self._addresses.get(broker_id)

    @property
    def rewrites_broker_addresses(self) -> bool:
        return bool(self.broker_address_rewrite_rules)


# ---- readers ---------------------------------------------------------------------------------

def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(d: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(_join(path, str(key)), "unknown or unsupported field")


def _string(d: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
    value = d.get(key)
    if value is None:
        if required:
            raise ConfigError(_join(path, key), "is required")
        return None
    if not isinstance(value, str):
        raise ConfigError(_join(path, key), f"must be a string, got {type(value).__name__}")
    if not value:
        raise ConfigError(_join(path, key), "must not be empty")
    return value


def _bool(d: Mapping[str, Any], key: str, path: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(_join(path, key), f"must be a boolean, got {type(value).__name__}")
    return value


def _uint32(d: Mapping[str, Any], key: str, path: str, *, hi: int = 2**32 - 1) -> int:
    value = d.get(key, 0)   # proto3: an absent scalar is 0
    # proto3 JSON writes 32-bit integers as numbers or decimal strings
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(_join(path, key), f"must be an integer, got {type(value).__name__}")
    if not 0 <= value <= hi:
        raise ConfigError(_join(path, key), f"must be 0..{hi}, got {value}")
    return value


def _list(d: Mapping[str, Any], key: str, path: str, *, nonempty: bool = False) -> list[Any]:
    value = d.get(key)
    if value is None:
        value = []
    if not isinstance(value, list):
        raise ConfigError(_join(path, key), f"must be a list, got {type(value).__name__}")
    if nonempty and not value:
        raise ConfigError(_join(path, key), "must list at least one entry")
    return value


def _typed(typed_config: Any, path: str, expected: str) -> Mapping[str, Any]:
    d = _mapping(typed_config, path)
    if d.get("@type") != expected:
        raise ConfigError(_join(path, "@type"),
                          f"unsupported type {d.get('@type')!r}; expected {expected}")
    return {k: v for k, v in d.items() if k != "@type"}


# ---- KafkaBroker -----------------------------------------------------------------------------

_BROKER_FIELDS = ("stat_prefix", "force_response_rewrite", "id_based_broker_address_rewrite_spec")


def kafka_broker_from_envoy(typed_config: Any, path: str) -> KafkaBrokerConfig:
    """A ``typed_config`` of ``envoy.filters.network.kafka_broker``."""
    d = _typed(typed_config, path, KAFKA_BROKER_TYPE)
    _check_keys(d, _BROKER_FIELDS, path)
    return _kafka_broker(d, path, None)


def kafka_broker_from_native(d: Any, path: str) -> KafkaBrokerConfig:
    """The native YAML ``kafka_broker`` mapping: Envoy's fields plus ``topic_acl``."""
    d = _mapping(d, path)
    _check_keys(d, _BROKER_FIELDS + ("topic_acl",), path)
    acl = topic_acl_from_native(d["topic_acl"], _join(path, "topic_acl")) \
        if d.get("topic_acl") is not None else None
    return _kafka_broker(d, path, acl)


def _kafka_broker(d: Mapping[str, Any], path: str,
                  acl: TopicAclConfig | None) -> KafkaBrokerConfig:
    stat_prefix = _string(d, "stat_prefix", path, required=True)
    assert stat_prefix is not None
    rules: list[BrokerAddressRewriteRule] = []
    spec = d.get("id_based_broker_address_rewrite_spec")
    if spec is not None:
        sp = _join(path, "id_based_broker_address_rewrite_spec")
        spec = _mapping(spec, sp)
        _check_keys(spec, ("rules",), sp)
        for i, rule in enumerate(_list(spec, "rules", sp)):
            rp = _join(_join(sp, "rules"), i)
            rule = _mapping(rule, rp)
            _check_keys(rule, ("id", "host", "port"), rp)
            host = _string(rule, "host", rp, required=True)
            assert host is not None
            rules.append(BrokerAddressRewriteRule(
                id=_uint32(rule, "id", rp), host=host, port=_uint32(rule, "port", rp, hi=65535)))
    return KafkaBrokerConfig(stat_prefix=stat_prefix,
                             force_response_rewrite=_bool(d, "force_response_rewrite", path),
                             broker_address_rewrite_rules=tuple(rules), topic_acl=acl)


# ---- TopicAcl --------------------------------------------------------------------------------

_ACL_FIELDS = ("default_action", "rules")
_RULE_FIELDS = ("action", "principals", "topics", "operations")


def topic_acl_from_envoy(typed_config: Any, path: str) -> TopicAclConfig:
    """A ``typed_config`` of ``pysidecar.kafka.v1.TopicAcl``."""
    return _topic_acl(_typed(typed_config, path, TOPIC_ACL_TYPE), path)


def topic_acl_from_native(d: Any, path: str) -> TopicAclConfig:
    return _topic_acl(_mapping(d, path), path)


def _enum(cls: type[enum.Enum], value: Any, path: str) -> Any:
    names = tuple(m.value for m in cls)
    if value not in names:
        raise ConfigError(path, f"must be one of {', '.join(names)}; got {value!r}")
    return cls(value)


def _topic_acl(d: Mapping[str, Any], path: str) -> TopicAclConfig:
    _check_keys(d, _ACL_FIELDS, path)
    default = AclAction.DENY
    if d.get("default_action") is not None:
        default = _enum(AclAction, d["default_action"], _join(path, "default_action"))
    rules = []
    for i, rule in enumerate(_list(d, "rules", path)):
        rp = _join(_join(path, "rules"), i)
        rule = _mapping(rule, rp)
        _check_keys(rule, _RULE_FIELDS, rp)
        if rule.get("action") is None:
            raise ConfigError(_join(rp, "action"), "is required")
        action = _enum(AclAction, rule["action"], _join(rp, "action"))
        principals = tuple(_matcher(m, _join(_join(rp, "principals"), j), spiffe=True)
                           for j, m in enumerate(_list(rule, "principals", rp, nonempty=True)))
        topics = tuple(_matcher(m, _join(_join(rp, "topics"), j), spiffe=False)
                       for j, m in enumerate(_list(rule, "topics", rp, nonempty=True)))
        operations = frozenset(
            _enum(TopicOperation, op, _join(_join(rp, "operations"), j))
            for j, op in enumerate(_list(rule, "operations", rp, nonempty=True)))
        rules.append(TopicAclRule(action=action, principals=principals, topics=topics,
                                  operations=operations))
    return TopicAclConfig(rules=tuple(rules), default_action=default)


def _matcher(d: Any, path: str, *, spiffe: bool) -> NameMatcher:
    d = _mapping(d, path)
    _check_keys(d, ("exact", "prefix", "any"), path)
    present = [k for k in ("exact", "prefix", "any") if d.get(k) is not None]
    if len(present) != 1:
        raise ConfigError(path, "must set exactly one of exact, prefix, any")
    kind = present[0]
    if kind == "any":
        if d["any"] is not True:
            raise ConfigError(_join(path, "any"), "must be true when set")
        return NameMatcher(any=True)
    value = _string(d, kind, path, required=True)
    assert value is not None
    # the principal is the client certificate's SPIFFE ID: anything else could never match
    if spiffe and not value.startswith(SPIFFE_SCHEME):
        raise ConfigError(_join(path, kind), f"must be a SPIFFE ID ({SPIFFE_SCHEME}...)")
    return NameMatcher(exact=value) if kind == "exact" else NameMatcher(prefix=value)


# ---- a filter chain --------------------------------------------------------------------------

def kafka_broker_from_envoy_chain(filters: Sequence[Any], path: str
                                  ) -> KafkaBrokerConfig | None:
    """The Kafka config of an Envoy listener's ``filter_chains[i].filters`` list, or None.

    Pairs the sidecar's TopicAcl filter with the kafka_broker filter after it; an ACL with no
    kafka_broker after it would enforce nothing, so it is refused. Other filters are left to
    the caller.
    """
    acl: TopicAclConfig | None = None
    acl_index = -1
    broker: KafkaBrokerConfig | None = None
    for i, entry in enumerate(filters):
        ep = _join(path, i)
        entry = _mapping(entry, ep)
        name = entry.get("name")
        if name == TOPIC_ACL_FILTER:
            if acl is not None:
                raise ConfigError(_join(ep, "name"), f"{TOPIC_ACL_FILTER} is set twice")
            acl = topic_acl_from_envoy(entry.get("typed_config"), _join(ep, "typed_config"))
            acl_index = i
        elif name == KAFKA_BROKER_FILTER:
            if broker is not None:
                raise ConfigError(_join(ep, "name"), f"{KAFKA_BROKER_FILTER} is set twice")
            broker = kafka_broker_from_envoy(entry.get("typed_config"), _join(ep, "typed_config"))
            if acl is not None:
                broker = dataclasses.replace(broker, topic_acl=acl)
    if acl is not None and broker is None:
        raise ConfigError(_join(path, acl_index),
                          f"{TOPIC_ACL_FILTER} needs a {KAFKA_BROKER_FILTER} filter after it "
                          "in the same chain")
    if acl is not None and broker is not None and broker.topic_acl is None:
        raise ConfigError(_join(path, acl_index),
                          f"{TOPIC_ACL_FILTER} must come before {KAFKA_BROKER_FILTER}")
    return broker
