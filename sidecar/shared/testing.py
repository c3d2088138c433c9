"""Test helpers for shared state: a real ``redis-server`` on a loopback port, in a temp dir,
that a test can kill and bring back on the same port. (Self-contained: ``sidecar.testing``
imports the whole app, which this layer must not.)"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, picked at random BELOW the kernel's ephemeral range.

    A port from ``bind(0)`` is an ephemeral one: between closing it here and the server under
    test binding it, any outgoing connection on the machine (this test's or a parallel run's)
    may take it as its source port, and the server fails with EADDRINUSE. Ports below the
    range are never handed to outgoing connections; random picks make a clash between
    parallel runs unlikely, and this process never hands out the same port twice."""
    lo = 10000
    hi = min(_EPHEMERAL[0], 65536) - 1
    if hi - lo < 1000:                  # an unusual range: fall back to the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.randint(lo, hi)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port found below the ephemeral range")


class RedisServer:
    """``redis-server`` (Debian's package) bound to 127.0.0.1 only, no persistence,
    ``maxmemory-policy noeviction`` (what the replay cache needs)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="sidecar-redis-")
        self.proc: subprocess.Popen | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary: str = binary

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
             "--protected-mode", "yes", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if self._ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on {self.address}: {self.log()}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as a crash or a lost host would be."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read().decode(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class RateLimitServiceProcess:
    """``python -m sidecar.shared.testing_rls`` (a real gRPC rate limit service counting in
    Redis) on a loopback port, with ``limits`` (its JSON config, see that module) written to
    ``workdir``. ``prefix`` keeps the counts of several services on one Redis apart."""

    def __init__(self, redis_address: str, limits: dict, workdir: str, port: int | None = None,
                 prefix: str = "rls:") -> None:
        self.port = port or free_port()
        self.redis_address = redis_address
        self.prefix = prefix
        self.config_path = os.path.join(workdir, f"rls-limits-{self.port}.json")
        with open(self.config_path, "w") as f:
            json.dump(limits, f)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RateLimitServiceProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar.shared.testing_rls", "--port", str(self.port),
             "--redis", self.redis_address, "--config", self.config_path,
             "--prefix", self.prefix],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "rate limit service on" not in line:
            out = line + self.proc.stdout.read().decode(errors="replace") if \
                self.proc.poll() is not None else line
            raise RuntimeError(f"the rate limit service did not start: {out}")
        return self

    def kill(self) -> None:
        """SIGKILL: the service vanishes mid-conversation, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
