"""Injection settings: the injector's defaults (``InjectorConfig``) and the per-pod knobs read
from annotations under ``sidecar.pysidecar.io/`` (``ProxySettings``), validated once.

Every annotation under the prefix is either one of ``KNOWN_ANNOTATIONS`` or refused by name:
a typo (``sidecar.pysidecar.io/excludeInboundPort``) must not be silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation

from sidecar.config.errors import ConfigError

PREFIX = "sidecar.pysidecar.io/"
# pod label (objectSelector) and annotation: "true" / "false"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"              # written by the injector: what it added (JSON)
INTERCEPTION_MODE = PREFIX + "interceptionMode"
EXCLUDE_INBOUND_PORTS = PREFIX + "excludeInboundPorts"
EXCLUDE_OUTBOUND_PORTS = PREFIX + "excludeOutboundPorts"
EXCLUDE_OUTBOUND_IP_RANGES = PREFIX + "excludeOutboundIPRanges"
CONCURRENCY = PREFIX + "concurrency"
PROXY_CPU = PREFIX + "proxyCPU"
PROXY_CPU_LIMIT = PREFIX + "proxyCPULimit"
PROXY_MEMORY = PREFIX + "proxyMemory"
PROXY_MEMORY_LIMIT = PREFIX + "proxyMemoryLimit"
LOG_LEVEL = PREFIX + "logLevel"
PROXY_IMAGE = PREFIX + "proxyImage"
CONFIG_MAP = PREFIX + "configMap"
CONFIG_KEY = PREFIX + "configKey"
REWRITE_APP_PROBERS = PREFIX + "rewriteAppProbers"
PROMETHEUS_SCRAPE = PREFIX + "prometheusScrape"
KNOWN_ANNOTATIONS = (INJECT, STATUS, INTERCEPTION_MODE, EXCLUDE_INBOUND_PORTS,
                     EXCLUDE_OUTBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES, CONCURRENCY, PROXY_CPU,
                     PROXY_CPU_LIMIT, PROXY_MEMORY, PROXY_MEMORY_LIMIT, LOG_LEVEL, PROXY_IMAGE,
                     CONFIG_MAP, CONFIG_KEY, REWRITE_APP_PROBERS, PROMETHEUS_SCRAPE)
# the namespace label the MutatingWebhookConfiguration's namespaceSelector matches
NAMESPACE_LABEL = "pysidecar-injection"

# Fixed by the interception contract with `sidecar iptables` (issue 16): the proxy's UID is
# excluded from the redirect, so the proxy's own connections are not looped back to itself.
PROXY_UID = 1337
INBOUND_PORT = 15006       # inbound listener: where redirected inbound connections land
OUTBOUND_PORT = 15001      # outbound listener: where the app's redirected connections land
PROBE_PORT = 15020         # the prober (sidecar.k8s.probes): kubelet probes, never intercepted
ADMIN_PORT = 9901          # the sidecar's admin port (loopback), as in deploy/
METRICS_PORT = 15090       # the metrics-only listener (the config's `metrics:`), as Istio's

INTERCEPTION_MODES = ("REDIRECT", "NONE")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_QUANTITY = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?P<suffix>m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+)?$")
_SUFFIX = {None: Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3,
           "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
           "P": Decimal(10) ** 15, "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10,
           "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
           "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}
# registry[:port]/path[:tag][@digest]; lower-case path components as the distribution spec says
_IMAGE = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def quantity(text: str, path: str) -> Decimal:
    """A Kubernetes resource quantity (``100m``, ``1.5``, ``64Mi``, ``1e3``) -> its value."""
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(path, f"{text!r} is not a Kubernetes quantity (e.g. 100m, 1, 64Mi)")
    suffix = m.group("suffix")
    try:
        num = Decimal(m.group("num"))
        if suffix and suffix[0] in "eE":
            return num * Decimal(10) ** int(suffix[1:])
        return num * _SUFFIX[suffix]
    except (InvalidOperation, OverflowError):
        raise ConfigError(path, f"{text!r} is out of range") from None


@dataclass(frozen=True, slots=True)
class Resources:
    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str

    def check(self, path: str) -> None:
        for req, lim, what in ((self.cpu_request, self.cpu_limit, "CPU"),
                               (self.memory_request, self.memory_limit, "memory")):
            if quantity(req, path) > quantity(lim, path):
                raise ConfigError(path, f"the {what} request {req} exceeds the {what} limit "
                                        f"{lim}")

    def to_k8s(self) -> dict:
        return {"requests": {"cpu": self.cpu_request, "memory": self.memory_request},
                "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit}}


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """What every injected pod gets unless its annotations say otherwise."""
    image: str = "pysidecar:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    config_map: str = "pysidecar-config"       # per namespace: the sidecar's config
    config_key: str = "sidecar.yaml"
    concurrency: int = 1
    log_level: str = "info"
    interception_mode: str = "REDIRECT"
    proxy_resources: Resources = Resources("100m", "64Mi", "1", "128Mi")
    init_resources: Resources = Resources("10m", "32Mi", "500m", "64Mi")
    # webhook only: refuse (deny) pods it cannot inject instead of admitting them unpatched
    fail_closed: bool = False

    def check(self) -> InjectorConfig:
        if not _IMAGE.match(self.image):
            raise ConfigError("image", f"{self.image!r} is not an image reference")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError("image_pull_policy", "must be Always, IfNotPresent or Never")
        _check_config_map(self.config_map, "config_map")
        _check_config_key(self.config_key, "config_key")
        if self.concurrency < 0:
            raise ConfigError("concurrency", "must be >= 0 (0: one worker per usable core)")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.interception_mode not in INTERCEPTION_MODES:
            raise ConfigError("interception_mode", f"must be one of {', '.join(INTERCEPTION_MODES)}")
        self.proxy_resources.check("proxy_resources")
        self.init_resources.check("init_resources")
        return self


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """One pod's effective settings: the injector's defaults with its annotations applied."""
    image: str
    config_map: str
    config_key: str
    concurrency: int
    log_level: str
    interception_mode: str
    exclude_inbound_ports: tuple[int, ...]
    exclude_outbound_ports: tuple[int, ...]
    exclude_outbound_cidrs: tuple[str, ...]
    resources: Resources
    rewrite_app_probers: bool
    prometheus_scrape: bool = True


def annotation_path(key: str) -> str:
    return f'metadata.annotations["{key}"]'


def inject_wanted(labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
    """The pod's own say: ``sidecar.pysidecar.io/inject`` as a label (what the webhook's
    objectSelector sees) or an annotation. Opt-out wins; absent means yes (the namespace
    label, checked by the API server before calling the webhook, decided already)."""
    for where, values in (("labels", labels), ("annotations", annotations)):
        v = values.get(INJECT)
        if v is None:
            continue
        if v not in ("true", "false"):
            raise ConfigError(f'metadata.{where}["{INJECT}"]', f'must be "true" or "false", '
                                                                f"got {v!r}")
        if v == "false":
            return False
    return True


def _ports(text: str, path: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise ConfigError(path, f"{part!r} is not a port (a comma-separated list of 1..65535)")
        out.add(int(part))
    return tuple(sorted(out))


def _cidrs(text: str, path: str) -> tuple[str, ...]:
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=True)
        except ValueError as e:
            raise ConfigError(path, f"{part!r} is not a CIDR: {e}") from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _bool(text: str, path: str) -> bool:
    if text not in ("true", "false"):
        raise ConfigError(path, f'must be "true" or "false", got {text!r}')
    return text == "true"


def _check_config_map(name: str, path: str) -> str:
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(path, f"{name!r} is not a ConfigMap name (a DNS subdomain)")
    return name


def _check_config_key(key: str, path: str) -> str:
    if len(key) > 253 or not _CONFIG_KEY.match(key) or key in (".", ".."):
        raise ConfigError(path, f"{key!r} is not a ConfigMap key")
    return key


def proxy_settings(annotations: Mapping[str, str], config: InjectorConfig) -> ProxySettings:
    """Validate the pod's annotations under the prefix; raise ConfigError naming the first bad
    one (its full key as the path)."""
    for key in annotations:
        if key.startswith(PREFIX) and key not in KNOWN_ANNOTATIONS:
            known = ", ".join(k[len(PREFIX):] for k in KNOWN_ANNOTATIONS)
            raise ConfigError(annotation_path(key), f"unknown annotation (known: {known})")
        if key.startswith(PREFIX) and not isinstance(annotations[key], str):
            raise ConfigError(annotation_path(key), "must be a string")

    def get(key: str) -> str | None:
        return annotations.get(key)

    s = ProxySettings(image=config.image, config_map=config.config_map,
                      config_key=config.config_key, concurrency=config.concurrency,
                      log_level=config.log_level, interception_mode=config.interception_mode,
                      exclude_inbound_ports=(), exclude_outbound_ports=(),
                      exclude_outbound_cidrs=(), resources=config.proxy_resources,
                      rewrite_app_probers=True)
    if (v := get(PROXY_IMAGE)) is not None:
        if not _IMAGE.match(v):
            raise ConfigError(annotation_path(PROXY_IMAGE), f"{v!r} is not an image reference")
        s = replace(s, image=v)
    if (v := get(CONFIG_MAP)) is not None:
        s = replace(s, config_map=_check_config_map(v, annotation_path(CONFIG_MAP)))
    if (v := get(CONFIG_KEY)) is not None:
        s = replace(s, config_key=_check_config_key(v, annotation_path(CONFIG_KEY)))
    if (v := get(CONCURRENCY)) is not None:
        if not v.isdigit() or int(v) > 256:
            raise ConfigError(annotation_path(CONCURRENCY),
                              f"{v!r} must be a number of workers, 0..256 (0: one per usable core)")
        s = replace(s, concurrency=int(v))
    if (v := get(LOG_LEVEL)) is not None:
        if v.lower() not in LOG_LEVELS:
            raise ConfigError(annotation_path(LOG_LEVEL),
                              f"{v!r} must be one of {', '.join(LOG_LEVELS)}")
        s = replace(s, log_level=v.lower())
    if (v := get(INTERCEPTION_MODE)) is not None:
        if v == "TPROXY":
            raise ConfigError(annotation_path(INTERCEPTION_MODE),
                              "TPROXY is not supported (sidecar iptables installs REDIRECT rules); "
                              "use REDIRECT or NONE")
        if v not in INTERCEPTION_MODES:
            raise ConfigError(annotation_path(INTERCEPTION_MODE),
                              f"{v!r} must be one of {', '.join(INTERCEPTION_MODES)}")
        s = replace(s, interception_mode=v)
    if (v := get(EXCLUDE_INBOUND_PORTS)) is not None:
        s = replace(s, exclude_inbound_ports=_ports(v, annotation_path(EXCLUDE_INBOUND_PORTS)))
    if (v := get(EXCLUDE_OUTBOUND_PORTS)) is not None:
        s = replace(s, exclude_outbound_ports=_ports(v, annotation_path(EXCLUDE_OUTBOUND_PORTS)))
    if (v := get(EXCLUDE_OUTBOUND_IP_RANGES)) is not None:
        s = replace(s, exclude_outbound_cidrs=_cidrs(v, annotation_path(EXCLUDE_OUTBOUND_IP_RANGES)))
    if (v := get(REWRITE_APP_PROBERS)) is not None:
        s = replace(s, rewrite_app_probers=_bool(v, annotation_path(REWRITE_APP_PROBERS)))
    if (v := get(PROMETHEUS_SCRAPE)) is not None:
        s = replace(s, prometheus_scrape=_bool(v, annotation_path(PROMETHEUS_SCRAPE)))
    res = s.resources
    for key, field in ((PROXY_CPU, "cpu_request"), (PROXY_CPU_LIMIT, "cpu_limit"),
                       (PROXY_MEMORY, "memory_request"), (PROXY_MEMORY_LIMIT, "memory_limit")):
        if (v := get(key)) is not None:
            quantity(v, annotation_path(key))
            res = replace(res, **{field: v.strip()})
    for req, lim, req_key, lim_key, what in (
            (res.cpu_request, res.cpu_limit, PROXY_CPU, PROXY_CPU_LIMIT, "CPU"),
            (res.memory_request, res.memory_limit, PROXY_MEMORY, PROXY_MEMORY_LIMIT, "memory")):
        if quantity(req, "") > quantity(lim, ""):
            key = req_key if req_key in annotations else lim_key
            raise ConfigError(annotation_path(key), f"the proxy's {what} request {req} exceeds "
                                                    f"its {what} limit {lim} (set both "
                                                    f"{req_key[len(PREFIX):]} and "
                                                    f"{lim_key[len(PREFIX):]})")
    s = replace(s, resources=res)
    if s.interception_mode == "NONE":
        for key in (EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, EXCLUDE_OUTBOUND_IP_RANGES):
            if key in annotations:
                raise ConfigError(annotation_path(key), "has no effect with interceptionMode NONE "
                                                        "(no traffic is intercepted)")
    return s
