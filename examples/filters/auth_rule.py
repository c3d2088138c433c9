"""Example user filter: deny by a custom rule that asks an auth service, through a cluster.

For the methods it guards, the filter POSTs ``{"method", "path", "user"}`` as JSON to the
auth service's ``/check`` through the ``auth`` cluster (its load balancing, circuit breakers
and TLS apply) and lets the request through only when the answer is ``{"allow": true}``. The
service's ``reason`` goes back to the client in the 403 body. If the service cannot be
reached in time the request is denied (503), unless ``fail_open`` is set.

    filters:
      - python:
          module: examples/filters/auth_rule.py
          class: AuthServiceRule
          config:
            cluster: auth
            methods: [POST, PUT, DELETE]
            user_header: x-user
            timeout: 250ms
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sidecar import sdk


@dataclass(frozen=True)
class Config:
    cluster: str
    path: str = "/check"
    methods: tuple[str, ...] = ("POST", "PUT", "PATCH", "DELETE")
    user_header: str = "x-user"
    timeout: sdk.Duration = 0.25
    fail_open: bool = False


class AuthServiceRule(sdk.UserFilter[Config, None, None]):
    config_type = Config

    def __init__(self, config: Config, setup: sdk.FilterSetup[None, None]) -> None:
        super().__init__(config, setup)
        self.client = setup.upstream(config.cluster)      # refused at load if no such cluster
        self.methods = frozenset(m.upper() for m in config.methods)
        self.user_header = config.user_header.lower()
        decisions = setup.counter("example_auth_rule_decisions_total",
                                  "Auth service decisions", ("filter", "decision"))
        self.allowed = decisions.labels(setup.name, "allow")
        self.denied = decisions.labels(setup.name, "deny")
        self.failed = decisions.labels(setup.name, "error")
        self.log = setup.log

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        if req.method not in self.methods:
            return await next(req)
        question = {"method": req.method, "path": req.path,
                    "user": req.headers.get(self.user_header) or sdk.peer_identity(req) or ""}
        try:
            answer = await sdk.http_call(
                self.client, "POST", self.config.path,
                headers={"content-type": "application/json"},
                body=json.dumps(question).encode(), timeout=self.config.timeout,
                max_response_bytes=64 * 1024)
            verdict = json.loads(answer.body) if answer.status == 200 else {}
        except (sdk.UpstreamError, sdk.BodyTooLarge, ValueError) as e:
            self.failed.inc()
            self.log.warning("auth service unavailable: %s", e)
            if self.config.fail_open:
                return await next(req)
            return sdk.local_reply(req.ctx, 503, "authorization service unavailable")
        if isinstance(verdict, dict) and verdict.get("allow") is True:
            self.allowed.inc()
            return await next(req)
        self.denied.inc()
        reason = verdict.get("reason") if isinstance(verdict, dict) else None
        return sdk.local_reply(req.ctx, 403, str(reason or "denied"))
