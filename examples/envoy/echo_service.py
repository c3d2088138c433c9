"""A tiny HTTP service for trying the examples: answers every request with JSON naming the
service and echoing the method, path and request headers it received.

    python examples/envoy/echo_service.py api 8081 &
    python examples/envoy/echo_service.py web 8082 &
"""

import sys

from aiohttp import web


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"service": name, "method": request.method,
                                  "path": request.path_qs, "headers": dict(request.headers)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *_: print(f"{name} on :{port}"))


if __name__ == "__main__":
    main()
