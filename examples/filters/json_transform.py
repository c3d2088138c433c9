"""Example user filter: transform JSON bodies.

On the way in, ``set`` fields are added to (or replace those of) JSON request bodies; on the
way out, ``redact`` fields are removed from JSON responses, at any depth. Bodies are buffered
up to ``max_bytes``: a larger JSON request is refused with 413, a larger response (or one of
unknown length) is passed through untouched, streaming. A body that is not valid JSON is
passed through unchanged.

    filters:
      - python:
          module: examples/filters/json_transform.py
          class: JsonTransform
          config:
            set: {source: "edge"}
            redact: [password, ssn]
            max_bytes: 65536
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated

from sidecar import sdk


@dataclass(frozen=True)
class Config:
    set: dict[str, object] = field(default_factory=dict)
    redact: tuple[str, ...] = ()
    max_bytes: Annotated[int, sdk.Range(1, 16 * 1024 * 1024)] = 64 * 1024


def _is_json(headers: sdk.Headers) -> bool:
    ct = headers.get("content-type", "")
    return ct.startswith("application/json") or ct.endswith("+json")


class JsonTransform(sdk.UserFilter[Config, None, None]):
    config_type = Config

    def __init__(self, config: Config, setup: sdk.FilterSetup[None, None]) -> None:
        super().__init__(config, setup)
        self.redact = frozenset(config.redact)

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        if self.config.set and _is_json(req.headers):
            try:
                body = await req.read_body(self.config.max_bytes)
            except sdk.BodyTooLarge:
                return sdk.local_reply(req.ctx, 413, "JSON body too large")
            doc = _loads(body)
            if isinstance(doc, dict):
                doc.update(self.config.set)
                req.body = json.dumps(doc).encode()
                req.headers.popall("content-length", None)   # the proxy frames the new body
        resp = await next(req)
        if not self.redact or not _is_json(resp.headers):
            return resp
        length = resp.headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > self.config.max_bytes:
            return resp
        doc = _loads(await resp.read_body(self.config.max_bytes))
        if doc is not None:
            resp.body = json.dumps(self._without(doc)).encode()
            resp.headers["content-length"] = str(len(resp.body))
        return resp

    def _without(self, v: object) -> object:
        if isinstance(v, dict):
            return {k: self._without(x) for k, x in v.items() if k not in self.redact}
        if isinstance(v, list):
            return [self._without(x) for x in v]
        return v


def _loads(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return None
