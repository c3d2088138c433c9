"""Tracing example in one command: an OTLP/HTTP receiver, the demo backends, the sidecar (a
real ``sidecar run`` process with ``examples/tracing/sidecar.yaml``), three requests (one with
a W3C parent, one with a B3 parent, one starting a new trace), then the traces as received.

    python examples/tracing/run.py                 # the ports of sidecar.yaml
    python examples/tracing/run.py --free-ports    # any free ports (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from examples.tracing import services  # noqa: E402
from examples.tracing.otlp_receiver import Receiver, format_trace  # noqa: E402
from sidecar.shared.testing import free_port  # noqa: E402
from sidecar.testing import stop_process  # noqa: E402

W3C_PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
B3_PARENT = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"




def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def load_config(free_ports: bool) -> dict:
    with open(os.path.join(HERE, "sidecar.yaml")) as f:
        cfg = yaml.safe_load(f)
    if free_ports:
        cfg["admin"]["port"] = free_port()
        cfg["tracing"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
        cfg["listeners"][0]["port"] = free_port()
        for c in cfg["clusters"]:
            c["endpoints"] = [f"127.0.0.1:{free_port()}"]
    return cfg


async def wait_http(url: str, timeout: float = 15.0, proc=None) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


async def main(free_ports: bool) -> int:
    cfg = load_config(free_ports)
    collector_port = port_of(re.sub(r"/.*$", "", cfg["tracing"]["endpoint"].split("://", 1)[1]))
    listen = cfg["listeners"][0]["port"]
    admin = cfg["admin"]["port"]
    orders = port_of(cfg["clusters"][0]["endpoints"][0])
    canary = port_of(cfg["clusters"][1]["endpoints"][0])

    receiver = await Receiver("127.0.0.1", collector_port).start()
    runners = await services.start(orders, canary)
    tmp = tempfile.mkdtemp(prefix="sidecar-tracing-")
    path = os.path.join(tmp, "sidecar.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    log_path = os.path.join(tmp, "sidecar.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", path],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        await wait_http(f"http://127.0.0.1:{admin}/ready", proc=proc)
        print(f"collector  http://127.0.0.1:{collector_port}/v1/traces")
        print(f"sidecar    http://127.0.0.1:{listen}/   (admin http://127.0.0.1:{admin}/)\n")
        base = f"http://127.0.0.1:{listen}"
        async with aiohttp.ClientSession() as s:
            for label, headers in (("W3C parent", {"traceparent": W3C_PARENT}),
                                   ("B3 parent", {"b3": B3_PARENT}),
                                   ("new trace", {})):
                async with s.get(f"{base}/orders/42", headers=headers) as r:
                    body = await r.json()
                    print(f"{label:11} -> {r.status}, the backend saw traceparent {body.get('traceparent')}")

        def complete(spans) -> bool:
            servers = [x for x in spans if x.kind == "SERVER"]
            clients = [x for x in spans if x.kind == "CLIENT" and not x.attributes.get("sidecar.shadow")]
            return len(servers) >= 3 and len(clients) >= 6

        ok = await receiver.wait_for(complete, timeout=15.0)
        # shadow spans end when the mirrored request does: give them a moment
        await receiver.wait_for(lambda sp: sum(1 for x in sp if x.attributes.get("sidecar.shadow")) >= 3,
                                timeout=2.0)
        by_trace: dict[str, list] = {}
        for sp in receiver.spans:
            by_trace.setdefault(sp.trace_id, []).append(sp)
        print(f"\nthe collector received {len(receiver.spans)} spans in {receiver.requests} "
              f"OTLP request(s), {len(by_trace)} traces:\n")
        for tid, spans in by_trace.items():
            origin = {W3C_PARENT.split("-")[1]: "continues the W3C caller's trace",
                      B3_PARENT.split("-")[0]: "continues the B3 caller's trace"}.get(tid, "new trace")
            print(f"trace {tid}  ({origin})")
            print(format_trace(spans))
            print()
        if not ok:
            print("error: not all spans arrived", file=sys.stderr)
            return 1
        return 0
    finally:
        stop_process(proc, timeout=10)
        log.close()
        for r in runners:
            await r.cleanup()
        await receiver.stop()
        if os.environ.get("SHOW_SIDECAR_LOG"):
            print(open(log_path).read())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Send traces through the sidecar to a local OTLP receiver.")
    p.add_argument("--free-ports", action="store_true", help="use free ports instead of sidecar.yaml's")
    sys.exit(asyncio.run(main(p.parse_args().free_ports)))
