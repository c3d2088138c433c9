"""Multi-worker mode (``sidecar run --concurrency N``): N processes sharing the listeners.

Shape:

* The parent is a small supervisor with no event loop: it forks N workers, forwards SIGTERM /
  SIGINT (drain, then exit) and SIGHUP (reload) to them, restarts a worker that crashes (at most
  5 times in 30 s; beyond that everything stops with exit code 1), and stops everyone when one
  worker exits cleanly (``POST /quitquitquit``) or cannot start (a port in use, bad
  certificates: exit code 1).
* Every worker is a full sidecar (its own event loop, config store, cluster manager and upstream
  pools) binding each listener with ``SO_REUSEPORT``, so the kernel spreads connections across
  workers. Limits are the sidecar's: before forking, the supervisor maps one shared-memory
  segment (``sidecar.shared``) that every worker inherits - circuit breakers, requests in flight
  per endpoint, the health board (one prober, worker 0), token buckets and the JWT replay
  cache live there. A worker that dies leaves its share counted until the supervisor reclaims
  its slots, which it does before forking the replacement. Each worker follows config updates itself (the same file watched by each, or its own
  control-plane stream): there is no shared config state to lock. Listener ports must be fixed
  (port 0 would give each worker a different port).
* Admin (and the metrics-only listener, ``metrics:``) is served by worker 0 only, and aggregated: every worker serves its own metrics and
  readiness on a private unix socket (``<rundir>/w<i>.sock``, mode 0700 directory); worker 0
  answers ``/stats/prometheus`` by scraping them all at request time and merging the families
  (counters and histograms summed; gauges summed, except ``*_info`` / ``*_timestamp_seconds`` /
  ``*max_fds`` (max) and ``*start_time_seconds`` (min)), answers ``/ready`` 503 unless every
  worker is ready, forwards ``/healthcheck/fail|ok`` and ``/drain_listeners`` to every worker,
  and turns ``/quitquitquit`` into a drain of the whole group. ``/workers`` lists the workers.
  ``/clusters`` and ``/config_dump`` are worker 0's view (config is the same in every worker;
  per-host counters there are worker 0's own).

Why not prometheus_client's multiprocess mode: it moves every metric update of every worker
onto mmap'd files (a lock and a write per increment on the hot path) and needs stale-file
clean-up when workers restart; scraping a few unix sockets once per Prometheus scrape costs
nothing on the request path and is exact at scrape time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.runtime.app import App, Companion, install_uvloop
from sidecar.runtime.collector import SIDECAR_FACTS
from sidecar.runtime.sidecar_mode import attach
from sidecar.shared.host import SharedHost

log = logging.getLogger("sidecar.workers")

AdminAppFactory = Callable[[App], web.Application]

EXIT_CANNOT_START = 78          # EX_CONFIG: a worker could not bind / load; do not restart it
MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0
SOCK_TIMEOUT_S = 2.0


def socket_path(rundir: str, worker_id: int) -> str:
    return os.path.join(rundir, f"w{worker_id}.sock")


# ================================================================================================
# supervisor (parent process)
# ================================================================================================

def run_workers(args, snap, concurrency: int, admin_app: AdminAppFactory,
                companions: tuple[Companion, ...] = ()) -> int:
    """``admin_app`` builds worker 0's admin application (``sidecar.admin.server.make_admin_app``)."""
    fixed = [f"{l.name} ({l.host}:{l.port})" for l in snap.listeners if l.port == 0]
    if fixed:
        print("sidecar: --concurrency > 1 needs fixed listener ports (SO_REUSEPORT); port 0 on: "
              + ", ".join(fixed), file=sys.stderr)
        return 1
    rundir = tempfile.mkdtemp(prefix="sidecar-workers-")
    os.chmod(rundir, 0o700)
    # before any fork. SIDECAR_SHARED_STATE=per_worker (bench/shared_cost.py only) gives each
    # worker its own state instead, to measure what sharing costs
    host = None if os.environ.get("SIDECAR_SHARED_STATE") == "per_worker" else \
        SharedHost.create(snap.stores.shared_state, concurrency)
    sup = Supervisor(args, snap, concurrency, rundir, admin_app, companions, host)
    try:
        return sup.run()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
        if host is not None:
            host.close()


class Supervisor:
    def __init__(self, args, snap, n: int, rundir: str, admin_app: AdminAppFactory,
                 companions: tuple[Companion, ...] = (), host: SharedHost | None = None):
        self.host = host
        self.admin_app = admin_app
        self.companions = companions
        self.args = args
        self.snap = snap
        self.n = n
        self.rundir = rundir
        self.children: dict[int, int] = {}       # pid -> worker id
        self.stopping = False
        self.rc = 0
        self.restarts: list[float] = []

    def spawn(self, wid: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:                                   # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent(supervisor)
                code = worker_process(self.args, self.snap, wid, self.n, self.rundir, self.admin_app,
                                      supervisor, self.companions, self.host)
            except BaseException:                      # noqa: BLE001 - report and leave
                log.exception("worker %d failed", wid)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = wid

    def signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.signal_all(signal.SIGTERM)

    def run(self) -> int:
        def on_term(signum, frame):
            log.info("supervisor: signal %d, draining %d worker(s)", signum, len(self.children))
            self.stop_all()

        def on_hup(signum, frame):
            self.signal_all(signal.SIGHUP)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        for wid in range(self.n):
            self.spawn(wid)
        log.info("supervisor %d: %d workers (SO_REUSEPORT), admin on worker 0", os.getpid(), self.n)
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            wid = self.children.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            if code == 0:
                log.info("worker %d exited: stopping the others", wid)
                self.stop_all()
            elif code == EXIT_CANNOT_START:
                log.error("worker %d could not start: stopping", wid)
                self.rc = 1
                self.stop_all()
            else:
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    log.error("worker %d died (%s); too many restarts, stopping", wid, _describe(code))
                    self.rc = 1
                    self.stop_all()
                else:
                    log.warning("worker %d died (%s): restarting it", wid, _describe(code))
                    if self.host is not None:
                        self.host.reclaim(wid)     # its gauges and names, before the new one
                    self.spawn(wid)
        return self.rc


def _die_with_parent(supervisor: int) -> None:
    """Linux: SIGTERM (a drain) to this worker if the supervisor dies, e.g. SIGKILLed."""
    try:
        import ctypes  # lazy: only worker processes use it, once, at fork
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:             # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


# ================================================================================================
# worker
# ================================================================================================

def worker_process(args, snap, wid: int, n: int, rundir: str, admin_app: AdminAppFactory,
                   supervisor: int = 0, companions: tuple[Companion, ...] = (),
                   host: SharedHost | None = None) -> int:
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s [w{wid}] %(name)s: %(message)s")
    for h in logging.getLogger().handlers:
        h.setFormatter(fmt)
    uv = install_uvloop() if not getattr(args, "no_uvloop", False) else False
    return asyncio.run(_worker_main(args, snap, wid, n, rundir, uv, admin_app, supervisor,
                                    companions, host))


async def _worker_main(args, snap, wid: int, n: int, rundir: str, uv: bool,
                       admin_app: AdminAppFactory, supervisor: int = 0,
                       companions: tuple[Companion, ...] = (),
                       host: SharedHost | None = None) -> int:
    shared = host.worker(wid) if host is not None else None
    app = App(snap, config_path=getattr(args, "config", None),
              metrics_enabled=not getattr(args, "no_metrics", False), reuse_port=True,
              loop_lag_threshold_s=getattr(args, "loop_lag_threshold", 250.0) / 1000.0,
              worker_id=wid, workers=n, companions=companions, shared=shared)
    if wid == 0:
        async def render_merged(accept: str) -> tuple[bytes, str]:
            others = await ask_all(rundir, n, "GET", "/metrics", skip=0)
            return merged_metrics(app.metrics, others, accept)
        app.render_metrics = render_merged     # the metrics-only listener answers for everyone
    try:
        await app.start(admin=False)
        if wid == 0:
            app.admin, app.admin_port = await _start_admin(app, admin_app(app), rundir, n,
                                                           supervisor)
    except OSError as e:
        print(f"sidecar worker {wid}: cannot start: {e}", file=sys.stderr)
        await app.close()
        return EXIT_CANNOT_START
    attach(app)               # sidecar mode, when the config has a sidecar: section
    private = await _start_private(app, socket_path(rundir, wid), wid)
    if wid == 0:
        ports = ", ".join(f"{lr.name}=http://{lr.config.host}:{lr.bound_port}"
                          for lr in app.store.listeners.values())
        log.info("sidecar %s serving with %d workers (%s; event loop: %s); admin http://%s:%s/",
                 __version__, n, ports, "uvloop" if uv else "asyncio", snap.admin.host, app.admin_port)
    await app.run_until_stopped()
    await private.cleanup()
    return 0


# ---- the private per-worker endpoint -------------------------------------------------------------

async def _start_private(app, path: str, wid: int):

    async def metrics(request):
        body, ctype = app.metrics.render("")
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def ready(request):
        reason = app.not_ready_reason()
        if reason is not None:
            return web.Response(status=503, text=reason)
        return web.Response(text="LIVE\n" + app.ready_notes_text())

    async def info(request):
        snap = app.store.snapshot
        return web.json_response({"worker": wid, "pid": os.getpid(),
                                  "config_version": snap.version if snap else None,
                                  "ready": app.not_ready_reason() is None,
                                  "reason": app.not_ready_reason() or "",
                                  "connections": sum(lr.downstream_cx_active
                                                     for lr in app.store.listeners.values())})

    async def hc(request):
        app.healthy = request.match_info["what"] == "ok"
        return web.Response(text="OK\n")

    async def drain(request):
        asyncio.get_running_loop().create_task(app.drain())
        return web.Response(text="OK\n")

    w = web.Application()
    w.router.add_get("/metrics", metrics)
    w.router.add_get("/ready", ready)
    w.router.add_get("/info", info)
    w.router.add_post("/healthcheck/{what:fail|ok}", hc)
    w.router.add_post("/drain_listeners", drain)
    runner = web.AppRunner(w, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        os.unlink(path)          # a restarted worker takes over its predecessor's socket
    except FileNotFoundError:
        pass
    await web.UnixSite(runner, path).start()
    return runner


async def _ask(rundir: str, wid: int, method: str, path: str) -> tuple[int, str]:
    """One request to a worker's private socket; (0, reason) when it does not answer."""
    try:
        conn = aiohttp.UnixConnector(path=socket_path(rundir, wid))
        async with aiohttp.ClientSession(connector=conn,
                                         timeout=aiohttp.ClientTimeout(total=SOCK_TIMEOUT_S)) as s:
            async with s.request(method, f"http://worker{wid}{path}") as r:
                return r.status, await r.text()
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return 0, f"worker {wid} not answering: {e or type(e).__name__}"


async def ask_all(rundir: str, n: int, method: str, path: str, skip: int = -1) -> dict[int, tuple[int, str]]:
    ids = [i for i in range(n) if i != skip]
    res = await asyncio.gather(*(_ask(rundir, i, method, path) for i in ids))
    return dict(zip(ids, res, strict=False))


# ---- worker 0's admin: aggregation --------------------------------------------------------------

async def _start_admin(app, web_app, rundir: str, n: int, supervisor: int = 0):

    @web.middleware
    async def aggregate(request, handler):
        path, method = request.path, request.method
        if method == "GET" and path == "/stats/prometheus":
            others = await ask_all(rundir, n, "GET", "/metrics", skip=0)
            body, ctype = merged_metrics(app.metrics, others, request.headers.get("Accept", ""),
                                         per_worker=request.query.get("per_worker") in ("1", "true"))
            return web.Response(body=body, headers={"Content-Type": ctype})
        if method == "GET" and path == "/ready":
            reasons = []
            local = app.not_ready_reason()
            if local:
                reasons.append(f"worker 0: {local}")
            answers = await ask_all(rundir, n, "GET", "/ready", skip=0)
            for wid, (status, text) in sorted(answers.items()):
                if status != 200:
                    reasons.append(text if status == 0 else f"worker {wid}: {text.strip()}")
            if reasons:
                return web.Response(status=503, text="\n".join(reasons) + "\n")
            # notes (a store down, the last-known-good config...): each worker's, once
            text = "".join(f"note: worker 0: {line[6:]}\n"
                           for line in app.ready_notes_text().splitlines())
            for wid, (_status, body) in sorted(answers.items()):
                text += "".join(f"note: worker {wid}: {line[6:]}\n"
                                for line in body.splitlines() if line.startswith("note: "))
            return web.Response(text="LIVE\n" + text)
        if method == "GET" and path == "/workers":
            rows = [{"worker": 0, "pid": os.getpid(), "ready": app.not_ready_reason() is None,
                     "reason": app.not_ready_reason() or "",
                     "config_version": app.store.snapshot.version if app.store.snapshot else None}]
            for wid, (status, text) in sorted((await ask_all(rundir, n, "GET", "/info", skip=0)).items()):
                rows.append(json.loads(text) if status == 200 else
                            {"worker": wid, "ready": False, "reason": text})
            return web.json_response({"workers": rows, "supervisor_pid": supervisor})
        if method == "POST" and path in ("/healthcheck/fail", "/healthcheck/ok", "/drain_listeners"):
            await ask_all(rundir, n, "POST", path, skip=0)
            return await handler(request)
        if method == "POST" and path == "/quitquitquit":
            if supervisor and os.getppid() == supervisor:
                os.kill(supervisor, signal.SIGTERM)      # the supervisor drains everyone
            else:
                asyncio.get_running_loop().call_later(0.05, app.request_stop)
            return web.Response(text="OK\n")
        return await handler(request)

    web_app.middlewares.append(aggregate)
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
    await runner.setup()
    snap = app.initial
    site = web.TCPSite(runner, snap.admin.host, snap.admin.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else snap.admin.port
    return runner, port


def _merge_mode(name: str, typ: str) -> str:
    if name in SIDECAR_FACTS:
        return "max"                  # the sidecar's fact, the same in every worker
    if name == "sidecar_dependency_up":
        return "min"                  # down if any worker cannot reach it
    if typ != "gauge":
        return "sum"
    if name.endswith("start_time_seconds"):
        return "min"
    if name.endswith(("_info", "_timestamp_seconds", "max_fds")):
        return "max"
    return "sum"


def merged_metrics(local_metrics, others: dict[int, tuple[int, str]], accept: str = "",
                   per_worker: bool = False) -> tuple[bytes, str]:
    """Worker 0's registry plus the other workers' scraped text, merged family by family
    (``per_worker``: not merged; every sample gets a ``worker`` label instead)."""

    sources = [(0, list(local_metrics.registry.collect()))]
    up = {0: 1}
    for wid, (status, text) in others.items():
        if status != 200:
            up[wid] = 0
            continue
        try:
            sources.append((wid, list(text_string_to_metric_families(text))))
            up[wid] = 1
        except ValueError:
            up[wid] = 0
    families: dict[str, list] = {}           # name -> [type, doc, {(sample, labels): value}, order]
    for wid, fams in sources:
        for f in fams:
            entry = families.get(f.name)
            if entry is None:
                entry = families[f.name] = [f.type, f.documentation, {}]
            values = entry[2]
            mode = _merge_mode(f.name, f.type)
            for s in f.samples:
                labels = {**s.labels, "worker": str(wid)} if per_worker else s.labels
                key = (s.name, tuple(sorted(labels.items())))
                old = values.get(key)
                if old is None:
                    values[key] = s.value
                elif s.name.endswith("_created") or mode == "min":
                    values[key] = min(old, s.value)
                elif mode == "max":
                    values[key] = max(old, s.value)
                else:
                    values[key] = old + s.value
    out = []
    for name, (typ, doc, values) in families.items():
        m = Metric(name, doc, typ)
        for (sname, labels), v in values.items():
            m.add_sample(sname, dict(labels), v)
        out.append(m)
    w = Metric("sidecar_workers", "Worker processes answering the admin aggregation (by worker)", "gauge")
    for wid in sorted(up):
        w.add_sample("sidecar_workers", {"worker": str(wid)}, up[wid])
    out.append(w)

    class _Merged:
        def collect(self):
            return out

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Merged())
    if "application/openmetrics-text" in accept:
        return om_latest(reg), OM_TYPE
    return generate_latest(reg), CONTENT_TYPE_LATEST
