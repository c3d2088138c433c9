"""Process handling for the benchmark: start pinned children, measure them, stop them all.

Every child is started in its own session (so a Ctrl-C in the terminal reaches only the
harness, which then stops the children in order) and with PR_SET_PDEATHSIG=SIGKILL (so a
harness killed hard does not leave proxies or load generators behind).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.shared.testing import free_port as free_port  # re-exported for the bench scripts

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the harness.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def pin_prefix(cores: str | None) -> list[str]:
    """`taskset -c CORES` (taskset execs the program, so the pid stays the program's)."""
    return ["taskset", "-c", cores] if cores else []




# --------------------------------------------------------------------------- /proc readers


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split after the last ')'
        rest = data[data.rindex(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (a multi-worker proxy forks its workers)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    rest = data[data.rindex(b")") + 2 :].split()
    # fields after comm start at index 3 (state); utime is field 14, stime 15 (1-based)
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK


def cores_busy_seconds(cores: str | None) -> float:
    """Busy time (user+nice+system+irq+softirq+steal) of the listed cores ("0" or "0,1"),
    from /proc/stat: with the proxy's own CPU time subtracted, it shows what else ran on
    the proxy's core while it was measured (other processes, or the hypervisor's steal)."""
    if not cores:
        return 0.0
    want = {f"cpu{c.strip()}" for c in cores.split(",")}
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in want:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = \
                        (int(x) for x in parts[1:9])
                    total += user + nice + system + irq + softirq + steal
    except OSError:
        return 0.0
    return total / _CLK_TCK


def tree_rss_kb(pid: int) -> int:
    return sum(rss_kb(p) for p in process_tree(pid))


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def cpu_split_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds: user space and kernel apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0, 0.0
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[11]) / _CLK_TCK, int(rest[12]) / _CLK_TCK


def tree_cpu_split(pid: int) -> tuple[float, float]:
    parts = [cpu_split_seconds(p) for p in process_tree(pid)]
    return sum(u for u, _ in parts), sum(k for _, k in parts)


class RssSampler:
    """Samples the VmRSS of a process tree in a thread while a load runs."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(tree_rss_kb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kb(self) -> int:
        return max(self.samples, default=0)


# --------------------------------------------------------------------------- child processes


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class ProcessGroup:
    """Owns every child the harness starts; `stop_all` is called from a finally block."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], cores: str | None = None,
              env: dict | None = None, cwd: str | None = None) -> Child:
        full = pin_prefix(cores) + argv
        log = self.workdir / f"{name}.log"
        fh = open(log, "wb")
        try:
            proc = subprocess.Popen(
                full, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_child_setup, env=env, cwd=cwd,
            )
        finally:
            fh.close()
        child = Child(name, full, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> None:
        if child in self.children:
            self.children.remove(child)
        if child.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(child.proc.pid, sig)  # the child leads its own session/group
            except ProcessLookupError:
                return
            try:
                child.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # workers forked by the child are in its process group: make sure they are gone
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for child in list(reversed(self.children)):
            self.stop(child, grace=3.0)


class StartError(RuntimeError):
    pass


def wait_http_ok(child: Child, url: str, timeout: float = 30.0,
                 headers: dict | None = None) -> None:
    """Wait until GET url answers 2xx; fail early if the child exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise StartError(f"{child.name} exited with {child.proc.returncode}:\n"
                             f"{child.log_tail()}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1.0) as resp:
                resp.read()
                if 200 <= resp.status < 300:
                    return
                last = f"status {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"status {e.code}"
        except (OSError, urllib.error.URLError) as e:
            last = str(e)
        time.sleep(0.1)
    raise StartError(f"{child.name} not ready at {url} after {timeout:.0f}s ({last}):\n"
                     f"{child.log_tail()}")


def wait_port_free(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.1)


def compiled_tree(repo: Path, workdir: Path) -> Path:
    """``repo`` with the modules of scripts/compiled_modules compiled by mypyc
    (scripts/build_compiled), in ``workdir``; built once per run."""
    out = workdir / "compiled"
    if not out.exists():
        cp = subprocess.run([str(repo / "scripts" / "build_compiled"), str(out)],
                            capture_output=True, text=True, cwd=repo)
        if cp.returncode != 0:
            raise StartError("scripts/build_compiled failed: " + (cp.stderr or cp.stdout)[-300:])
    return out
