"""Sidecar injection, as pure functions: a Pod (or a pod template: anything with ``metadata``
and ``spec``) -> the injected pod, or the reason it was skipped or refused.

What an injected pod gets (names are fixed, so injection can recognise its own work):

* ``pysidecar-init`` (init container, last of the pod's init containers so that the app's own
  init containers still reach the network directly): ``sidecar iptables`` installs the
  redirect rules (inbound -> 15006, outbound -> 15001, UID 1337 and the probe port excluded).
  Runs as root with NET_ADMIN and NET_RAW only, always with the injector's image.
* ``pysidecar-proxy``: the sidecar as a native sidecar (an init container with
  ``restartPolicy: Always``, Kubernetes >= 1.29): it starts before the app containers (they
  wait for its startup probe), runs beside them, and is stopped after them, so the app's
  calls work from its first to its last moment, and Jobs complete. UID 1337, non-root,
  read-only root filesystem, no capabilities. Config from a ConfigMap (``pysidecar-config``
  by default, key ``sidecar.yaml``) mounted at ``/etc/pysidecar``; pod name, namespace,
  service account and IP from the downward API, the workload's name, app, version and
  canonical service/revision (the labels of Istio's metrics, ``sidecar.observability.workload``)
  worked out from the pod's labels and owner; its probes and the app's rewritten ones on the
  probe port 15020 (``sidecar.k8s.probes``); the metrics port 15090 (``http-envoy-prom``,
  served when the sidecar's config has ``metrics:``).
* volumes ``pysidecar-config`` (the ConfigMap) and ``pysidecar-state`` (emptyDir).
* the app containers' HTTP/TCP probes rewritten to the sidecar (``probe_rewrite``).
* ``prometheus.io/scrape|port|path`` annotations pointing at 15090 ``/stats/prometheus``
  (unless the pod has its own, which are kept; or ``prometheusScrape: "false"``).
* the annotation ``sidecar.pysidecar.io/status`` recording what was added: a pod carrying it
  is left unchanged (injection is idempotent).

Nothing of the pod's own is removed or replaced except the probe handlers moved to the sidecar.
Pods that cannot be patched safely are refused with the reason (see ``_refusal``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config.errors import ConfigError
from sidecar.k8s import probe_rewrite
from sidecar.k8s.settings import (
    ADMIN_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    PROBE_PORT,
    PROXY_UID,
    STATUS,
    InjectorConfig,
    ProxySettings,
    annotation_path,
    inject_wanted,
    proxy_settings,
)

PROXY_CONTAINER = "pysidecar-proxy"
INIT_CONTAINER = "pysidecar-init"
CONFIG_VOLUME = "pysidecar-config"
STATE_VOLUME = "pysidecar-state"
CONFIG_DIR = "/etc/pysidecar"
STATE_DIR = "/var/lib/sidecar"
# the ports the sidecar takes in the pod's network namespace, and what they are
SIDECAR_PORTS = {OUTBOUND_PORT: "outbound listener", INBOUND_PORT: "inbound listener",
                 PROBE_PORT: "probe port", ADMIN_PORT: "admin port", METRICS_PORT: "metrics port"}
# the metrics port is named as Istio names it, so PodMonitors written for Istio select it too
PORT_NAMES = ("sidecar-inbound", "sidecar-probes", "http-envoy-prom")
METRICS_PATH = "/stats/prometheus"
# the annotations Prometheus' kubernetes_sd pod role relabelling conventionally reads
PROMETHEUS_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")

CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
_JOB_OF_CRONJOB = re.compile(r"^(.+)-[0-9]{8,}$")    # <cronjob>-<scheduled time in minutes>

INJECTED, SKIPPED, REFUSED = "injected", "skipped", "refused"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str                       # INJECTED, SKIPPED or REFUSED
    pod: dict                         # the injected object; the input itself otherwise
    reason: str = ""                  # why skipped or refused
    warnings: tuple[str, ...] = ()


def image_repository(image: str) -> str:
    """``registry:5000/team/app:1.2@sha256:..`` -> ``registry:5000/team/app``."""
    ref = image.split("@", 1)[0]
    slash, colon = ref.rfind("/"), ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def _all_containers(spec: Mapping) -> list[dict]:
    return list(spec.get("initContainers") or ()) + list(spec.get("containers") or ())


def _runs_beside_app(spec: Mapping) -> list[dict]:
    """Containers running while traffic is intercepted: app containers and native sidecars."""
    return list(spec.get("containers") or ()) + [
        c for c in spec.get("initContainers") or () if c.get("restartPolicy") == "Always"]


def _already_injected(meta: Mapping, spec: Mapping) -> str | None:
    """None if the recorded injection is intact; else why it is not."""
    raw = (meta.get("annotations") or {}).get(STATUS)
    bad = f"{annotation_path(STATUS)} is not the injector's status; remove it to inject"
    try:
        status = json.loads(raw) if isinstance(raw, str) else None
        inits, volumes = status["initContainers"], status["volumes"]  # type: ignore[index]
    except (TypeError, ValueError, KeyError):
        return bad
    if not isinstance(inits, list) or not isinstance(volumes, list):
        return bad
    have_inits = {c.get("name") for c in spec.get("initContainers") or ()}
    have_vols = {v.get("name") for v in spec.get("volumes") or ()}
    missing = [n for n in inits if n not in have_inits] + [n for n in volumes if n not in have_vols]
    if missing:
        return (f"marked injected ({STATUS}) but {', '.join(missing)} missing; remove the "
                f"annotation to inject again")
    return None


def _refusal(meta: Mapping, spec: Mapping, s: ProxySettings, config: InjectorConfig) -> str | None:
    """Why this pod cannot be injected safely, or None."""
    if spec.get("hostNetwork"):
        return ("hostNetwork pod: it shares the node's network namespace, where interception "
                "rules and the sidecar's ports would affect the whole node")
    if isinstance(spec.get("os"), dict) and spec["os"].get("name") == "windows":
        return "Windows pod: the interception init step needs Linux iptables"
    names = {PROXY_CONTAINER, INIT_CONTAINER}
    repos = {image_repository(s.image), image_repository(config.image)}
    for c in _all_containers(spec) + list(spec.get("ephemeralContainers") or ()):
        if c.get("name") in names:
            return (f"a container is already named {c['name']!r} but the pod is not marked "
                    f"injected ({STATUS}); rename it")
        if isinstance(c.get("image"), str) and image_repository(c["image"]) in repos:
            return (f"container {c.get('name')!r} already runs the sidecar image "
                    f"({c['image']}): a hand-written sidecar; remove it, or opt the pod out "
                    f'with sidecar.pysidecar.io/inject: "false"')
    for v in spec.get("volumes") or ():
        if v.get("name") in (CONFIG_VOLUME, STATE_VOLUME):
            return f"a volume is already named {v['name']!r}; rename it"
    for c in _runs_beside_app(spec):
        for p in c.get("ports") or ():
            port = p.get("containerPort")
            if isinstance(port, int) and port in SIDECAR_PORTS:
                return (f"container {c.get('name')!r} declares port {port}, the sidecar's "
                        f"{SIDECAR_PORTS[port]}")
            if p.get("name") in PORT_NAMES:
                return (f"container {c.get('name')!r} declares a port named {p['name']!r}, "
                        f"a name the sidecar uses")
    if s.interception_mode == "REDIRECT":
        pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
        for c in _runs_beside_app(spec):
            uid = (c.get("securityContext") or {}).get("runAsUser", pod_uid)
            if uid == PROXY_UID:
                return (f"container {c.get('name')!r} runs as UID {PROXY_UID}, the sidecar's UID: "
                        f"its traffic would bypass interception")
    return None


def _init_container(s: ProxySettings, config: InjectorConfig) -> dict:
    args = ["iptables", "--proxy-uid", str(PROXY_UID), "--inbound-port", str(INBOUND_PORT),
            "--outbound-port", str(OUTBOUND_PORT), "--exclude-inbound-ports",
            ",".join(str(p) for p in sorted({PROBE_PORT, *s.exclude_inbound_ports}))]
    if s.exclude_outbound_ports:
        args += ["--exclude-outbound-ports", ",".join(map(str, s.exclude_outbound_ports))]
    if s.exclude_outbound_cidrs:
        args += ["--exclude-outbound-cidrs", ",".join(s.exclude_outbound_cidrs)]
    return {
        "name": INIT_CONTAINER,
        # the injector's image, never the pod's proxyImage annotation: this container is root
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": args,
        "resources": config.init_resources.to_k8s(),
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
            "allowPrivilegeEscalation": False,
            # iptables takes its lock under /run
            "readOnlyRootFilesystem": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _field_env(name: str, field: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field}}}


def _http_probe(path: str, period: int, timeout: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": PROBE_PORT, "scheme": "HTTP"},
            "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": failures}


def workload_name(meta: Mapping) -> str:
    """The workload a pod belongs to, as Istio names it: a Deployment's pod (owned by a
    ReplicaSet ``<deployment>-<pod-template-hash>``) -> the Deployment; a CronJob's Job
    (``<cronjob>-<minutes>``) -> the CronJob; another owner -> its name; no owner -> the pod's
    name (or its generateName without the trailing dash)."""
    labels = meta.get("labels") or {}
    for ref in meta.get("ownerReferences") or ():
        if not isinstance(ref, dict) or not ref.get("controller") or \
                not isinstance(ref.get("name"), str):
            continue
        name, kind = ref["name"], ref.get("kind")
        h = labels.get("pod-template-hash")
        if kind == "ReplicaSet" and isinstance(h, str) and name.endswith("-" + h):
            return name[:-len(h) - 1]
        m = _JOB_OF_CRONJOB.match(name)
        if kind == "Job" and m:
            return m.group(1)
        return name
    name = meta.get("name")
    if isinstance(name, str) and name:
        return name
    gen = meta.get("generateName")
    if not isinstance(gen, str) or not gen.rstrip("-"):
        return "unknown"
    gen = gen.rstrip("-")
    h = labels.get("pod-template-hash")
    return gen[:-len(h) - 1] if isinstance(h, str) and gen.endswith("-" + h) else gen


def workload_env(labels: Mapping[str, str], workload: str) -> list[dict]:
    """The workload's Istio metric labels, fixed at injection (a pod's labels rarely change
    after creation; a relabelled pod keeps the values it was created with)."""
    app = labels.get("app") or labels.get("app.kubernetes.io/name")
    version = labels.get("version") or labels.get("app.kubernetes.io/version")
    canonical = (labels.get(CANONICAL_NAME) or labels.get("app.kubernetes.io/name")
                 or labels.get("app") or workload)
    revision = (labels.get(CANONICAL_REVISION) or labels.get("app.kubernetes.io/version")
                or labels.get("version") or "latest")
    env = [{"name": "SIDECAR_WORKLOAD_NAME", "value": workload}]
    if app:
        env.append({"name": "SIDECAR_APP", "value": app})
    if version:
        env.append({"name": "SIDECAR_VERSION", "value": version})
    env += [{"name": "SIDECAR_CANONICAL_SERVICE", "value": canonical},
            {"name": "SIDECAR_CANONICAL_REVISION", "value": revision}]
    return env


def _proxy_container(s: ProxySettings, config: InjectorConfig, carried: dict,
                     identity: list[dict]) -> dict:
    env = [_field_env("POD_NAME", "metadata.name"),
           _field_env("POD_NAMESPACE", "metadata.namespace"),
           _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
           _field_env("POD_IP", "status.podIP"),
           *identity,
           {"name": "SIDECAR_ADMIN_PORT", "value": str(ADMIN_PORT)},
           {"name": probe_rewrite.ENV_PROBE_PORT, "value": str(PROBE_PORT)}]
    if carried:
        env.append({"name": probe_rewrite.ENV_APP_PROBERS, "value": probe_rewrite.encode(carried)})
    return {
        "name": PROXY_CONTAINER,
        "image": s.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",        # a native sidecar
        "args": ["run", "-c", f"{CONFIG_DIR}/{s.config_key}", "--concurrency",
                 str(s.concurrency), "--log-level", s.log_level],
        "ports": [{"name": PORT_NAMES[0], "containerPort": INBOUND_PORT, "protocol": "TCP"},
                  {"name": PORT_NAMES[1], "containerPort": PROBE_PORT, "protocol": "TCP"},
                  {"name": PORT_NAMES[2], "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": STATE_VOLUME, "mountPath": STATE_DIR}],
        # live: the process serves (the app containers start once this passes);
        # ready: the admin's /ready (config loaded, not draining, app up in sidecar mode)
        "startupProbe": _http_probe("/healthz/live", 1, 2, 60),
        "readinessProbe": _http_probe("/healthz/ready", 5, 3, 3),
        "livenessProbe": _http_probe("/healthz/live", 10, 3, 3),
        "resources": s.resources.to_k8s(),
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": True,
            "privileged": False, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        },
    }


def _malformed(meta: object, spec: object) -> str | None:
    """Mutating admission runs before the API server validates the object: check the shape of
    what injection reads, so a malformed pod gets a reason instead of a crash."""
    if not isinstance(meta, dict):
        return "metadata is not an object"
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is not None and (not isinstance(values, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in values.items())):
            return f"metadata.{field} is not a map of strings"
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list) \
            or not spec["containers"]:
        return "no spec.containers"
    if spec.get("securityContext") is not None and not isinstance(spec["securityContext"], dict):
        return "spec.securityContext is not an object"
    for field in ("containers", "initContainers", "ephemeralContainers", "volumes"):
        items = spec.get(field)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"spec.{field} is not a list"
        for i, c in enumerate(items):
            where = f"spec.{field}[{i}]"
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
                return f"{where} has no name"
            if field == "volumes":
                continue
            ports = c.get("ports")
            if ports is not None and (not isinstance(ports, list)
                                      or not all(isinstance(p, dict) for p in ports)):
                return f"{where}.ports is not a list of ports"
            if c.get("securityContext") is not None and not isinstance(c["securityContext"], dict):
                return f"{where}.securityContext is not an object"
    return None


def inject(obj: Mapping, config: InjectorConfig, workload: str | None = None) -> Outcome:
    """Inject the sidecar into a Pod or pod template. Pure: the input is not modified.
    ``workload``: the workload's name when injecting a template (``sidecar inject -f``);
    for a Pod it is worked out from its owner (``workload_name``)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    shape = _malformed(meta, spec)
    if shape:
        return Outcome(REFUSED, dict(obj), shape)
    assert isinstance(meta, dict) and isinstance(spec, dict)
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if STATUS in annotations:
        broken = _already_injected(meta, spec)
        if broken:
            return Outcome(REFUSED, dict(obj), broken)
        return Outcome(SKIPPED, dict(obj), "already injected")
    try:
        if not inject_wanted(labels, annotations):
            return Outcome(SKIPPED, dict(obj), 'opted out (sidecar.pysidecar.io/inject: "false")')
        s = proxy_settings(annotations, config)
    except ConfigError as e:
        return Outcome(REFUSED, dict(obj), str(e))
    reason = _refusal(meta, spec, s, config)
    if reason:
        return Outcome(REFUSED, dict(obj), reason)

    pod = copy.deepcopy(dict(obj))
    pmeta, pspec = dict(pod.get("metadata") or {}), pod["spec"]
    pod["metadata"] = pmeta
    carried: dict = {}
    warnings: list[str] = []
    if s.rewrite_app_probers:
        new_containers = []
        for c in pspec["containers"]:
            c2, one, warn = probe_rewrite.rewrite_container_probes(c, PROBE_PORT)
            new_containers.append(c2)
            carried.update(one)
            warnings += warn
        pspec["containers"] = new_containers
    added_inits = []
    inits = list(pspec.get("initContainers") or ())
    if s.interception_mode == "REDIRECT":
        inits.append(_init_container(s, config))
        added_inits.append(INIT_CONTAINER)
    identity = workload_env(labels, workload or workload_name(meta))
    inits.append(_proxy_container(s, config, carried, identity))
    added_inits.append(PROXY_CONTAINER)
    pspec["initContainers"] = inits
    pspec["volumes"] = list(pspec.get("volumes") or ()) + [
        {"name": CONFIG_VOLUME, "configMap": {"name": s.config_map}},
        {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}}]
    status = {"initContainers": added_inits, "volumes": [CONFIG_VOLUME, STATE_VOLUME],
              "rewrittenProbes": sorted(carried)}
    annotations = dict(pmeta.get("annotations") or {})
    if s.prometheus_scrape:
        mine = [k for k in PROMETHEUS_ANNOTATIONS if k in annotations]
        if mine:
            # the app's own scrape target: kept (a PodMonitor on http-envoy-prom scrapes us)
            warnings.append(f"the pod's {', '.join(mine)} annotation(s) are kept: Prometheus "
                            f"scrapes the app there; scrape the sidecar's metrics port "
                            f"{METRICS_PORT} with the PodMonitor in deploy/kubernetes/monitoring")
        else:
            annotations.update({"prometheus.io/scrape": "true",
                                "prometheus.io/port": str(METRICS_PORT),
                                "prometheus.io/path": METRICS_PATH})
    annotations[STATUS] = json.dumps(status, sort_keys=True, separators=(",", ":"))
    pmeta["annotations"] = annotations
    return Outcome(INJECTED, pod, warnings=tuple(warnings))


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def json_patch(old: object, new: object, path: str = "") -> list[dict]:
    """RFC 6902 operations turning ``old`` into ``new``: objects are compared key by key,
    lists element by element with new elements appended (``/-``), so the patch only touches
    what injection changed and never rewrites the pod's own fields wholesale."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict] = []
        for k in old:
            if k not in new:
                ops.append({"op": "remove", "path": f"{path}/{_pointer(k)}"})
        for k, v in new.items():
            p = f"{path}/{_pointer(k)}"
            if k not in old:
                ops.append({"op": "add", "path": p, "value": v})
            else:
                ops += json_patch(old[k], v, p)
        return ops
    if isinstance(old, list) and isinstance(new, list) and len(new) >= len(old):
        ops = []
        for i, item in enumerate(old):
            ops += json_patch(item, new[i], f"{path}/{i}")
        for item in new[len(old):]:
            ops.append({"op": "add", "path": f"{path}/-", "value": item})
        return ops
    return [{"op": "replace", "path": path, "value": new}]
