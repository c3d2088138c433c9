"""examples/filters/auth_rule.py with the SDK's test helpers: the auth cluster is answered
in-process by ``FilterTestEnv(upstreams=...)`` (the integration test uses a real server)."""

from __future__ import annotations

import json

import pytest

from examples.filters.auth_rule import AuthServiceRule
from sidecar.sdk import ConfigError, ConnectFailure, Request, Response
from sidecar.testing import FilterTestEnv, RecordingNext, build_user_filter, make_request


async def auth_service(req: Request) -> Response:
    q = json.loads(req.body)
    allow = q["user"] == "alice" or (q["method"] == "DELETE" and q["user"] == "admin")
    return Response(200, body=json.dumps({"allow": allow, "reason": f"{q['user']} may not"}).encode())


async def test_asks_the_service_for_guarded_methods_only():
    env = FilterTestEnv(upstreams={"auth": auth_service})
    f = build_user_filter(AuthServiceRule, {"cluster": "auth", "methods": ["POST", "DELETE"]},
                          env=env, name="rule")
    upstream = RecordingNext()
    assert (await f(make_request("GET"), upstream)).status == 200
    assert env.upstreams["auth"].requests == []
    resp = await f(make_request("POST", "/orders", headers={"x-user": "bob"}), upstream)
    assert resp.status == 403 and resp.body == b"bob may not"
    asked = env.upstreams["auth"].requests[-1]
    assert (asked.method, asked.path) == ("POST", "/check")
    assert json.loads(asked.body) == {"method": "POST", "path": "/orders", "user": "bob"}
    assert (await f(make_request("POST", headers={"x-user": "alice"}), upstream)).status == 200
    assert env.metric("example_auth_rule_decisions_total", filter="rule", decision="deny") == 1
    assert env.metric("example_auth_rule_decisions_total", filter="rule", decision="allow") == 1


async def test_peer_identity_is_the_user_without_a_header():
    env = FilterTestEnv(upstreams={"auth": auth_service})
    f = build_user_filter(AuthServiceRule, {"cluster": "auth"}, env=env)
    resp = await f(make_request("POST", peer_identity="alice"), RecordingNext())
    assert resp.status == 200


@pytest.mark.parametrize("fail_open, status", [(False, 503), (True, 200)])
async def test_unreachable_service(fail_open, status):
    async def down(req: Request) -> Response:
        raise ConnectFailure("connection refused")

    env = FilterTestEnv(upstreams={"auth": down})
    f = build_user_filter(AuthServiceRule, {"cluster": "auth", "fail_open": fail_open}, env=env)
    assert (await f(make_request("POST"), RecordingNext())).status == status


def test_unknown_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match="no cluster named 'auth'"):
        build_user_filter(AuthServiceRule, {"cluster": "auth"})
