"""Transparent interception for real, in network namespaces made by the test: `sidecar iptables`
installs the redirect rules in a "pod" namespace, the sidecar runs there with an outbound
listener (``original_dst`` + an ``ORIGINAL_DST`` cluster) and an inbound one, and an app in
the pod and a peer in another namespace (joined by a veth pair, 198.18.0.0/24, the benchmark
range: no real host is there) talk without knowing about the proxy.

Needs root (``ip netns``, iptables in the namespace: CAP_SYS_ADMIN and CAP_NET_ADMIN), the
``ip``, ``iptables``, ``iptables-restore`` and ``setpriv`` binaries, and a kernel with network
namespaces and the nat table's REDIRECT target; skipped (saying which) otherwise. The CI
machine runs as root with them installed (scripts/test installs iptables).

The sidecar runs as Istio runs it, UID 1337 and GID 1337 with no supplementary groups, so
its own upstream connections leave through the ``--uid-owner 1337`` RETURN rule (checked on
that rule's packet counter). The interpreter that runs it lives under /root (mode 0700, which
UID 1337 cannot search), so the process keeps exactly one capability, CAP_DAC_READ_SEARCH
(read and search any file, write none), carried across exec as an ambient capability, with
nothing else in its bounding set; the access log it writes is created for UID 1337 first. A
client run as UID 1337 with the system Python also bypasses the redirect.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sidecar.testing import stop_process
from tests.paths import REPO

PEER = str(REPO / "tests" / "netns_peer.py")


@functools.cache
def peer_for_any_uid() -> str:
    """A copy of the peer script that UID 1337 can read wherever the checkout lives (a CI
    clone in a 0700 temporary directory is not readable by it)."""
    d = tempfile.mkdtemp(prefix="netns-peer-")
    os.chmod(d, 0o755)
    dst = os.path.join(d, "netns_peer.py")
    shutil.copyfile(PEER, dst)
    os.chmod(dst, 0o644)
    return dst
POD_IP, PEER_IP = "198.18.0.1", "198.18.0.2"
TOOLS = ("ip", "iptables", "iptables-restore", "iptables-save", "setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"
PROXY_UID = 1337
# the sidecar as the proxy user; CAP_DAC_READ_SEARCH only so it can read /root's Python
AS_PROXY = ("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
            "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search",
            "--bounding-set=-all,+dac_read_search")
CAP_DAC_READ_SEARCH = 1 << 2


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
                   SYSTEM_PYTHON, peer_for_any_uid(), "call", host, str(port), text]
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
        p.log.touch()
        os.chown(p.log, PROXY_UID, PROXY_UID)              # the proxy user writes it
        cfg.write_text(yaml.safe_dump(sidecar_config(p.log)))
        p.sidecar = p.start(p.pod, *AS_PROXY, sys.executable, "-m", "sidecar", "run", "-c",
                            str(cfg), "--concurrency", "1", name="sidecar", wait_for="serving")
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


def owner_rule_packets(pod: Pod) -> dict[str, int]:
    """Packets counted by the RETURN rules for the proxy's UID and GID (nat: one per
    connection)."""
    out = sh("ip", "netns", "exec", pod.pod, "iptables-save", "-c", "-t", "nat").stdout
    counts = {}
    for line in out.splitlines():
        for match in (f"--uid-owner {PROXY_UID}", f"--gid-owner {PROXY_UID}"):
            if line.endswith(f"-m owner {match} -j RETURN") and " ! " not in line and \
                    "-o lo" not in line:
                counts[match.split()[0]] = int(line[1:line.index(":")])
    assert set(counts) == {"--uid-owner", "--gid-owner"}, out
    return counts


def test_the_sidecar_runs_as_the_proxy_uid_and_its_traffic_takes_the_uid_rule(pod):
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pod.sidecar.pid}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(PROXY_UID)] * 4
    assert status["Gid"].split() == [str(PROXY_UID)] * 4
    assert status["Groups"].strip() == ""
    assert int(status["CapEff"], 16) == CAP_DAC_READ_SEARCH     # reads files; nothing else
    logged = len(log_lines(pod, 0))
    before = owner_rule_packets(pod)
    assert pod.call(pod.pod, PEER_IP, 9000, "egress") == f"peer9000 sees {POD_IP}\negress"
    after = owner_rule_packets(pod)
    # it went through the sidecar (and the next test counts log lines from here)
    assert f"outbound {PEER_IP}:9000 {PEER_IP}:9000" in log_lines(pod, logged + 1)[logged:]
    # the sidecar's connection to the peer left through the UID rule (the GID rule comes
    # after it, so it saw nothing); without it the connection would loop back into 15001
    print("owner RETURN rule packets", before, after)
    assert after["--uid-owner"] >= before["--uid-owner"] + 1, (before, after)
    assert after["--gid-owner"] == before["--gid-owner"], (before, after)


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
