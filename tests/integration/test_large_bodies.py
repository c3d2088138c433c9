"""1 GB through the proxy in both directions, in bounded memory (proxy in its own process)."""

import asyncio

import aiohttp
from aiohttp import web

from sidecar.testing import ProxyProcess, Upstream, free_port

GB = 1 << 30
CHUNK = 256 * 1024


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def watch_rss(pid, out, stop):
    while not stop.is_set():
        out.append(rss_kb(pid))
        await asyncio.sleep(0.1)


async def test_one_gigabyte_each_way_in_bounded_memory(tmp_path):
    block = b"\0" * CHUNK

    async def handler(request):
        if request.method == "POST":
            n = 0
            async for chunk in request.content.iter_chunked(CHUNK):
                n += len(chunk)
            return web.json_response({"received": n})
        resp = web.StreamResponse()
        resp.content_length = GB
        await resp.prepare(request)
        for _ in range(GB // CHUNK):
            await resp.write(block)
        return resp

    async with Upstream(handler) as up:
        port, admin = free_port(), free_port()
        cfg = {"admin": {"port": admin},
               "listeners": [{"name": "l", "port": port, "routes": [
                   {"match": {"prefix": "/"}, "cluster": "svc", "timeout": "0s"}]}],
               "clusters": [{"name": "svc", "endpoints": [up.address]}]}
        with ProxyProcess(cfg, str(tmp_path)) as proc:
            proc.start(wait_port=port)
            base_rss = rss_kb(proc.proc.pid)
            samples, stop = [], asyncio.Event()
            watcher = asyncio.ensure_future(watch_rss(proc.proc.pid, samples, stop))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                got = 0
                async with s.get(f"http://127.0.0.1:{port}/download") as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_chunked(CHUNK):
                        got += len(chunk)
                assert got == GB

                async def body():
                    for _ in range(GB // CHUNK):
                        yield block
                async with s.post(f"http://127.0.0.1:{port}/upload", data=body()) as r:
                    assert r.status == 200
                    assert (await r.json())["received"] == GB
            stop.set()
            await watcher
    peak = max(samples)
    # flat memory: the proxy's peak RSS stays within 64 MB of its idle RSS while moving 2 GB
    assert peak - base_rss < 64 * 1024, (base_rss, peak)
