"""A trivial filter (scratch check of the SDK): adds ``x-served-by: <value>`` to responses."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import wire as w
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, FilterSpec, Handler, no_state
from sidecar.core.message import Request, Response

TYPE_URL = "type.googleapis.com/sidecar.filters.http.served_by.v1.ServedBy"


@dataclass(frozen=True, slots=True)
class ServedByConfig:
    value: str


def from_config(raw: object, path: str) -> ServedByConfig:
    d = w.check_keys(raw, ("value",), path)
    return ServedByConfig(w.string(d, "value", path, nonempty=True))


class ServedByFilter(Filter):
    def __init__(self, value: str):
        self.value = value

    async def __call__(self, req: Request, next: Handler) -> Response:
        resp = await next(req)
        resp.headers["x-served-by"] = self.value
        return resp


def build(config: ServedByConfig, per_route: None, state: None, env: FilterEnv,
          route: RouteInfo) -> ServedByFilter:
    return ServedByFilter(config.value)


SPEC: FilterSpec[ServedByConfig, None, None] = FilterSpec(
    name="sidecar.filters.http.served_by", short="served_by", type_url=TYPE_URL,
    from_envoy=from_config, from_native=from_config, new_state=no_state, build=build)
