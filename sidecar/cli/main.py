"""Command line: ``sidecar run|validate|version|iptables|dev|certs|token|inject``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import httptools

from sidecar import __version__
from sidecar.admin.server import make_admin_app, start_admin
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.k8s import iptables
from sidecar.k8s.probe_rewrite import ENV_PROBE_PORT
from sidecar.runtime.app import App, ParserError, check_compiled_parsers, install_uvloop, setup_logging
from sidecar.runtime.loader import load_file
from sidecar.runtime.workers import run_workers

log = logging.getLogger("sidecar")


def _load(path: str):
    return load_file(path)


def usable_cores() -> int:
    """Cores this process may really use: the CPU affinity mask, capped by a cgroup v2 CPU
    quota (a container limited to 1.5 CPUs on a 64-core node gets 2 workers, not 64)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


async def _dry_compile(snap) -> None:
    """Build every route stack as `run` would, binding nothing: errors only found while
    building (a per-route filter override naming an unknown provider) surface here too."""
    app = App(snap, metrics_enabled=False, watch_config=False)
    try:
        app.clusters.apply(snap.clusters)
        for lc in snap.listeners:
            app.store.validate_listener(lc)
    finally:
        await app.close()


def cmd_validate(args) -> int:
    try:
        snap = _load(args.config)
        asyncio.run(_dry_compile(snap))
    except ConfigError as e:
        print(f"{args.config}: 1 error(s)", file=sys.stderr)
        print(f"  {e}", file=sys.stderr)
        return 1
    except ConfigErrors as e:
        print(f"{args.config}: {len(e.errors)} error(s)", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    print(f"{args.config}: OK ({snap.source_format} format; {len(snap.listeners)} listener(s), "
          f"{len(snap.clusters)} cluster(s))")
    return 0


def cmd_version(args) -> int:
    import aiohttp  # lazy: `sidecar run` does not load aiohttp (~9 MB) unless a feature needs it
    print(f"sidecar {__version__} (python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, "
          f"httptools {httptools.__version__})")
    return 0


def cmd_run(args) -> int:

    setup_logging(args.log_level)
    try:
        check_compiled_parsers()
    except ParserError as e:
        print(f"sidecar: refusing to start: {e}", file=sys.stderr)
        return 2
    snap = None
    if args.config:
        try:
            snap = _load(args.config)
        except ConfigErrors as e:
            print(f"sidecar: invalid config {args.config}:", file=sys.stderr)
            for err in e.errors:
                print(f"  {err}", file=sys.stderr)
            return 1
    concurrency = args.concurrency
    if concurrency is None or concurrency == 0:
        concurrency = usable_cores()           # Envoy's default: one worker per core
    if concurrency > 1 and snap is not None:
        return run_workers(args, snap, concurrency, make_admin_app, COMPANIONS)
    uv = install_uvloop() if not args.no_uvloop else False
    return asyncio.run(_serve(args, snap, uv))


async def _serve(args, snap, uv: bool, worker_id: int = 0, workers: int = 1,
                 reuse_port: bool = False) -> int:
    demo_servers = None
    demo = snap is None
    if demo:
        # lazy: the demo's backends are aiohttp apps (~9 MB), loaded only without -c
        from sidecar.cli.demo import demo_snapshot, print_banner, start_demo_services
        demo_servers, ports = await start_demo_services()
        snap = demo_snapshot(ports)
    app = App(snap, config_path=args.config, metrics_enabled=not args.no_metrics,
              loop_lag_threshold_s=args.loop_lag_threshold / 1000.0,
              reuse_port=reuse_port, worker_id=worker_id, workers=workers, admin=start_admin,
              companions=COMPANIONS)
    app.install_signal_handlers()
    try:
        await app.start()
    except (ConfigError, ConfigErrors) as e:
        print(f"sidecar: invalid config:\n  {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sidecar: cannot start: {e}", file=sys.stderr)
        return 1
    serving = ", ".join(f"{lr.name}=http://{lr.config.host}:{lr.bound_port}"
                        for lr in app.store.listeners.values())
    log.info("sidecar %s serving (%s; event loop: %s); admin http://%s:%s/", __version__, serving,
             "uvloop" if uv else "asyncio", snap.admin.host, app.admin_port)
    if demo:
        from sidecar.cli.demo import print_banner  # lazy: the demo (and aiohttp) only when run
        print_banner(app)
    await app.run_until_stopped()
    if demo_servers is not None:
        for s in demo_servers:
            await s.cleanup()
    return 0


CORE_COMMANDS = ("run", "validate", "version", "iptables")

# servers started beside the proxy on worker 0: the kubelet prober of injected pods (only
# when SIDECAR_PROBE_PORT is set)


async def start_probes_from_env(app):
    """The probe port of injected pods (``sidecar.k8s.probes``), when its variable is set."""
    if not os.environ.get(ENV_PROBE_PORT):
        return None
    # lazy: the probe rewriter's HTTP client is aiohttp, loaded only in pods that use it
    from sidecar.k8s.probes import start_from_env
    return await start_from_env(app)


COMPANIONS = (start_probes_from_env,)


def build_parser(extra: bool = True) -> argparse.ArgumentParser:
    """``extra``: also the dev/certs/token commands (their modules pull in cryptography, which
    a running proxy without TLS or JWT should not carry in memory)."""
    p = argparse.ArgumentParser(prog="sidecar", description="An Envoy-style L7 sidecar proxy.")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run the proxy (no -c: an embedded demo)")
    r.add_argument("-c", "--config", help="native YAML or Envoy v3 bootstrap (YAML/JSON)")
    r.add_argument("--concurrency", type=int, default=None,
                   help="worker processes sharing the listeners with SO_REUSEPORT "
                        "(default and 0: one per usable core: affinity and cgroup CPU quota)")
    r.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "info"))
    r.add_argument("--no-metrics", action="store_true", help="do not record metrics (benchmarking)")
    r.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    r.add_argument("--loop-lag-threshold", type=float, default=250.0, metavar="MS",
                   help="report event-loop stalls longer than this, naming the user filter "
                        "that blocked (0: no watchdog)")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="check a config file; lists every error with its path")
    v.add_argument("-c", "--config", required=True)
    v.set_defaults(func=cmd_validate)
    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=cmd_version)
    iptables.add_parser(sub)
    if extra:
        # lazily: these commands pull in cryptography, which `run` without TLS or JWT need not load
        from sidecar.cli import dev as cli_extra  # noqa: PLC0415
        cli_extra.add_commands(sub)
    return p


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    p = build_parser(extra=not argv or argv[0] not in CORE_COMMANDS)
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    return args.func(args)
