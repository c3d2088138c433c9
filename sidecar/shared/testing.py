"""Test helpers for shared state: a real ``redis-server`` on a loopback port, in a temp dir,
that a test can kill and bring back on the same port. (Self-contained: ``sidecar.testing``
imports the whole app, which this layer must not.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
