"""Extra commands: ``sidecar dev`` (the local dev proxy), and the registration of ``certs``,
``token`` and ``inject``.

``sidecar dev`` takes a tiny config (or any native / Envoy config)::

    # sidecar.dev.yaml
    port: 10000                       # default 10000, on 127.0.0.1
    routes:                           # path prefix -> where it goes (longest prefix wins)
      /api: localhost:8081            # host:port, a list of them, or http(s)://host[:port]
      /auth: {to: localhost:8082, timeout: 2s, retry: {retries: 2}}
      /health: {status: 200, body: ok}        # answered by the proxy itself
      /: localhost:3000

and serves it with a readable (coloured on a terminal) request log. Saving the file reloads it;
an invalid file is reported with the path of every bad field and the last good config keeps
serving. The admin port listens on 127.0.0.1 only, whatever the config says.

This module is imported by ``sidecar.cli.main`` only for these commands: they pull in
cryptography, which a proxy run without TLS or JWT should not carry in memory.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
import time
from dataclasses import replace

from sidecar.admin.server import start_admin
from sidecar.cli import certs, token
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.listener import AccessLogConfig
from sidecar.k8s import cli as k8s_cli
from sidecar.runtime.app import App, install_uvloop, setup_logging
from sidecar.runtime.loader import is_envoy, parse_text, snapshot_from_doc

DEFAULT_DEV_CONFIG = "sidecar.dev.yaml"
DEFAULT_DEV_PORT = 10000
DEFAULT_DEV_ADMIN_PORT = 9901
POLL_INTERVAL_S = 0.25
TINY_KEYS = ("port", "address", "admin_port", "routes")
_ROUTE_OPTS = ("timeout", "retry", "rewrite", "request_headers", "response_headers", "idle_timeout",
               "filters", "mirror", "hash")

STARTER = """\
# sidecar dev config: saved changes are picked up at once (bad ones are reported, not applied)
port: 10000
routes:
  /api: localhost:8081          # prefix: host:port (or a list of them, or http(s)://host)
  /health: {status: 200, body: "ok\\n"}
  /: localhost:3000
"""


def add_commands(sub) -> None:
    d = sub.add_parser("dev", help="local dev proxy: tiny config, reload on save, readable request log",
                       description=__doc__.split("Other commands")[0],
                       formatter_class=certs._RawFormatter)
    d.add_argument("config", nargs="?", default=DEFAULT_DEV_CONFIG,
                   help=f"tiny, native or Envoy config (default: ./{DEFAULT_DEV_CONFIG})")
    d.add_argument("--init", action="store_true", help="write a starter config and exit")
    d.add_argument("--port", type=int, default=None, help="listener port (tiny config)")
    d.add_argument("--admin-port", type=int, default=None, help="admin port (always on 127.0.0.1)")
    d.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    d.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "warning"),
                   help="proxy internals' log level (default: warning)")
    d.set_defaults(func=cmd_dev)
    certs.add_parser(sub)
    token.add_parser(sub)
    k8s_cli.add_parser(sub)


# ---- the tiny format -----------------------------------------------------------------------------

def _cluster_name(prefix: str, used: set[str]) -> str:
    base = "".join(c if c.isalnum() else "_" for c in prefix.strip("/")) or "root"
    name, i = base, 2
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def _target(v, path: str) -> tuple[list[str], dict | None]:
    """``host:port`` | ``[host:port, ...]`` | ``http(s)://host[:port]`` -> (endpoints, tls)."""
    items = v if isinstance(v, list) else [v]
    if not items:
        raise ConfigError(path, "needs at least one host:port")
    eps, tls = [], None
    for i, it in enumerate(items):
        ip = f"{path}[{i}]" if isinstance(v, list) else path
        if not isinstance(it, str):
            raise ConfigError(ip, "must be host:port or http(s)://host[:port]")
        s = it
        if s.startswith(("http://", "https://")):
            scheme, _, rest = s.partition("://")
            hostport = rest.split("/", 1)[0]
            if ":" not in hostport.rsplit("]", 1)[-1]:
                hostport += ":443" if scheme == "https" else ":80"
            if scheme == "https":
                tls = {"sni": hostport.rsplit(":", 1)[0].strip("[]")}
            s = hostport
        host, sep, port = s.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(ip, f"must be host:port or http(s)://host[:port], got {it!r}")
        eps.append(s)
    return eps, tls


def tiny_to_native(doc: dict) -> tuple[dict, list[tuple[str, str]], list]:
    """The tiny dev format -> (a native config, (native path prefix, tiny path) pairs to report
    errors where the user wrote them, errors). A bad route is left out of the native config and
    reported, so that the native parser can still report the others' errors."""
    for k in doc:
        if k not in TINY_KEYS:
            raise ConfigError(str(k), "unknown field (the tiny dev config has port, address, "
                              "admin_port and routes; for more, write a native config with listeners:)")
    routes_in = w.mapping(doc, "routes", "")
    if not routes_in:
        raise ConfigError("routes", "needs at least one prefix: target")
    order = []
    for prefix in routes_in:
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ConfigError(f"routes.{prefix}", "a route key is a path prefix starting with /")
        order.append(prefix)
    order.sort(key=len, reverse=True)          # longest prefix first: "/" never shadows "/api"
    routes: list[dict] = []
    clusters: list[dict] = []
    pathmap: list[tuple[str, str]] = []
    used: set[str] = set()
    errors: list[ConfigError] = []
    for prefix in order:
        try:
            _tiny_route(prefix, routes_in[prefix], routes, clusters, pathmap, used)
        except ConfigError as e:
            errors.append(e)
    listener = {"name": "dev", "address": w.string(doc, "address", "", "127.0.0.1"),
                "port": w.integer(doc, "port", "", DEFAULT_DEV_PORT, lo=0, hi=65535),
                "routes": routes}
    pathmap.append(("listeners[0]", ""))
    native = {"admin": {"address": "127.0.0.1",
                        "port": w.integer(doc, "admin_port", "", DEFAULT_DEV_ADMIN_PORT, lo=0, hi=65535)},
              "listeners": [listener], "clusters": clusters}
    return native, pathmap, errors


def _tiny_route(prefix, v, routes, clusters, pathmap, used) -> None:
    tp = f"routes.{prefix}"
    route: dict = {"name": prefix, "match": {"prefix": prefix}}
    if isinstance(v, dict) and "status" in v:
        w.check_keys(v, ("status", "body"), tp)
        route["direct_response"] = {"status": v["status"], "body": str(v.get("body", ""))}
    else:
        opts: dict = {}
        if isinstance(v, dict):
            w.check_keys(v, ("to", *_ROUTE_OPTS), tp)
            if "to" not in v:
                raise ConfigError(f"{tp}.to", "is required (host:port), or give status: for a "
                                  "direct response")
            opts = {k: x for k, x in v.items() if k != "to"}
            eps, tls = _target(v["to"], f"{tp}.to")
        else:
            eps, tls = _target(v, tp)
        name = _cluster_name(prefix, used)
        cluster: dict = {"name": name, "endpoints": eps, "connect_timeout": "2s"}
        if tls:
            cluster["tls"] = tls
        pathmap.append((f"clusters[{len(clusters)}]", tp))
        clusters.append(cluster)
        route.update(opts)
        route["cluster"] = name
    pathmap.append((f"listeners[0].routes[{len(routes)}]", tp))
    routes.append(route)


def _rewrite(errors, pathmap):
    out = []
    for e in errors:
        p = e.path
        for native_prefix, tiny in pathmap:
            if p == native_prefix or p.startswith(native_prefix + ".") or p.startswith(native_prefix + "["):
                rest = p[len(native_prefix):]
                p = (tiny + rest) if tiny else rest.lstrip(".")
                break
        out.append(ConfigError(p, e.message))
    return out


_FULL_KEYS = {"listeners", "clusters", "sidecar", "admin", "control_plane", "tracing", "node",
              "version"}


def is_tiny(doc: dict) -> bool:
    return not is_envoy(doc) and not (_FULL_KEYS & set(doc))


def dev_snapshot(text: str, name: str, port: int | None = None, admin_port: int | None = None):
    """Config text -> (Snapshot, notes). Raises ConfigErrors with paths as the user wrote them.

    Dev rules on top of the usual parsing: the admin listens on 127.0.0.1; listeners without an
    access log get the readable ``dev`` request log on stdout."""
    doc = parse_text(text, name)
    notes: list[str] = []
    pathmap: list = []
    tiny_errors: list = []
    if is_tiny(doc):
        if port is not None:
            doc = {**doc, "port": port}
        if admin_port is not None:
            doc = {**doc, "admin_port": admin_port}
        try:
            doc, pathmap, tiny_errors = tiny_to_native(doc)
        except ConfigError as e:
            raise ConfigErrors([e]) from None
    elif is_envoy(doc):
        doc = copy.deepcopy(doc)
        sa = ((doc.get("admin") or {}).get("address") or {}).get("socket_address")
        if isinstance(sa, dict) and sa.get("address") not in (None, "127.0.0.1", "localhost"):
            notes.append(f"admin address {sa.get('address')} -> 127.0.0.1 (dev mode keeps admin on loopback)")
            sa["address"] = "127.0.0.1"
        if isinstance(sa, dict) and admin_port is not None:
            sa["port_value"] = admin_port
    else:
        doc = copy.deepcopy(doc)
        admin = doc.get("admin")
        if not isinstance(admin, dict):
            admin = doc["admin"] = {"port": DEFAULT_DEV_ADMIN_PORT} if admin is None else admin
        if isinstance(admin, dict):
            if admin.get("address", "127.0.0.1") not in ("127.0.0.1", "localhost"):
                notes.append(f"admin address {admin['address']} -> 127.0.0.1 (dev mode keeps admin on loopback)")
            admin["address"] = "127.0.0.1"
            if admin_port is not None:
                admin["port"] = admin_port
        for lst in doc.get("listeners") or []:
            if isinstance(lst, dict) and "access_log" not in lst:
                lst["access_log"] = {"path": "stdout", "format": "dev"}
    try:
        snap = snapshot_from_doc(doc)
    except ConfigErrors as e:
        raise ConfigErrors(tiny_errors + _rewrite(e.errors, pathmap)) from None
    if tiny_errors:
        raise ConfigErrors(tiny_errors)
    if pathmap:              # the tiny format always gets the dev request log
        snap = replace(snap, listeners=tuple(
            replace(l, access_log=(AccessLogConfig(path="/dev/stdout", format="dev"),))
            for l in snap.listeners))
    return snap, notes


# ---- the dev runner -------------------------------------------------------------------------------

class _Out:
    """Status lines for the developer: ✓ green, ✗ red (when colour is on)."""

    def __init__(self, colour: bool):
        self.colour = colour

    def _c(self, code: str, s: str) -> str:
        return f"\033[{code}m{s}\033[0m" if self.colour else s

    def ok(self, msg: str) -> None:
        print(f"{self._c('32;1', '✓')} {msg}", flush=True)

    def info(self, msg: str) -> None:
        print(self._c("2", msg), flush=True)

    def warn(self, msg: str) -> None:
        print(f"{self._c('33;1', '!')} {msg}", flush=True)

    def errors(self, head: str, errors) -> None:
        print(f"{self._c('31;1', '✗')} {self._c('31;1', head)}", flush=True)
        for e in errors:
            if getattr(e, "path", ""):
                print(f"    {self._c('1', e.path)}: {e.message}", flush=True)
            else:
                print(f"    {getattr(e, 'message', e)}", flush=True)


def _stamp(path: str):
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


class DevRunner:
    def __init__(self, args, out: _Out):
        self.args = args
        self.path = args.config
        self.out = out
        self.app: App | None = None        # set once the first good config is loaded
        self.good_version = 0
        self.good_at = ""
        self.colour = out.colour

    def load(self):
        text = _read(self.path)
        if text is None:
            raise ConfigErrors([ConfigError("", f"cannot read {self.path}")])
        snap, notes = dev_snapshot(text, self.path, self.args.port, self.args.admin_port)
        for n in notes:
            self.out.warn(n)
        return snap

    def _set_log_colour(self, snap=None) -> None:
        assert self.app is not None
        for lr in self.app.store.listeners.values():
            for lg in (lr.hcm.access_logs if lr.hcm is not None else ()):
                if hasattr(lg, "colour"):
                    lg.colour = self.colour

    def banner(self) -> None:
        app = self.app
        assert app is not None
        for lr in app.store.listeners.values():
            cfg = lr.config
            scheme = "https" if cfg.tls else "http"
            self.out.ok(f"listening on {scheme}://{cfg.host}:{lr.bound_port} ({lr.name})")
            rc = cfg.route_config
            for vh in (rc.virtual_hosts if rc else ()):
                for r in vh.routes:
                    m = r.match
                    what = m.prefix or m.path or m.path_separated_prefix or (m.regex.pattern if m.regex else "")
                    a = r.action
                    dest = getattr(a, "cluster", None)
                    if dest:
                        st = app.clusters.get(dest)
                        eps = ", ".join(h.address for h in st.hosts) if st else ""
                        dest = f"{dest} ({eps})" if eps else dest
                    elif hasattr(a, "status"):
                        dest = f"direct {a.status}"
                    else:
                        dest = type(a).__name__.lower()
                    host = "" if vh.domains == ("*",) else f"[{','.join(vh.domains)}] "
                    self.out.info(f"    {host}{what:<12} -> {dest}")
        self.out.info(f"    admin: http://127.0.0.1:{app.admin_port}/  (loopback only)")
        self.out.info(f"    watching {self.path}: save to reload, Ctrl-C to stop")

    async def apply(self, snap) -> bool:
        assert self.app is not None
        try:
            await self.app.store.apply(snap)
        except OSError as e:
            self.out.errors(f"{self.path}: cannot apply ({e}); still serving the last good config",
                            [])
            return False
        self.good_version += 1
        self.good_at = time.strftime("%H:%M:%S")
        self._set_log_colour()
        return True

    async def watch(self) -> None:
        last = _stamp(self.path)
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            stamp = _stamp(self.path)
            if stamp == last or stamp is None:
                continue
            last = stamp
            await asyncio.sleep(0.05)        # editors may write in two steps
            last = _stamp(self.path) or last
            try:
                snap = self.load()
            except ConfigErrors as e:
                when = f"loaded {self.good_at}" if self.good_at else "none loaded yet"
                self.out.errors(f"{self.path}: {len(e.errors)} error(s); still serving the last "
                                f"good config ({when})", e.errors)
                continue
            if await self.apply(snap):
                self.out.ok(f"reloaded {self.path}")
                self.banner()

    async def run(self) -> int:
        first = None
        last = _stamp(self.path)
        while first is None:          # nothing runs until the config is good
            try:
                first = self.load()
            except ConfigErrors as e:
                self.out.errors(f"{self.path}: {len(e.errors)} error(s); waiting for a good save",
                                e.errors)
                while _stamp(self.path) in (last, None):
                    await asyncio.sleep(POLL_INTERVAL_S)
                await asyncio.sleep(0.05)
                last = _stamp(self.path)
        app = self.app = App(first, config_path=None, watch_config=False, admin=start_admin)
        try:
            await app.start()
        except OSError as e:
            self.out.errors(f"cannot start: {e}", [])
            return 1
        app.snapshot_listeners.append(self._set_log_colour)
        self._set_log_colour()
        self.good_version, self.good_at = 1, time.strftime("%H:%M:%S")
        self.out.ok(f"loaded {self.path}")
        self.banner()
        task = asyncio.get_running_loop().create_task(self.watch())
        app._tasks.append(task)
        await app.run_until_stopped()
        return 0


def cmd_dev(args) -> int:
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                        and os.environ.get("NO_COLOR") is None)
    out = _Out(colour)
    if args.init:
        if os.path.exists(args.config):
            out.errors(f"{args.config} exists; not overwriting it", [])
            return 1
        with open(args.config, "w", encoding="utf-8") as f:
            f.write(STARTER)
        out.ok(f"wrote {args.config}; now run: sidecar dev {args.config}")
        return 0
    if not os.path.exists(args.config):
        out.errors(f"no {args.config} here", [])
        out.info(f"    create one with: sidecar dev --init {args.config}")
        return 2
    setup_logging(args.log_level)
    install_uvloop()
    try:
        return asyncio.run(DevRunner(args, out).run())
    except KeyboardInterrupt:
        return 0
