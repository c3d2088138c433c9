"""Envoy v3 access loggers -> the access log model: an HTTP connection manager's
``access_log`` (``AccessLogConfig``) and tcp_proxy's or an L4 listener's (``ConnectionLog``).
Both go through the same ``SubstitutionFormatString`` reader and the one parser
(``sidecar.config.log_format``); only the operators a log can print differ by context."""

from __future__ import annotations

from control_plane_client.translate.common import T_FILE_LOG, T_STDOUT_LOG, typed
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.l4 import ConnectionLog
from sidecar.config.listener import AccessLogConfig
from sidecar.config.log_format import (
    CONNECTION_OPERATORS,
    HTTP_OPERATORS,
    LogFormat,
    default_format,
    json_format,
    text_format,
)

T_STDERR_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"


def log_format(d: dict, path: str, operators: frozenset[str]) -> LogFormat:
    """A ``SubstitutionFormatString``. JSON is always written with sorted keys, as Envoy 1.40
    writes it, so ``json_format_options.sort_properties`` is accepted either way (and, as in
    Envoy, has nothing to do beside a text format)."""
    w.check_keys(d, ("text_format", "text_format_source", "json_format", "omit_empty_values",
                     "json_format_options", "content_type", "formatters"), path)
    for key in ("content_type", "formatters"):
        if key in d:
            raise ConfigError(w.join(path, key), "is not supported")
    if "json_format_options" in d:
        op = w.join(path, "json_format_options")
        o = w.check_keys(w.mapping(d, "json_format_options", path), ("sort_properties",), op)
        w.boolean(o, "sort_properties", op, False)
    kind = w.one_of(d, ("text_format", "text_format_source", "json_format"), path)
    omit = w.boolean(d, "omit_empty_values", path, False)
    kp = w.join(path, kind)
    if kind == "json_format":
        return json_format(w.mapping(d, kind, path), kp, operators, omit)
    if kind == "text_format":
        return text_format(w.string(d, kind, path), kp, operators, omit)
    src = w.check_keys(w.mapping(d, kind, path), ("inline_string", "filename", "inline_bytes",
                                                 "environment_variable", "watched_directory"), kp)
    for key in ("inline_bytes", "environment_variable", "watched_directory"):
        if key in src:
            raise ConfigError(w.join(kp, key), "is not supported (inline_string or filename)")
    if w.one_of(src, ("inline_string", "filename"), kp) == "inline_string":
        return text_format(w.string(src, "inline_string", kp), w.join(kp, "inline_string"),
                           operators, omit)
    fn = w.string(src, "filename", kp, nonempty=True)
    try:
        with open(fn, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(w.join(kp, "filename"), f"cannot read {fn!r}: {e.strerror}") from None
    return text_format(text, w.join(kp, "filename"), operators, omit)


def _logger(a: object, ap: str, operators: frozenset[str]) -> tuple[str, LogFormat | None]:
    """One ``AccessLog``: (destination, format; None: Envoy's default)."""
    w.check_keys(a, ("name", "typed_config", "filter"), ap)
    assert isinstance(a, dict)
    if "filter" in a:
        raise ConfigError(w.join(ap, "filter"), "access log filters are not supported")
    tp = w.join(ap, "typed_config")
    tc = w.mapping(a, "typed_config", ap)
    t = tc.get("@type")
    if t == T_FILE_LOG:
        body = typed(tc, tp, T_FILE_LOG)
        w.check_keys(body, ("path", "log_format"), tp)   # deprecated format fields: refused
        dest = w.string(body, "path", tp, nonempty=True)
    else:
        body = typed(tc, tp, (T_STDOUT_LOG, T_STDERR_LOG))
        w.check_keys(body, ("log_format",), tp)
        dest = "/dev/stdout" if t == T_STDOUT_LOG else "/dev/stderr"
    if "log_format" not in body:
        return dest, None
    return dest, log_format(w.mapping(body, "log_format", tp), w.join(tp, "log_format"),
                            operators)


def access_logs(items: list, path: str) -> tuple[AccessLogConfig, ...]:
    """An HTTP connection manager's file, stdout and stderr loggers."""
    out = []
    for i, a in enumerate(items):
        dest, fmt = _logger(a, w.join(path, i), HTTP_OPERATORS)
        out.append(AccessLogConfig(path=dest, format="envoy",
                                   log_format=fmt or default_format(HTTP_OPERATORS)))
    return tuple(out)


def connection_logs(items: list, path: str) -> tuple[ConnectionLog, ...]:
    """tcp_proxy's or an L4 listener's loggers (one line per connection)."""
    out = []
    for i, a in enumerate(items):
        dest, fmt = _logger(a, w.join(path, i), CONNECTION_OPERATORS)
        out.append(ConnectionLog(path=dest, format=fmt or default_format(CONNECTION_OPERATORS)))
    return tuple(out)
