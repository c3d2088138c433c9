"""``sidecar iptables``: the pod's redirect rules for transparent interception, as Istio's
``istio-iptables`` installs them (nat table, REDIRECT mode).

* Inbound: every TCP connection arriving at the pod (``PREROUTING``) goes to the inbound
  listener (``--inbound-port``, 15006), except ``--exclude-inbound-ports``.
* Outbound: every TCP connection the pod's processes open (``OUTPUT``) goes to the outbound
  listener (``--outbound-port``, 15001), except the proxy's own (its UID and GID, 1337: the
  proxy's upstream connections must leave as they are), connections to 127.0.0.1,
  ``--exclude-outbound-ports`` and ``--exclude-outbound-cidrs``.
* The app calling its own pod IP goes through loopback: when the proxy forwards such a call,
  it is sent to the inbound listener (as Istio does); connections the proxy makes from
  127.0.0.6 (an inbound passthrough cluster's ``upstream_bind_config``) are left alone.

The listeners recover where each connection was going with ``original_dst``
(``SO_ORIGINAL_DST``). Applying is idempotent: the chains are re-declared (which flushes
them) in one ``iptables-restore --noflush`` transaction, and the jumps into them are removed
first, so running it twice leaves one copy of every rule. Needs ``NET_ADMIN`` (the init
container's only extra capability, with ``NET_RAW``). IPv4 only: IPv6 traffic is not
intercepted.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "PYSIDECAR"
INBOUND = f"{PREFIX}_INBOUND"
IN_REDIRECT = f"{PREFIX}_IN_REDIRECT"
OUTPUT = f"{PREFIX}_OUTPUT"
REDIRECT = f"{PREFIX}_REDIRECT"
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
# the jumps from the built-in chains into ours
JUMPS = (("PREROUTING", INBOUND), ("OUTPUT", OUTPUT))
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6/32"


@dataclass(frozen=True, slots=True)
class Interception:
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    inbound_port: int = 15006
    outbound_port: int = 15001
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()


def restore_input(c: Interception) -> str:
    """The ``iptables-restore --noflush`` input for the nat table."""
    lines = ["*nat"] + [f":{chain} - [0:0]" for chain in CHAINS]
    lines.append(f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {c.inbound_port}")
    lines.append(f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {c.outbound_port}")
    # inbound: the proxy's own listener ports and the excluded ones pass untouched
    for port in sorted({c.inbound_port, c.outbound_port, *c.exclude_inbound_ports}):
        lines.append(f"-A {INBOUND} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {INBOUND} -p tcp -j {IN_REDIRECT}")
    # outbound
    lines.append(f"-A {OUTPUT} -s {INBOUND_PASSTHROUGH_SOURCE} -o lo -j RETURN")
    for match in (f"--uid-owner {c.proxy_uid}", f"--gid-owner {c.proxy_gid}"):
        lines.append(f"-A {OUTPUT} ! -d 127.0.0.1/32 -o lo -m owner {match} -j {IN_REDIRECT}")
        lines.append(f"-A {OUTPUT} -o lo -m owner ! {match} -j RETURN")
        lines.append(f"-A {OUTPUT} -m owner {match} -j RETURN")
    lines.append(f"-A {OUTPUT} -d 127.0.0.1/32 -j RETURN")
    for port in c.exclude_outbound_ports:
        lines.append(f"-A {OUTPUT} -p tcp --dport {port} -j RETURN")
    for cidr in c.exclude_outbound_cidrs:
        lines.append(f"-A {OUTPUT} -d {cidr} -j RETURN")
    lines.append(f"-A {OUTPUT} -j {REDIRECT}")
    for builtin, chain in JUMPS:
        lines.append(f"-A {builtin} -p tcp -j {chain}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class IptablesError(RuntimeError):
    pass


def _run(cmd: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)


def _remove_jumps(iptables: str) -> None:
    for builtin, chain in JUMPS:
        for _ in range(100):           # every copy a previous run (or a crash) left
            if _run([iptables, "-w", "-t", "nat", "-D", builtin, "-p", "tcp", "-j",
                     chain]).returncode != 0:
                break


def apply(c: Interception, iptables: str = "iptables") -> None:
    """Install the rules (idempotent). Raises ``IptablesError`` with iptables' message."""
    restore = shutil.which(f"{iptables}-restore") or f"{iptables}-restore"
    _remove_jumps(iptables)
    r = _run([restore, "-w", "--noflush"], restore_input(c))
    if r.returncode != 0:
        raise IptablesError(f"{restore} failed ({r.returncode}): {r.stderr.strip()}")


def cleanup(iptables: str = "iptables") -> None:
    """Remove the jumps and the chains (a no-op when they are not there)."""
    _remove_jumps(iptables)
    for chain in CHAINS:
        _run([iptables, "-w", "-t", "nat", "-F", chain])
    for chain in CHAINS:
        _run([iptables, "-w", "-t", "nat", "-X", chain])


# ---- command line -----------------------------------------------------------------------------

def _ports(v: str) -> tuple[int, ...]:
    out = []
    for part in (p.strip() for p in v.split(",")):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise argparse.ArgumentTypeError(f"{part!r} is not a port (1..65535)")
        out.append(int(part))
    return tuple(out)


def _cidrs(v: str) -> tuple[str, ...]:
    out = []
    for part in (p.strip() for p in v.split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CIDR range") from None
        if net.version != 4:
            raise argparse.ArgumentTypeError(f"{part!r}: only IPv4 is intercepted")
        out.append(str(net))
    return tuple(out)


def _port(v: str) -> int:
    p = _ports(v)
    if len(p) != 1:
        raise argparse.ArgumentTypeError(f"{v!r} is not a port")
    return p[0]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("iptables", help="install the pod's traffic interception rules "
                                        "(init container; needs NET_ADMIN)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--proxy-uid", type=int, required=True,
                   help="the proxy's UID: its own connections are not redirected")
    p.add_argument("--proxy-gid", type=int, default=None,
                   help="the proxy's GID (default: the UID), likewise excluded")
    p.add_argument("--inbound-port", type=_port, required=True)
    p.add_argument("--outbound-port", type=_port, required=True)
    p.add_argument("--exclude-inbound-ports", type=_ports, default=(),
                   help="comma-separated ports reached directly (e.g. the probe port)")
    p.add_argument("--exclude-outbound-ports", type=_ports, default=())
    p.add_argument("--exclude-outbound-cidrs", type=_cidrs, default=())
    p.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    p.add_argument("--cleanup", action="store_true", help="remove the rules instead")
    p.add_argument("--iptables", default="iptables", help="the iptables binary (e.g. iptables-legacy)")
    p.set_defaults(func=cmd_iptables)


def cmd_iptables(args: argparse.Namespace) -> int:
    c = Interception(proxy_uid=args.proxy_uid,
                     proxy_gid=args.proxy_gid if args.proxy_gid is not None else args.proxy_uid,
                     inbound_port=args.inbound_port, outbound_port=args.outbound_port,
                     exclude_inbound_ports=args.exclude_inbound_ports,
                     exclude_outbound_ports=args.exclude_outbound_ports,
                     exclude_outbound_cidrs=args.exclude_outbound_cidrs)
    if args.dry_run:
        sys.stdout.write(restore_input(c))
        return 0
    if shutil.which(args.iptables) is None:
        print(f"sidecar iptables: {args.iptables} is not installed", file=sys.stderr)
        return 2
    try:
        if args.cleanup:
            cleanup(args.iptables)
        else:
            apply(c, args.iptables)
    except IptablesError as e:
        print(f"sidecar iptables: {e} (does the container have NET_ADMIN?)", file=sys.stderr)
        return 1
    print("sidecar iptables: cleaned up" if args.cleanup else
          f"sidecar iptables: inbound -> :{c.inbound_port}, outbound -> :{c.outbound_port}, "
          f"proxy uid/gid {c.proxy_uid}/{c.proxy_gid} excluded")
    return 0
