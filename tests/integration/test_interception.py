"""Transparent interception for real, in network namespaces made by the test: `sidecar iptables`
installs the redirect rules in a "pod" namespace, the sidecar runs there with an outbound
listener (``original_dst`` + an ``ORIGINAL_DST`` cluster) and an inbound one, and an app in
the pod and a peer in another namespace (joined by a veth pair, 198.18.0.0/24, the benchmark
range: no real host is there) talk without knowing about the proxy.

Needs root (``ip netns``, iptables in the namespace: CAP_SYS_ADMIN and CAP_NET_ADMIN), the
``ip``, ``iptables``, ``iptables-restore`` and ``setpriv`` binaries, and a kernel with network
namespaces and the nat table's REDIRECT target; skipped (saying which) otherwise. The CI
machine runs as root with them installed (scripts/test installs iptables).

The sidecar runs as root with the proxy *group* 1337 (the Python it runs lives under /root,
which UID 1337 cannot read): the rules exclude the proxy's UID and GID alike, as Istio's do;
the UID rule is exercised by a client run as UID 1337 with the system Python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sidecar.testing import stop_process
from tests.paths import REPO

PEER = str(REPO / "tests" / "netns_peer.py")
POD_IP, PEER_IP = "198.18.0.1", "198.18.0.2"
TOOLS = ("ip", "iptables", "iptables-restore", "iptables-save", "setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables need CAP_SYS_ADMIN/CAP_NET_ADMIN)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install iproute2 iptables util-linux)"
    probe = f"l4probe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-A",
                            "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "REDIRECT",
                            "--to-ports", "10"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables nat REDIRECT does not work here: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


REASON = _why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {r.stdout}{r.stderr}")
    return r


class Pod:
    """Two namespaces joined by a veth pair; processes started in them are stopped at the end."""

    def __init__(self, tmp: Path):
        n = os.getpid() % 100000
        self.pod, self.peer = f"l4pod{n}", f"l4peer{n}"
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        sh("ip", "netns", "add", self.pod)
        sh("ip", "netns", "add", self.peer)
        sh("ip", "link", "add", f"l4a{n}", "type", "veth", "peer", "name", f"l4b{n}")
        sh("ip", "link", "set", f"l4a{n}", "netns", self.pod)
        sh("ip", "link", "set", f"l4b{n}", "netns", self.peer)
        for ns, dev, ip in ((self.pod, f"l4a{n}", POD_IP), (self.peer, f"l4b{n}", PEER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def start(self, ns: str, *cmd: str, name: str, wait_for: str = "") -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        self.procs.append(p)
        if wait_for:
            end = time.monotonic() + 30
            while wait_for not in (self.tmp / f"{name}.log").read_text(errors="replace"):
                if p.poll() is not None or time.monotonic() > end:
                    raise AssertionError(f"{name} did not start: "
                                         f"{(self.tmp / f'{name}.log').read_text()}")
                time.sleep(0.05)
        return p

    def serve(self, ns: str, host: str, port: int, tag: str) -> None:
        self.start(ns, sys.executable, PEER, "serve", host, str(port), tag, name=tag,
                   wait_for="ready")

    def call(self, ns: str, host: str, port: int, text: str = "hello",
             as_uid: int | None = None) -> str:
        cmd = [sys.executable, PEER, "call", host, str(port), text]
        if as_uid is not None:
            cmd = ["setpriv", f"--reuid={as_uid}", f"--regid={as_uid}", "--clear-groups",
                   SYSTEM_PYTHON, PEER, "call", host, str(port), text]
        r = sh("ip", "netns", "exec", ns, *cmd, check=False)
        assert r.returncode == 0, f"call {host}:{port} failed: {r.stdout}{r.stderr}"
        return r.stdout

    def iptables_save(self) -> str:
        out = sh("ip", "netns", "exec", self.pod, "iptables-save", "-t", "nat").stdout
        return "\n".join(line for line in out.splitlines()
                         if not line.startswith(("#", ":")))

    def close(self) -> None:
        for p in self.procs:
            stop_process(p, timeout=5)
        sh("ip", "netns", "del", self.pod, check=False)
        sh("ip", "netns", "del", self.peer, check=False)


def sidecar_config(log: Path) -> dict:
    return {
        "admin": {"address": "127.0.0.1", "port": 9901},
        "listeners": [
            {"name": "outbound", "address": "127.0.0.1", "port": 15001,
             "listener_filters": ["original_dst"],
             "filter_chains": [
                 # a chain picked by the restored destination port (a service alias)
                 {"name": "alias", "match": {"destination_port": 9002,
                                             "destination_prefixes": ["198.18.0.0/24"]},
                  "tcp_proxy": {"cluster": "peer9000", "access_log": {
                      "path": str(log), "format": "alias %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST%"}}},
                 {"name": "passthrough", "tcp_proxy": {"cluster": "passthrough", "access_log": {
                     "path": str(log),
                     "format": "outbound %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST%"}}}]},
            {"name": "inbound", "address": "0.0.0.0", "port": 15006,
             "listener_filters": ["original_dst"],
             "tcp_proxy": {"cluster": "inbound_passthrough", "access_log": {
                 "path": str(log),
                 "format": "inbound %DOWNSTREAM_LOCAL_ADDRESS% %UPSTREAM_HOST% "
                           "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}}},
        ],
        "clusters": [
            {"name": "passthrough", "type": "original_dst"},
            # the Istio way back to the app: its pod address, from 127.0.0.6 (which the
            # rules leave alone, so the connection is not redirected to the inbound again)
            {"name": "inbound_passthrough", "type": "original_dst", "bind_address": "127.0.0.6"},
            {"name": "peer9000", "endpoints": [f"{PEER_IP}:9000"]},
        ],
    }


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netns")
    p = Pod(tmp)
    try:
        p.serve(p.peer, PEER_IP, 9000, "peer9000")
        p.serve(p.peer, PEER_IP, 9001, "peer9001")
        p.serve(p.pod, "0.0.0.0", 8080, "app")
        p.serve(p.pod, "0.0.0.0", 15020, "probe")
        iptables = [sys.executable, "-m", "sidecar", "iptables", "--proxy-uid", "1337",
                    "--inbound-port", "15006", "--outbound-port", "15001",
                    "--exclude-inbound-ports", "15020", "--exclude-outbound-ports", "9001"]
        sh("ip", "netns", "exec", p.pod, *iptables)
        p.rules_once = p.iptables_save()
        sh("ip", "netns", "exec", p.pod, *iptables)          # idempotent
        p.rules_twice = p.iptables_save()
        cfg = tmp / "sidecar.yaml"
        p.log = tmp / "access.log"
        cfg.write_text(yaml.safe_dump(sidecar_config(p.log)))
        p.start(p.pod, "setpriv", "--regid=1337", "--clear-groups", sys.executable, "-m",
                "sidecar", "run", "-c", str(cfg), "--concurrency", "1", name="sidecar",
                wait_for="serving")
        yield p
    finally:
        p.close()


def log_lines(pod: Pod, n: int) -> list[str]:
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if pod.log.exists():
            lines = pod.log.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    return pod.log.read_text().splitlines() if pod.log.exists() else []


def test_rules_are_installed_once_however_often_the_command_runs(pod):
    assert pod.rules_once == pod.rules_twice
    assert pod.rules_once.count("-A OUTPUT -p tcp -j PYSIDECAR_OUTPUT") == 1
    assert pod.rules_once.count("-A PREROUTING -p tcp -j PYSIDECAR_INBOUND") == 1
    assert "--to-ports 15001" in pod.rules_once and "--to-ports 15006" in pod.rules_once


def test_outbound_is_intercepted_and_forwarded_to_the_original_destination(pod):
    before = len(log_lines(pod, 0))
    out = pod.call(pod.pod, PEER_IP, 9000, "hello")
    # the app reached the peer (through the sidecar's egress connection, from the pod address)
    assert out == f"peer9000 sees {POD_IP}\nhello"
    lines = log_lines(pod, before + 1)
    assert f"outbound {PEER_IP}:9000 {PEER_IP}:9000" in lines[before:]


def test_the_restored_destination_picks_the_filter_chain(pod):
    before = len(log_lines(pod, 0))
    # nothing listens on 9002: the alias chain (destination port + prefix) sends it to 9000
    out = pod.call(pod.pod, PEER_IP, 9002, "via alias")
    assert out == f"peer9000 sees {POD_IP}\nvia alias"
    assert f"alias {PEER_IP}:9002 {PEER_IP}:9000" in log_lines(pod, before + 1)[before:]


def test_excluded_outbound_port_and_the_proxy_uid_bypass_the_sidecar(pod):
    before = len(log_lines(pod, 0))
    assert pod.call(pod.pod, PEER_IP, 9001, "direct") == f"peer9001 sees {POD_IP}\ndirect"
    # a process running as the proxy's UID is never redirected (else the proxy would loop)
    assert pod.call(pod.pod, PEER_IP, 9000, "as proxy", as_uid=1337) == \
        f"peer9000 sees {POD_IP}\nas proxy"
    time.sleep(0.5)
    assert len(log_lines(pod, 0)) == before              # the sidecar saw neither


def test_inbound_is_intercepted_and_reaches_the_app(pod):
    before = len(log_lines(pod, 0))
    out = pod.call(pod.peer, POD_IP, 8080, "inbound")
    # the app sees the sidecar's passthrough address, not the peer: it went through the proxy
    assert out == "app sees 127.0.0.6\ninbound"
    lines = log_lines(pod, before + 1)
    assert f"inbound {POD_IP}:8080 {POD_IP}:8080 {PEER_IP}" in lines[before:]


def test_excluded_inbound_port_is_reached_directly(pod):
    assert pod.call(pod.peer, POD_IP, 15020, "probe") == f"probe sees {PEER_IP}\nprobe"


def test_cleanup_removes_the_rules(pod, tmp_path):
    # last: the module's other tests need the rules
    sh("ip", "netns", "exec", pod.pod, sys.executable, "-m", "sidecar", "iptables",
       "--proxy-uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001", "--cleanup")
    assert "PYSIDECAR" not in pod.iptables_save()
    # without the rules the app talks to the peer directly, from its own address
    before = len(log_lines(pod, 0))
    assert pod.call(pod.pod, PEER_IP, 9000, "plain") == f"peer9000 sees {POD_IP}\nplain"
    time.sleep(0.5)
    assert len(log_lines(pod, 0)) == before
