"""The example's gRPC service, on grpcio with generic handlers (raw bytes, so no generated
code): ``demo.Greeter`` and the standard ``grpc.health.v1.Health`` service.

* ``SayHello``: ``b"name"`` -> ``b"Hello, name!"`` (trailing metadata ``x-served-by``);
* ``Countdown``: ``b"n"`` -> n messages ``b"n"``, ``b"n-1"``, ... ``b"1"`` (server streaming);
* ``Flaky``: fails with UNAVAILABLE every other call (the sidecar retries it);
* ``Slow``: answers after 2 s (the client's deadline is shorter: the sidecar ends the call).

    python -m examples.grpc.service 50051
"""

from __future__ import annotations

import itertools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import grpc

SERVICE = "demo.Greeter"


class Greeter:
    def __init__(self, name: str = "greeter") -> None:
        self.name = name
        self.flaky_calls = itertools.count()

    def say_hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-served-by", self.name),))
        return b"Hello, " + request + b"!"

    def countdown(self, request: bytes, context: grpc.ServicerContext):
        for i in range(int(request.decode()), 0, -1):
            yield str(i).encode()

    def flaky(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if next(self.flaky_calls) % 2 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok after a retry"

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        threading.Event().wait(2.0)
        return b"too late"


def serve(port: int = 0, name: str = "greeter") -> tuple[grpc.Server, int, Greeter]:
    """Start the service on 127.0.0.1:``port`` (0: any free port)."""
    g = Greeter(name)
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "SayHello": grpc.unary_unary_rpc_method_handler(g.say_hello),
        "Countdown": grpc.unary_stream_rpc_method_handler(g.countdown),
        "Flaky": grpc.unary_unary_rpc_method_handler(g.flaky),
        "Slow": grpc.unary_unary_rpc_method_handler(g.slow),
    }),))
    hs = health.HealthServicer()
    hs.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound, g


if __name__ == "__main__":
    srv, p, _ = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 50051)
    print(f"demo.Greeter on 127.0.0.1:{p}", flush=True)
    srv.wait_for_termination()
