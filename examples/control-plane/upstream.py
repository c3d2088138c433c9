"""A tiny HTTP service for the example: answers every request with its own name and port.

    python examples/control-plane/upstream.py 19001
"""
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    port = request.app["port"]
    return web.json_response({"upstream": f"backend-{port}", "path": request.path_qs})


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application()
    app["port"] = port
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
