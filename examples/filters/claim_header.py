"""Example user filter: copy a claim of the verified JWT into a request header.

The upstream then reads ``x-user: alice`` instead of parsing the token itself. Any value the
client sent in that header is removed first, so it cannot be spoofed. Needs ``jwt_authn``
before it in the chain (it reads the claims that filter verified).

    filters:
      - jwt_authn: {...}
      - python:
          module: examples/filters/claim_header.py
          class: ClaimHeader
          config:
            claim: sub              # a top-level claim; "a.b" walks into objects
            header: x-user
            required: true          # no verified token or no such claim: 403

Per route (``filters: {ClaimHeader: {header: x-tenant-user}}``) another header name.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar import sdk


@dataclass(frozen=True)
class Config:
    claim: str
    header: str = "x-user"
    provider: str | None = None      # which jwt_authn provider's claims (default: the first)
    required: bool = False


@dataclass(frozen=True)
class PerRoute:
    header: str


class ClaimHeader(sdk.UserFilter[Config, PerRoute, None]):
    config_type = Config
    per_route_type = PerRoute

    def __init__(self, config: Config, setup: sdk.FilterSetup[PerRoute, None]) -> None:
        super().__init__(config, setup)
        self.header = (setup.per_route.header if setup.per_route else config.header).lower()
        self.path = tuple(config.claim.split("."))
        self.missing = setup.counter("example_claim_header_missing_total",
                                     "Requests without the claim", ("filter",)).labels(setup.name)

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        req.headers.popall(self.header, None)          # never trust the client's copy
        value = self._claim(sdk.jwt_claims(req, self.config.provider))
        if value is None:
            self.missing.inc()
            if self.config.required:
                return sdk.local_reply(req.ctx, 403, "missing claim " + self.config.claim)
        else:
            req.headers[self.header] = value
        return await next(req)

    def _claim(self, claims: object) -> str | None:
        v = claims
        for key in self.path:
            if not isinstance(v, dict) or key not in v:
                return None
            v = v[key]
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return ",".join(v)
        return None
