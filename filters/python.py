"""User filters: a Python class (``sidecar.sdk.UserFilter``) named by config.

Native YAML::

    filters:
      - python:
          name: claim-header               # optional (default: the class name); unique per listener
          module: filters/claim_header.py  # a .py file (relative to the config file's directory)
                                           # or an importable module name (my_company.filters)
          class: ClaimHeader
          config: {claim: sub, header: x-user}

Envoy (the filter entry's ``name`` is the instance name)::

    http_filters:
    - name: claim-header
      typed_config:
        "@type": type.googleapis.com/pysidecar.filter.v1.PythonFilter
        module: filters/claim_header.py
        class: ClaimHeader
        config: {claim: sub, header: x-user}

Per route: native ``filters: {claim-header: {...} | disabled}``; Envoy
``typed_per_filter_config: {claim-header: {"@type": ".../pysidecar.filter.v1.PythonFilterPerRoute",
config: {...}}}`` (or ``envoy.config.route.v3.FilterConfig`` with ``disabled: true``).

The module is loaded when the config is parsed (``sidecar validate`` too: a missing module, an
import error or a bad config is a ``ConfigError`` with its path), once per config: a module
whose source has not changed is not executed again, so its globals survive reloads. The proxy
watches the module's file and reloads the config when it changes; a version that fails to
load is refused and the running one keeps serving. A module given by name is executed afresh
from its source on change; the modules it imports are not.

Each instance is wrapped: an exception (or a non-Response result) answers 500 with response
flag ``FE`` for that request only, counted in ``sidecar_filter_errors_total{filter}`` and
logged with its traceback (at most one traceback per filter per ``LOG_EVERY_S``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import time
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace

from sidecar import sdk
from sidecar.sdk import ConfigError, FilterEnv, Handler, Request, Response, RouteInfo, wire

TYPE_URL = "type.googleapis.com/pysidecar.filter.v1.PythonFilter"
PER_ROUTE_TYPE_URL = "type.googleapis.com/pysidecar.filter.v1.PythonFilterPerRoute"
NAME = "pysidecar.filters.http.python"
FLAG = "FE"                       # the response flag of a request a user filter failed
DETAILS = "python_filter_error"
LOG_EVERY_S = 10.0

log = logging.getLogger("sidecar.filter.python")

# where relative module paths are resolved: the config file's directory while it is parsed
_config_dir: contextvars.ContextVar[str] = contextvars.ContextVar("config_dir", default="")


@contextlib.contextmanager
def config_dir(path: str) -> Iterator[None]:
    """Resolve relative ``module`` paths against ``path`` while a config is parsed."""
    token = _config_dir.set(path)
    try:
        yield
    finally:
        _config_dir.reset(token)


# =============================================================================================
# config
# =============================================================================================

@dataclass(frozen=True, slots=True)
class UserFilterConfig:
    name: str                          # the instance name
    module: str                        # as written in the config
    class_name: str
    source_file: str                   # "" when the module has no Python source
    cls: type[sdk.UserFilter]
    config: object                     # what cls.parse_config returned
    path: str                          # where in the config (for errors found at build time)


@dataclass(frozen=True, slots=True)
class UserPerRoute:
    """A per-route override, parsed by the class when the route is built (an Envoy route
    config can arrive before the listener that names the class)."""

    raw: object
    path: str


def _parse(d: object, path: str, native: bool) -> UserFilterConfig:
    keys = ("module", "class", "config") + (("name",) if native else ())
    m = wire.check_keys(d, keys, path)
    module = wire.string(m, "module", path, nonempty=True)
    class_name = wire.string(m, "class", path, nonempty=True)
    mod, source = load_module(module, wire.join(path, "module"))
    cls = getattr(mod, class_name, None)
    cp = wire.join(path, "class")
    if cls is None:
        defined = sorted(k for k, v in vars(mod).items()
                         if isinstance(v, type) and issubclass(v, sdk.UserFilter)
                         and v is not sdk.UserFilter)
        raise ConfigError(cp, f"module {module!r} has no class {class_name!r} (its filter "
                          f"classes: {', '.join(defined) or 'none'})")
    if not (isinstance(cls, type) and issubclass(cls, sdk.UserFilter)):
        raise ConfigError(cp, f"{module}.{class_name} must be a class that subclasses "
                          "sidecar.sdk.UserFilter")
    config_path = wire.join(path, "config")
    try:
        config = cls.parse_config(m.get("config"), config_path)
    except ConfigError:
        raise
    except Exception as e:     # the user's parser failed rather than refusing the value
        raise ConfigError(config_path, f"{class_name}.parse_config raised {_describe(e)}") from None
    name = wire.string(m, "name", path, class_name, nonempty=True) if native else class_name
    return UserFilterConfig(name, module, class_name, source, cls, config, path)


def from_native(d: object, path: str) -> UserFilterConfig:
    return _parse(d, path, native=True)


def from_envoy(d: object, path: str) -> UserFilterConfig:
    return _parse(d, path, native=False)


def name_instance(cfg: UserFilterConfig, entry_name: str | None) -> tuple[str, UserFilterConfig]:
    if entry_name is None or entry_name == cfg.name:
        return cfg.name, cfg
    return entry_name, replace(cfg, name=entry_name)


def per_route_from_native(d: object, path: str) -> UserPerRoute:
    return UserPerRoute(d, path)


def per_route_from_envoy(d: object, path: str) -> UserPerRoute:
    m = wire.check_keys(d, ("config",), path)
    return UserPerRoute(m.get("config"), wire.join(path, "config"))


def source_files(cfg: UserFilterConfig) -> tuple[str, ...]:
    return (cfg.source_file,) if cfg.source_file else ()


# ---- loading ----------------------------------------------------------------------------------

# file -> (sha256 of its source, the module executed from it): a module is executed again only
# when its source changed; a failed load leaves the entry (the running version) as it was
_loaded: dict[str, tuple[str, types.ModuleType]] = {}


def load_module(ref: str, path: str) -> tuple[types.ModuleType, str]:
    """The module ``ref`` names (a ``.py`` path or an importable name) and its source file."""
    if ref.endswith(".py") or "/" in ref or os.sep in ref:
        file = os.path.abspath(os.path.join(_config_dir.get() or os.getcwd(),
                                            os.path.expanduser(ref)))
        if not os.path.isfile(file):
            raise ConfigError(path, f"no such file: {file}")
        stem = os.path.splitext(os.path.basename(file))[0]
        return _execute(file, None, f"_sidecar_user_filters.{_identifier(stem)}", path), file
    try:
        spec = importlib.util.find_spec(ref)
    except (ImportError, ValueError) as e:      # a parent package failed to import
        raise ConfigError(path, f"cannot import {ref!r}: {_describe(e)}") from None
    if spec is None:
        raise ConfigError(path, f"no module named {ref!r} on the Python path (give the path of "
                          "a .py file, or install the module)")
    origin = spec.origin or ""
    if isinstance(spec.loader, importlib.machinery.SourceFileLoader) and origin.endswith(".py"):
        return _execute(origin, spec, ref, path), origin
    try:                                        # an extension or frozen module: imported once
        return importlib.import_module(ref), ""
    except Exception as e:
        raise ConfigError(path, f"importing {ref!r} failed: {_describe(e)}") from None


def _execute(file: str, spec: importlib.machinery.ModuleSpec | None, name: str,
             path: str) -> types.ModuleType:
    try:
        with open(file, "rb") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read {file}: {e.strerror}") from None
    digest = hashlib.sha256(source).hexdigest()
    cached = _loaded.get(file)
    if cached is not None and cached[0] == digest:
        return cached[1]
    if cached is None and spec is not None:
        # first use of a module by name: an ordinary import (or the module already imported),
        # so other code importing it shares it; only a changed source is executed afresh
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise ConfigError(path, f"importing {name!r} failed: {_describe(e, file)}") from None
        _loaded[file] = (digest, module)
        return module
    if spec is None:
        name = f"{name}_{digest[:12]}"          # each version of a file is its own module
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    # in sys.modules while it runs: dataclasses and typing resolve annotations through it
    sys.modules[name] = module
    try:
        code = compile(source, file, "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except (Exception, SystemExit) as e:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise ConfigError(path, f"loading {file} failed: {_describe(e, file)}") from None
    _loaded[file] = (digest, module)
    return module


def _identifier(stem: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in stem)
    return out if out and not out[0].isdigit() else "_" + out


def _describe(e: BaseException, file: str = "") -> str:
    """``line 12: NameError: name 'x' is not defined`` (the deepest line of ``file``)."""
    text = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
    if isinstance(e, SyntaxError) and e.lineno:
        return f"line {e.lineno}: {text}"
    line = None
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_filename == file:
            line = lineno
    return f"line {line}: {text}" if line is not None else text


# =============================================================================================
# the filter
# =============================================================================================

class _ErrorLog:
    """Logs a user filter's failures: the first traceback, then at most one per LOG_EVERY_S."""

    __slots__ = ("last", "suppressed")

    def __init__(self) -> None:
        self.last = 0.0
        self.suppressed = 0

    def failed(self, name: str, route: str, e: BaseException) -> None:
        now = time.monotonic()
        if self.last and now - self.last < LOG_EVERY_S:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        self.last = now
        self.suppressed = 0
        log.error("filter %s raised on route %s; answered 500 (%s)%s", name, route, FLAG, more,
                  exc_info=e)


class UserFiltersState:
    """Kept across reloads: each instance's own state (``new_state``), error logs, metrics."""

    __slots__ = ("env", "states", "error_logs", "errors")

    def __init__(self, env: FilterEnv):
        self.env = env
        self.states: dict[tuple[str, str, str], object] = {}
        self.error_logs: dict[str, _ErrorLog] = {}
        self.errors = sdk.counter(env.metrics, "sidecar_filter_errors_total",
                                  "Requests a user filter failed (it raised or returned no "
                                  "Response): answered 500 with flag FE", ("filter",))

    def state_for(self, cfg: UserFilterConfig, env: FilterEnv) -> object:
        key = (cfg.name, cfg.source_file or cfg.module, cfg.class_name)
        if key not in self.states:
            self.states[key] = cfg.cls.new_state(env)
        return self.states[key]


class GuardedFilter:
    """A user filter instance: its exceptions become a 500 for that request, never more."""

    __slots__ = ("inner", "name", "route", "errors", "error_log")

    def __init__(self, inner: sdk.UserFilter, name: str, route: str,
                 state: UserFiltersState):
        self.inner = inner
        self.name = name
        self.route = route
        self.errors = state.errors.labels(name)
        log_ = state.error_logs.get(name)
        if log_ is None:
            log_ = state.error_logs[name] = _ErrorLog()
        self.error_log = log_

    async def __call__(self, req: Request, next: Handler) -> Response:
        try:
            resp = await self.inner(req, next)
        except Exception as e:
            return self._failed(req, e)
        if not isinstance(resp, Response):
            return self._failed(req, TypeError(
                f"{type(self.inner).__name__} returned {type(resp).__name__}, not a Response"))
        return resp

    def _failed(self, req: Request, e: Exception) -> Response:
        self.errors.inc()
        self.error_log.failed(self.name, self.route, e)
        return sdk.local_reply(req.ctx, 500, "filter error", FLAG, details=DETAILS)

    def close(self) -> None:
        try:
            self.inner.close()
        except Exception:
            log.exception("filter %s: close() raised", self.name)


def new_state(env: FilterEnv) -> UserFiltersState:
    return UserFiltersState(env)


def build(cfg: UserFilterConfig, per_route: UserPerRoute | None, state: UserFiltersState,
          env: FilterEnv, route: RouteInfo) -> GuardedFilter:
    override = None
    if per_route is not None:
        try:
            override = cfg.cls.parse_per_route(per_route.raw, per_route.path)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(per_route.path, f"{cfg.class_name}.parse_per_route raised "
                              f"{_describe(e)}") from None
    setup = sdk.FilterSetup(cfg.name, override, state.state_for(cfg, env), env, route,
                            sdk.logger(cfg.name))
    try:
        inner = cfg.cls(cfg.config, setup)
    except ConfigError as e:      # e.g. setup.upstream() naming a cluster that is not there
        raise ConfigError(cfg.path, e.message if e.path == cfg.name else str(e)) from None
    except Exception as e:
        raise ConfigError(cfg.path, f"building {cfg.class_name} for route {route.name!r} "
                          f"raised {_describe(e, cfg.source_file)}") from None
    return GuardedFilter(inner, cfg.name, route.name, state)


SPEC = sdk.FilterSpec(
    name=NAME,
    short="python",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
    source_files=source_files,
    name_instance=name_instance,
)
