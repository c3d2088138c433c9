"""Readers both config formats share (key files, header and claim names, provider lists)."""

from __future__ import annotations

import re

from filters.jwt_authn.config import MAX_JWKS_BYTES, ClaimPath
from filters.jwt_authn.keys import KeySet, parse_jwks
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_URL = re.compile(r"^https?://[^/\s]+")


def read_file(name: str, path: str) -> bytes:
    """A key file, at most ``MAX_JWKS_BYTES``."""
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, f"cannot read {name}: {e.strerror}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise ConfigError(path, f"{name} is larger than {MAX_JWKS_BYTES} bytes")
    return data


def keys_or_error(data: bytes | dict[str, object], path: str) -> KeySet:
    try:
        return parse_jwks(data)
    except ValueError as e:
        raise ConfigError(path, f"invalid JWKS: {e}") from None


def header_name(v: str, path: str) -> str:
    if not v or not _HEADER_NAME.fullmatch(v):
        raise ConfigError(path, f"not a valid header name: {v!r}")
    return v.lower()


def http_url(uri: str, path: str) -> str:
    if not _HTTP_URL.match(uri):
        raise ConfigError(path, "must be an http:// or https:// URL")
    return uri


def claim_path(name: str, path: str) -> ClaimPath:
    parts = tuple(name.split("."))
    if not all(parts):
        raise ConfigError(path, f"not a claim name: {name!r}")
    return parts


def str_list(d: dict[str, object], key: str, path: str) -> tuple[str, ...]:
    items = w.seq(d, key, path, [])
    out = []
    for i, x in enumerate(items):
        if not isinstance(x, str) or not x:
            raise ConfigError(w.join(w.join(path, key), i), "must be a non-empty string")
        out.append(x)
    return tuple(out)


def known(name: str, names: set[str] | None, path: str) -> None:
    """``name`` must be a configured provider (``names`` None: not known yet, checked when
    the route is built)."""
    if names is not None and name not in names:
        raise ConfigError(path, f"unknown provider {name!r} (known: {', '.join(sorted(names))})")
