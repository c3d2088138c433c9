"""examples/filters/claim_header.py, tested with the SDK's test helpers (no sockets)."""

from __future__ import annotations

import pytest

from examples.filters.claim_header import ClaimHeader
from sidecar.sdk import ConfigError
from sidecar.testing import FilterTestEnv, RecordingNext, build_user_filter, make_request


async def test_copies_the_claim_and_drops_the_clients_copy():
    f = build_user_filter(ClaimHeader, {"claim": "sub", "header": "X-User"})
    upstream = RecordingNext()
    resp = await f(make_request(headers={"x-user": "mallory"}, jwt={"p": {"sub": "alice"}}),
                   upstream)
    assert resp.status == 200
    assert upstream.last.headers.getall("x-user") == ["alice"]


async def test_nested_claims_lists_and_providers():
    f = build_user_filter(ClaimHeader, {"claim": "org.roles", "provider": "b"})
    upstream = RecordingNext()
    await f(make_request(jwt={"a": {"org": {"roles": ["x"]}}, "b": {"org": {"roles": ["r1", "r2"]}}}),
            upstream)
    assert upstream.last.headers["x-user"] == "r1,r2"


async def test_missing_claim_is_counted_and_denied_when_required():
    env = FilterTestEnv()
    f = build_user_filter(ClaimHeader, {"claim": "sub", "required": True}, env=env, name="ch")
    upstream = RecordingNext()
    resp = await f(make_request(headers={"x-user": "mallory"}), upstream)
    assert resp.status == 403 and not upstream.called
    assert env.metric("example_claim_header_missing_total", filter="ch") == 1


async def test_per_route_header():
    f = build_user_filter(ClaimHeader, {"claim": "sub"}, per_route={"header": "x-tenant-user"})
    upstream = RecordingNext()
    await f(make_request(jwt={"p": {"sub": "bob"}}), upstream)
    assert upstream.last.headers["x-tenant-user"] == "bob" and "x-user" not in upstream.last.headers


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match=r"^config.claim: is required$"):
        build_user_filter(ClaimHeader, {"header": "x"})
    with pytest.raises(ConfigError, match=r"^per_route.surprise: unknown"):
        build_user_filter(ClaimHeader, {"claim": "sub"}, per_route={"header": "h", "surprise": 1})
