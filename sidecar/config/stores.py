"""Config of shared state and stores (``shared_state:``, ``stores:`` at the top of a native
config), parsed once into frozen dataclasses (native YAML).

::

    shared_state:                 # across the worker processes of one sidecar
      counter_rows: 4096          # clusters with breakers + endpoints (one row each)
      bucket_rows: 4096           # token buckets (filter configs x descriptor values)
      replay_entries: 100000      # live jti values remembered (JWT replay protection)
    stores:                       # across replicas: named stores that filters refer to
      main:
        redis:
          address: 127.0.0.1:6379
          db: 0
          username_env: REDIS_USER      # secrets come from the environment, never the file
          password_env: REDIS_PASSWORD
          timeout: 50ms                 # bound of every call (connect included)
          key_prefix: "sidecar:"
          retry_backoff: {base: 100ms, max: 5s}   # while down: no calls until the next try

A filter names a store and its failure policy (``StoreRef``)::

    replay_protection: {store: main, on_store_error: fail_closed}

Without ``stores`` everything stays in the process (or in the sidecar's shared memory with
several workers): a laptop needs no Redis.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.core.limits import FailurePolicy

MAX_WORKERS = 64             # one bit per worker in a row's attach mask


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    counter_rows: int = 4096
    bucket_rows: int = 4096
    replay_entries: int = 100_000


DEFAULT_SHARED_STATE = SharedStateConfig()


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 0.1
    max_s: float = 5.0


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True, slots=True)
class RedisStoreConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username_env: str = ""
    password_env: str = ""
    timeout_s: float = 0.05
    key_prefix: str = "sidecar:"
    backoff: Backoff = DEFAULT_BACKOFF

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password) read from the environment now; never logged, never stored
        in the config (so /config_dump cannot show them)."""
        user = os.environ.get(self.username_env) if self.username_env else None
        password = os.environ.get(self.password_env) if self.password_env else None
        return user, password

    def describe(self) -> str:
        """Where the store is, for status pages and logs (no credentials)."""
        return f"redis://{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True, slots=True)
class StoreRef:
    """A filter's use of a named store."""
    store: str
    on_store_error: FailurePolicy


@dataclass(frozen=True, slots=True)
class StoresConfig:
    shared_state: SharedStateConfig = SharedStateConfig()
    redis: tuple[RedisStoreConfig, ...] = ()

    def get(self, name: str) -> RedisStoreConfig | None:
        for r in self.redis:
            if r.name == name:
                return r
        return None


# ---- parsing ----------------------------------------------------------------------------------

def shared_state_from_native(d: Any, path: str) -> SharedStateConfig:
    w.check_keys(d, ("counter_rows", "bucket_rows", "replay_entries"), path)
    return SharedStateConfig(
        counter_rows=w.integer(d, "counter_rows", path, 4096, lo=16, hi=1 << 20),
        bucket_rows=w.integer(d, "bucket_rows", path, 4096, lo=16, hi=1 << 20),
        replay_entries=w.integer(d, "replay_entries", path, 100_000, lo=16, hi=1 << 26))


def _address(v: Any, path: str) -> tuple[str, int]:
    if not isinstance(v, str) or not v:
        raise ConfigError(path, "must be host:port")
    host, sep, port = v.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(path, f"must be host:port with a port 1..65535; got {v!r}")
    return host, int(port)


def _env_name(d: Mapping[str, Any], key: str, path: str) -> str:
    v = w.string(d, key, path, "")
    if v and not v.replace("_", "").isalnum():
        raise ConfigError(w.join(path, key), "must be an environment variable name")
    return v


def redis_from_native(name: str, d: Any, path: str) -> RedisStoreConfig:
    w.check_keys(d, ("address", "db", "username_env", "password_env", "timeout", "key_prefix",
                     "retry_backoff", "password", "username", "tls"), path)
    for secret in ("password", "username"):
        if secret in d:
            raise ConfigError(w.join(path, secret),
                              f"is not read from the config file; use {secret}_env")
    if "tls" in d:
        raise ConfigError(w.join(path, "tls"), "TLS to Redis is not supported yet")
    host, port = _address(d.get("address", "127.0.0.1:6379"), w.join(path, "address"))
    timeout = w.duration(d, "timeout", path, 0.05)
    if not 0.001 <= timeout <= 10.0:
        raise ConfigError(w.join(path, "timeout"), "must be between 1ms and 10s")
    backoff = Backoff()
    if d.get("retry_backoff") is not None:
        bp = w.join(path, "retry_backoff")
        b = w.check_keys(w.mapping(d, "retry_backoff", path), ("base", "max"), bp)
        backoff = Backoff(w.duration(b, "base", bp, 0.1), w.duration(b, "max", bp, 5.0))
        if not 0 < backoff.base_s <= backoff.max_s:
            raise ConfigError(bp, "needs 0 < base <= max")
    return RedisStoreConfig(
        name=name, host=host, port=port, db=w.integer(d, "db", path, 0, lo=0, hi=15),
        username_env=_env_name(d, "username_env", path),
        password_env=_env_name(d, "password_env", path),
        timeout_s=timeout, key_prefix=w.string(d, "key_prefix", path, "sidecar:"),
        backoff=backoff)


def stores_from_native(root: Mapping[str, Any], path: str = "") -> StoresConfig:
    """``shared_state`` and ``stores`` of a native config root (other keys are not ours)."""
    shared = SharedStateConfig()
    if root.get("shared_state") is not None:
        shared = shared_state_from_native(root["shared_state"], w.join(path, "shared_state"))
    redis = []
    sp = w.join(path, "stores")
    for name, body in w.mapping(root, "stores", path, {}).items():
        np = w.join(sp, str(name))
        if not isinstance(name, str) or not name:
            raise ConfigError(np, "a store needs a name")
        kinds = w.check_keys(body, ("redis",), np)
        if "redis" not in kinds:
            raise ConfigError(np, "needs redis: {...} (the only kind of store)")
        redis.append(redis_from_native(name, w.mapping(body, "redis", np), w.join(np, "redis")))
    return StoresConfig(shared_state=shared, redis=tuple(redis))


def store_ref_from_native(d: Any, path: str, stores: StoresConfig,
                          default_policy: FailurePolicy) -> StoreRef | None:
    """``{store: NAME, on_store_error: fail_open|fail_closed}`` inside a filter's config;
    None when no store is named (the in-process/shared-memory default)."""
    if not isinstance(d, dict) or d.get("store") is None:
        if isinstance(d, dict) and "on_store_error" in d:
            raise ConfigError(w.join(path, "on_store_error"), "needs store")
        return None
    name = w.string(d, "store", path, nonempty=True)
    if stores.get(name) is None:
        known = ", ".join(r.name for r in stores.redis) or "none defined"
        raise ConfigError(w.join(path, "store"), f"unknown store {name!r} (stores: {known})")
    policy = w.string(d, "on_store_error", path, default_policy.value,
                      choices=tuple(p.value for p in FailurePolicy))
    return StoreRef(store=name, on_store_error=FailurePolicy(policy))
