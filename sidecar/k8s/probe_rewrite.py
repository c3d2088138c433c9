"""Application probes through the sidecar, as Istio does it.

With interception on, a kubelet probe of the app's port is redirected to the sidecar's inbound
listener: an HTTP probe then fails when inbound requires mTLS, and a TCP probe always succeeds
(the sidecar accepts, whatever the app does). So the app containers' ``httpGet`` and
``tcpSocket`` probes are rewritten to ``GET /app-health/<container>/<livez|readyz|startupz>`` on
the sidecar's probe port (never intercepted), and the original probes travel to the sidecar in
the ``SIDECAR_APP_PROBERS`` env var (JSON keyed by those paths, the shape of Istio's
``ISTIO_KUBE_APP_PROBERS``)::

    {"/app-health/web/readyz": {"httpGet": {"path": "/health", "port": 8080, "scheme": "HTTP"},
                                "timeoutSeconds": 1},
     "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1}}

The sidecar (``sidecar.k8s.probes``) runs the original probe against the app on loopback and
answers with its result. Timing fields (period, thresholds, initial delay) stay on the kubelet's
probe; ``timeoutSeconds`` bounds the sidecar's own attempt too. ``exec`` and ``grpc`` probes are
left as they are (exec runs inside the container; gRPC gets a warning).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config.errors import ConfigError

ENV_APP_PROBERS = "SIDECAR_APP_PROBERS"
ENV_PROBE_PORT = "SIDECAR_PROBE_PORT"
PATH_PREFIX = "/app-health/"
KINDS = (("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz"))
_HANDLERS = ("httpGet", "tcpSocket")
DEFAULT_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class HttpProbe:
    port: int
    path: str = "/"
    scheme: str = "HTTP"                  # HTTP or HTTPS (certificate not verified, as kubelet)
    host: str = ""                        # "" -> 127.0.0.1 (the app, in the pod)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TcpProbe:
    port: int
    host: str = ""


@dataclass(frozen=True, slots=True)
class AppProber:
    action: HttpProbe | TcpProbe
    timeout_s: float = DEFAULT_TIMEOUT_S


def probe_path(container: str, suffix: str) -> str:
    return f"{PATH_PREFIX}{container}/{suffix}"


# ---- the pod side (used by the injector) -------------------------------------------------------

def _resolve_port(port: object, container: Mapping) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 1 <= port <= 65535 else None
    if isinstance(port, str):
        for p in container.get("ports") or ():
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    return None


def rewrite_container_probes(container: dict, probe_port: int) -> tuple[dict, dict, list[str]]:
    """-> (the container with its HTTP/TCP probes pointing at the sidecar, the carried probes
    {path: original handler + timeoutSeconds}, warnings). The input is not modified."""
    name = container["name"]
    out = dict(container)
    carried: dict = {}
    warnings: list[str] = []
    for field, suffix in KINDS:
        probe = container.get(field)
        if not isinstance(probe, dict):
            continue
        handler = next((h for h in _HANDLERS if h in probe), None)
        if handler is not None and not isinstance(probe[handler], dict):
            warnings.append(f"container {name}: {field}.{handler} is not an object; left as is")
            continue
        if handler is None:
            if "grpc" in probe:
                warnings.append(f"container {name}: {field} is a gRPC probe, left as is (with "
                                f"interception it goes through the sidecar's inbound listener)")
            continue
        action = dict(probe[handler])
        port = _resolve_port(action.get("port"), container)
        if port is None:
            warnings.append(f"container {name}: {field} port {action.get('port')!r} names no "
                            f"port of the container; probe left as is")
            continue
        action["port"] = port
        carried[probe_path(name, suffix)] = {handler: action,
                                             "timeoutSeconds": probe.get("timeoutSeconds", 1)}
        out[field] = {"httpGet": {"path": probe_path(name, suffix), "port": probe_port,
                                  "scheme": "HTTP"},
                      **{k: v for k, v in probe.items() if k not in _HANDLERS}}
    return out, carried, warnings


def encode(carried: Mapping) -> str:
    """The env var's value: canonical JSON, so injecting the same pod twice gives equal pods."""
    return json.dumps(carried, sort_keys=True, separators=(",", ":"))


# ---- the sidecar side --------------------------------------------------------------------------

def _str(d: Mapping, key: str, path: str, default: str = "") -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise ConfigError(f"{path}.{key}", "must be a string")
    return v


def _parse_one(path: str, spec: object, where: str) -> AppProber:
    if not path.startswith(PATH_PREFIX) or path.count("/") != 3:
        raise ConfigError(where, "keys must be /app-health/<container>/<kind>")
    if not isinstance(spec, dict):
        raise ConfigError(where, "must be an object")
    unknown = set(spec) - {"httpGet", "tcpSocket", "timeoutSeconds"}
    if unknown:
        raise ConfigError(where, f"unknown field(s) {', '.join(sorted(unknown))}")
    t = spec.get("timeoutSeconds", 1)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise ConfigError(f"{where}.timeoutSeconds", "must be a positive number")
    handlers = [h for h in _HANDLERS if h in spec]
    if len(handlers) != 1:
        raise ConfigError(where, "needs exactly one of httpGet, tcpSocket")
    hw = f"{where}.{handlers[0]}"
    h = spec[handlers[0]]
    if not isinstance(h, dict):
        raise ConfigError(hw, "must be an object")
    port = h.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{hw}.port", "must be a port number 1..65535")
    host = _str(h, "host", hw)
    if handlers[0] == "tcpSocket":
        if set(h) - {"port", "host"}:
            raise ConfigError(hw, f"unknown field(s) {', '.join(sorted(set(h) - {'port', 'host'}))}")
        return AppProber(TcpProbe(port=port, host=host), float(t))
    known = {"port", "host", "path", "scheme", "httpHeaders"}
    if set(h) - known:
        raise ConfigError(hw, f"unknown field(s) {', '.join(sorted(set(h) - known))}")
    p = _str(h, "path", hw, "/") or "/"
    if not p.startswith("/"):
        p = "/" + p                      # as the kubelet does
    scheme = _str(h, "scheme", hw, "HTTP").upper()
    if scheme not in ("HTTP", "HTTPS"):
        raise ConfigError(f"{hw}.scheme", "must be HTTP or HTTPS")
    headers = []
    for i, hd in enumerate(h.get("httpHeaders") or ()):
        if not isinstance(hd, dict):
            raise ConfigError(f"{hw}.httpHeaders[{i}]", "must be {name, value}")
        headers.append((_str(hd, "name", f"{hw}.httpHeaders[{i}]"),
                        _str(hd, "value", f"{hw}.httpHeaders[{i}]")))
        if not headers[-1][0] or any(c in headers[-1][0] + headers[-1][1] for c in "\r\n\0"):
            raise ConfigError(f"{hw}.httpHeaders[{i}]", "invalid header name or value")
    return AppProber(HttpProbe(port=port, path=p, scheme=scheme, host=host,
                               headers=tuple(headers)), float(t))


def parse_probers(text: str) -> dict[str, AppProber]:
    """``SIDECAR_APP_PROBERS`` -> {path: AppProber}; ConfigError names the bad entry."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(ENV_APP_PROBERS, f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(ENV_APP_PROBERS, "must be a JSON object {path: probe}")
    return {path: _parse_one(path, spec, f'{ENV_APP_PROBERS}["{path}"]')
            for path, spec in doc.items()}
