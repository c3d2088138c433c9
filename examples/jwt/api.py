"""The demo API behind examples/jwt/sidecar.yaml: it trusts the sidecar for authentication
and reads the caller from the headers the jwt_authn filter adds.

    python examples/jwt/api.py [--port 8081]
"""

from __future__ import annotations

import argparse
import base64
import json

from aiohttp import web


def claims_from(request: web.Request) -> dict:
    seg = request.headers.get("x-jwt-payload", "")
    if not seg:
        return {}
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"user": request.headers.get("x-user"), "claims": claims_from(request),
                              "path": request.path})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/api/whoami", whoami)
    app.router.add_get("/api/admin/{tail:.*}", whoami)
    app.router.add_get("/api/{tail:.*}", whoami)
    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8081)
    a = ap.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=a.port)
