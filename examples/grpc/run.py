"""A gRPC service behind the sidecar, in one command: the service (grpcio), the sidecar
(``sidecar.yaml``, or its Envoy twin ``envoy.yaml``) as its own process, then a grpcio client
making a few calls through it and a report.

    python -m examples.grpc                  # native config, the ports in sidecar.yaml
    python -m examples.grpc --envoy          # the sidecar runs the Envoy v3 bootstrap
    python -m examples.grpc --free-ports     # any free ports (CI)

Exits 1 if a call did not end as the config promises.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import grpc  # noqa: E402
from examples.grpc.service import SERVICE, serve  # noqa: E402
from sidecar.shared.testing import free_port  # noqa: E402

DEFAULT_PORTS = {"listener": 10003, "admin": 9903, "service": 50051}


def config_text(envoy: bool, ports: dict[str, int]) -> str:
    with open(os.path.join(HERE, "envoy.yaml" if envoy else "sidecar.yaml")) as f:
        text = f.read()
    for key, default in DEFAULT_PORTS.items():
        if ports[key] != default:
            text = re.sub(rf"\b{default}\b", str(ports[key]), text)
    return text


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the sidecar is not listening on {port}")


def calls(port: int) -> list[tuple[str, bool, str]]:
    """(what, as expected?, what happened) for each call of the demo."""
    out = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        hello = ch.unary_unary(f"/{SERVICE}/SayHello")
        # the health check may need a moment to mark the service healthy on a cold start
        end = time.monotonic() + 10
        while True:
            try:
                value, call = hello.with_call(b"world", timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        served = dict(call.trailing_metadata()).get("x-served-by")
        out.append(("unary SayHello", value == b"Hello, world!" and served == "greeter",
                    f"{value.decode()!r}, trailing x-served-by={served}"))
        msgs = list(ch.unary_stream(f"/{SERVICE}/Countdown")(b"5", timeout=5))
        out.append(("server streaming Countdown(5)", msgs == [b"5", b"4", b"3", b"2", b"1"],
                    b" ".join(msgs).decode()))
        try:
            value = ch.unary_unary(f"/{SERVICE}/Flaky")(b"", timeout=5)
            out.append(("Flaky (UNAVAILABLE every other call)", True,
                        f"{value.decode()!r}: retried by the sidecar (retry_on: unavailable)"))
        except grpc.RpcError as e:
            out.append(("Flaky (UNAVAILABLE every other call)", False, f"{e.code().name}"))
        try:
            ch.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=0.5)
            out.append(("Slow with a 0.5 s deadline", False, "answered"))
        except grpc.RpcError as e:
            out.append(("Slow with a 0.5 s deadline", e.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{e.code().name} ({e.details()})"))
        try:
            ch.unary_unary("/other.Service/Method")(b"", timeout=5)
            out.append(("a method no route serves", False, "answered"))
        except grpc.RpcError as e:
            out.append(("a method no route serves", e.code() == grpc.StatusCode.UNIMPLEMENTED,
                        f"{e.code().name}: the sidecar's gRPC-shaped 404"))
    return out


def grpc_metrics(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats/prometheus", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sidecar_grpc_downstream_rq_total{"):
            status = re.search(r'grpc_status="([^"]*)"', line)
            if status:
                out[status.group(1)] = out.get(status.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envoy", action="store_true", help="run the Envoy v3 twin (envoy.yaml)")
    p.add_argument("--free-ports", action="store_true", help="use any free ports")
    a = p.parse_args(argv)
    ports = dict(DEFAULT_PORTS)
    if a.free_ports:
        ports = {k: free_port() for k in ports}
    server, ports["service"], _ = serve(ports["service"])
    tmp = tempfile.mkdtemp(prefix="grpc-example-")
    cfg = os.path.join(tmp, "envoy.yaml" if a.envoy else "sidecar.yaml")
    with open(cfg, "w") as f:
        f.write(config_text(a.envoy, ports))
    log = open(os.path.join(tmp, "sidecar.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", cfg, "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    ok = False
    try:
        wait_port(ports["listener"], proc)
        results = calls(ports["listener"])
        print(f"gRPC through the sidecar ({'envoy.yaml' if a.envoy else 'sidecar.yaml'}, "
              f"listener 127.0.0.1:{ports['listener']}, service 127.0.0.1:{ports['service']}):")
        for what, good, detail in results:
            print(f"  {'ok ' if good else 'BAD'} {what:40} {detail}")
        by_status = grpc_metrics(ports["admin"]) if not a.envoy else {}
        if by_status:
            print("  sidecar_grpc_downstream_rq_total by grpc_status:",
                  ", ".join(f"{k}={v:g}" for k, v in sorted(by_status.items())))
        ok = all(good for _, good, _ in results)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        server.stop(0)
    if not ok:
        with open(os.path.join(tmp, "sidecar.log")) as f:
            print(f.read()[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
