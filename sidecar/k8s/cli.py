"""``sidecar inject``: sidecar injection from the command line.

    sidecar inject -f deployment.yaml [-o out.yaml]     offline, for GitOps (- is stdin/stdout)
    sidecar inject serve --cert tls.crt --key tls.key [--port 8443]     the admission webhook

Both use the same injection (``sidecar.k8s.inject``) with the same defaults and flags, so a pod
injected offline is the pod the webhook would make. Offline, a pod template that cannot be
injected is an error (exit 1, nothing written) unless ``--skip-refused`` passes it through
unchanged with a warning.

Hooked into the CLI by ``add_parser(subparsers)`` (see ``sidecar.cli_extra``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from sidecar.config.errors import ConfigError
from sidecar.k8s.inject import INJECTED
from sidecar.k8s.manifests import ManifestError, dump_yaml, inject_yaml, refused
from sidecar.k8s.settings import InjectorConfig, Resources
from sidecar.k8s.webhook import WebhookServer

log = logging.getLogger("sidecar.k8s")


def _injector_args(p: argparse.ArgumentParser) -> None:
    d = InjectorConfig()
    g = p.add_argument_group("injection defaults (pods override them with annotations)")
    g.add_argument("--image", default=d.image, help=f"sidecar image (default {d.image})")
    g.add_argument("--image-pull-policy", default=d.image_pull_policy,
                   choices=("Always", "IfNotPresent", "Never"))
    g.add_argument("--config-map", default=d.config_map,
                   help=f"ConfigMap with the sidecar's config, in the pod's namespace "
                        f"(default {d.config_map})")
    g.add_argument("--config-key", default=d.config_key, help=f"its key (default {d.config_key})")
    g.add_argument("--concurrency", type=int, default=d.concurrency,
                   help=f"sidecar worker processes (default {d.concurrency})")
    g.add_argument("--proxy-log-level", default=d.log_level,
                   help=f"sidecar log level (default {d.log_level})")
    g.add_argument("--interception-mode", default=d.interception_mode,
                   choices=("REDIRECT", "NONE"))
    r = d.proxy_resources
    g.add_argument("--proxy-cpu", default=r.cpu_request)
    g.add_argument("--proxy-cpu-limit", default=r.cpu_limit)
    g.add_argument("--proxy-memory", default=r.memory_request)
    g.add_argument("--proxy-memory-limit", default=r.memory_limit)


def injector_config(args: argparse.Namespace, fail_closed: bool = False) -> InjectorConfig:
    return InjectorConfig(
        image=args.image, image_pull_policy=args.image_pull_policy, config_map=args.config_map,
        config_key=args.config_key, concurrency=args.concurrency, log_level=args.proxy_log_level,
        interception_mode=args.interception_mode,
        proxy_resources=Resources(args.proxy_cpu, args.proxy_memory, args.proxy_cpu_limit,
                                  args.proxy_memory_limit),
        fail_closed=fail_closed).check()


def add_parser(sub) -> None:
    p = sub.add_parser("inject", help="inject the sidecar into Kubernetes manifests, or serve "
                                      "the injection webhook",
                       description=__doc__.split("Hooked into")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--filename", help="manifests (multi-document YAML; - for stdin)")
    p.add_argument("-o", "--output", default="-", help="where to write them (default: stdout)")
    p.add_argument("--skip-refused", action="store_true",
                   help="pass pods that cannot be injected through unchanged (with a warning)")
    _injector_args(p)
    p.set_defaults(func=cmd_inject_file)
    isub = p.add_subparsers(dest="inject_cmd")
    s = isub.add_parser("serve", help="the mutating admission webhook (HTTPS)")
    s.add_argument("--cert", required=True, help="server certificate (PEM)")
    s.add_argument("--key", required=True, help="its private key (PEM)")
    s.add_argument("--port", type=int, default=8443)
    s.add_argument("--address", default="0.0.0.0", help="listen address (default 0.0.0.0: "
                                                         "the API server calls the pod IP)")
    s.add_argument("--fail-closed", action="store_true",
                   help="deny pods that cannot be injected instead of admitting them without "
                        "the sidecar (with a warning)")
    s.add_argument("--log-level", default="info", help="the webhook's own log level")
    _injector_args(s)
    s.set_defaults(func=cmd_inject_serve)


def cmd_inject_file(args: argparse.Namespace) -> int:
    if not args.filename:
        print("sidecar inject: -f FILE is required (or: sidecar inject serve ...)",
              file=sys.stderr)
        return 2
    try:
        config = injector_config(args)
    except ConfigError as e:
        print(f"sidecar inject: {e}", file=sys.stderr)
        return 2
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename, encoding="utf-8") as f:
                text = f.read()
        docs, results = inject_yaml(text, config)
    except (OSError, ManifestError) as e:
        print(f"sidecar inject: {args.filename}: {e}", file=sys.stderr)
        return 1
    bad = refused(results)
    for r in results:
        if r.outcome is None:
            continue
        if r.outcome.status == INJECTED:
            print(f"{r.where}: injected", file=sys.stderr)
        elif r.outcome.reason and r not in bad:
            print(f"{r.where}: not injected: {r.outcome.reason}", file=sys.stderr)
        for w in r.outcome.warnings:
            print(f"{r.where}: warning: {w}", file=sys.stderr)
    for r in bad:
        reason = r.outcome.reason if r.outcome is not None else ""
        print(f"{r.where}: {'warning' if args.skip_refused else 'error'}: cannot inject: "
              f"{reason}", file=sys.stderr)
    if bad and not args.skip_refused:
        print(f"sidecar inject: {len(bad)} pod template(s) refused; nothing written "
              f"(--skip-refused passes them through unchanged)", file=sys.stderr)
        return 1
    out = dump_yaml(docs)
    try:
        if args.output == "-":
            sys.stdout.write(out)
        else:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(out)
    except OSError as e:
        print(f"sidecar inject: {args.output}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_inject_serve(args: argparse.Namespace) -> int:
    if args.filename:
        print("sidecar inject serve: -f is for offline injection (sidecar inject -f FILE)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = injector_config(args, fail_closed=args.fail_closed)
    except ConfigError as e:
        print(f"sidecar inject serve: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config, args))


async def _serve(config: InjectorConfig, args: argparse.Namespace) -> int:
    try:
        server = WebhookServer(config, args.cert, args.key, host=args.address, port=args.port)
        port = await server.start()
    except (OSError, ValueError) as e:
        print(f"sidecar inject serve: cannot start: {e}", file=sys.stderr)
        return 1
    log.info("injection webhook on https://%s:%d/inject (image %s, %s)", args.address, port,
             config.image, "fail-closed" if config.fail_closed else "fail-open for refusals")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    return 0
