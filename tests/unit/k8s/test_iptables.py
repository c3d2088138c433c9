"""`sidecar iptables`: the rules it installs (the real thing runs in
tests/integration/test_interception.py, inside network namespaces)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar.k8s.iptables import Interception, restore_input
from tests.paths import REPO


def rules(**kw) -> list[str]:
    return restore_input(Interception(**kw)).splitlines()


def test_redirects_and_exclusions():
    r = rules(exclude_inbound_ports=(15020, 22), exclude_outbound_ports=(5432,),
              exclude_outbound_cidrs=("10.96.0.0/12",))
    assert r[0] == "*nat" and r[-1] == "COMMIT"
    assert "-A PYSIDECAR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in r
    assert "-A PYSIDECAR_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in r
    for port in (22, 15001, 15006, 15020):
        assert f"-A PYSIDECAR_INBOUND -p tcp --dport {port} -j RETURN" in r
    assert "-A PYSIDECAR_OUTPUT -p tcp --dport 5432 -j RETURN" in r
    assert "-A PYSIDECAR_OUTPUT -d 10.96.0.0/12 -j RETURN" in r
    # the proxy's own traffic leaves untouched; everything else goes to the outbound listener
    out = [x for x in r if x.startswith("-A PYSIDECAR_OUTPUT")]
    assert "-A PYSIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN" in out
    assert "-A PYSIDECAR_OUTPUT -m owner --gid-owner 1337 -j RETURN" in out
    assert out[-1] == "-A PYSIDECAR_OUTPUT -j PYSIDECAR_REDIRECT"
    assert out[0] == "-A PYSIDECAR_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"


def test_each_jump_appears_once_and_chains_are_redeclared():
    r = rules()
    assert r.count("-A PREROUTING -p tcp -j PYSIDECAR_INBOUND") == 1
    assert r.count("-A OUTPUT -p tcp -j PYSIDECAR_OUTPUT") == 1
    assert [x for x in r if x.startswith(":")] == [
        ":PYSIDECAR_INBOUND - [0:0]", ":PYSIDECAR_IN_REDIRECT - [0:0]",
        ":PYSIDECAR_OUTPUT - [0:0]", ":PYSIDECAR_REDIRECT - [0:0]"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "iptables", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_the_injectors_flags_parse_and_dry_run_prints_the_rules():
    cp = run("--proxy-uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001",
             "--exclude-inbound-ports", "15020,8081", "--exclude-outbound-ports", "3306",
             "--exclude-outbound-cidrs", "169.254.169.254/32", "--dry-run")
    assert cp.returncode == 0, cp.stderr
    assert "-A PYSIDECAR_INBOUND -p tcp --dport 8081 -j RETURN" in cp.stdout
    assert "-A PYSIDECAR_OUTPUT -d 169.254.169.254/32 -j RETURN" in cp.stdout


@pytest.mark.parametrize("args,err", [
    (("--exclude-inbound-ports", "0"), "not a port"),
    (("--exclude-outbound-ports", "http"), "not a port"),
    (("--exclude-outbound-cidrs", "10.0.0.0/33"), "not a CIDR"),
    (("--exclude-outbound-cidrs", "fd00::/8"), "only IPv4"),
])
def test_bad_flags_are_refused(args, err):
    cp = run("--proxy-uid", "1337", "--inbound-port", "15006", "--outbound-port", "15001",
             *args, "--dry-run")
    assert cp.returncode == 2 and err in cp.stderr
