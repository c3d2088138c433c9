"""A real rate limit service for tests and examples: Envoy's
``envoy.service.ratelimit.v3.RateLimitService`` on grpcio (a different gRPC stack from the
client's grpclib, so the two check each other), counting in Redis.

Limits follow envoyproxy/ratelimit's config shape::

    {"domain": "edge",
     "descriptors": [
       {"key": "remote_address", "rate_limit": {"unit": "second", "requests_per_unit": 5}},
       {"key": "generic_key", "value": "slow",
        "descriptors": [{"key": "path", "rate_limit": {"unit": "minute",
                                                       "requests_per_unit": 2,
                                                       "name": "slow-path"}}]}]}

A request descriptor walks the tree entry by entry (a node with the same key and value, else
the same key and no value: one counter per value); its limit is the last node's. Any
descriptor over its limit makes the answer OVER_LIMIT. Counts are fixed windows in Redis
(``RedisRateLimit``), keyed by domain, entries and window.

Optional top-level keys shape every answer: ``response_headers_to_add`` and
``request_headers_to_add`` (``{name: value}``), ``over_limit_body`` (the ``raw_body`` of an
OVER_LIMIT answer), ``dynamic_metadata`` (a JSON object), ``delay_s`` (answer that late: a
slow service, for timeouts).

Run it: ``python -m sidecar.shared.testing_rls --port 8081 --redis 127.0.0.1:6379
--config limits.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import time
from dataclasses import dataclass
from typing import Any

import grpc
from envoy_data_plane.envoy.config.core.v3 import HeaderValue
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitResponseCode,
    RateLimitResponseDescriptorStatus,
    RateLimitResponseRateLimit,
    RateLimitResponseRateLimitUnit,
)
from envoy_data_plane.google.protobuf import Struct

from sidecar.config.stores import RedisStoreConfig
from sidecar.core.limits import FailurePolicy
from sidecar.shared.redis_store import RedisRateLimit, RedisStore
from sidecar.shared.rls import UNIT_SECONDS, RlsUnit

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"


@dataclass(frozen=True, slots=True)
class Node:
    key: str
    value: str
    limit: tuple[int, RlsUnit, str] | None           # (requests_per_unit, unit, name)
    children: tuple["Node", ...]


def _nodes(items: list[dict[str, Any]]) -> tuple[Node, ...]:
    out = []
    for d in items:
        rl = d.get("rate_limit")
        limit = None
        if rl is not None:
            limit = (int(rl["requests_per_unit"]), RlsUnit[rl["unit"].upper()], rl.get("name", ""))
        out.append(Node(d["key"], d.get("value", ""), limit, _nodes(d.get("descriptors", []))))
    return tuple(out)


class RateLimitService:
    def __init__(self, config: dict[str, Any], store: RedisStore,
                 response_headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.domain = config["domain"]
        self.tree = _nodes(config.get("descriptors", []))
        self.limit = RedisRateLimit(store, FailurePolicy.FAIL_CLOSED)
        self.response_headers = response_headers + tuple(
            config.get("response_headers_to_add", {}).items())
        self.request_headers = tuple(config.get("request_headers_to_add", {}).items())
        self.over_limit_body = config.get("over_limit_body", "").encode()
        self.dynamic_metadata = config.get("dynamic_metadata")
        self.delay_s = float(config.get("delay_s", 0.0))
        self.requests = 0
        self.seen: list[RateLimitRequest] = []

    def _match(self, entries: list[tuple[str, str]]) -> tuple[Node | None, str]:
        level, node, path = self.tree, None, []
        for k, v in entries:
            exact = next((n for n in level if n.key == k and n.value == v), None)
            node = exact or next((n for n in level if n.key == k and not n.value), None)
            if node is None:
                return None, ""
            path.append(f"{k}_{v}")
            level = node.children
        return node, "_".join(path)

    async def should_rate_limit(self, req: RateLimitRequest,
                                context: grpc.aio.ServicerContext) -> RateLimitResponse:
        self.requests += 1
        self.seen.append(req)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if req.domain != self.domain:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown domain {req.domain}")
        hits = req.hits_addend or 1
        now = time.time()
        statuses = []
        overall = RateLimitResponseCode.OK
        for d in req.descriptors:
            node, key = self._match([(e.key, e.value) for e in d.entries])
            if node is None or node.limit is None:
                statuses.append(RateLimitResponseDescriptorStatus(code=RateLimitResponseCode.OK))
                continue
            per_unit, unit, name = node.limit
            window = UNIT_SECONDS[unit]
            got = await self.limit.hit(f"{self.domain}:{key}", per_unit, window, now, hits)
            if not got.from_store:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "redis unavailable")
            code = RateLimitResponseCode.OK if got.allowed else RateLimitResponseCode.OVER_LIMIT
            if not got.allowed:
                overall = RateLimitResponseCode.OVER_LIMIT
            statuses.append(RateLimitResponseDescriptorStatus(
                code=code, limit_remaining=got.remaining,
                current_limit=RateLimitResponseRateLimit(
                    name=name, requests_per_unit=per_unit,
                    unit=RateLimitResponseRateLimitUnit(int(unit))),
                duration_until_reset=datetime.timedelta(seconds=got.reset_s)))
        return RateLimitResponse(
            overall_code=overall, statuses=statuses,
            response_headers_to_add=[HeaderValue(key=k, value=v)
                                     for k, v in self.response_headers],
            request_headers_to_add=[HeaderValue(key=k, value=v)
                                    for k, v in self.request_headers],
            raw_body=self.over_limit_body if overall == RateLimitResponseCode.OVER_LIMIT else b"",
            dynamic_metadata=Struct.from_dict(self.dynamic_metadata)
            if self.dynamic_metadata else None)


async def serve(port: int, service: RateLimitService) -> grpc.aio.Server:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
            service.should_rate_limit, request_deserializer=RateLimitRequest.parse,
            response_serializer=bytes)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--redis", default="127.0.0.1:6379", help="host:port")
    ap.add_argument("--config", required=True, help="a JSON file of limits")
    ap.add_argument("--prefix", default="rls:", help="Redis key prefix (several services, "
                                                     "one Redis)")
    a = ap.parse_args()
    host, _, rport = a.redis.rpartition(":")
    with open(a.config) as f:
        config = json.load(f)

    async def run() -> None:
        store = RedisStore(RedisStoreConfig(name="rls", host=host, port=int(rport),
                                            timeout_s=0.5, key_prefix=a.prefix))
        server = await serve(a.port, RateLimitService(config, store))
        print(f"rate limit service on 127.0.0.1:{a.port}", flush=True)
        await server.wait_for_termination()
    asyncio.run(run())


if __name__ == "__main__":
    main()
