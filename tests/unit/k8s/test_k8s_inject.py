"""Sidecar injection as pure functions: what an injected pod gets, what of the pod's own is
kept, idempotency, every annotation honoured or refused by name, refusals with their reasons,
the JSONPatch (applied with the `jsonpatch` package), and the injected pods validated offline
against the Kubernetes 1.30 and 1.37 schemas."""

from __future__ import annotations

import copy
import json

import jsonpatch
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from k8s_objects import deployment, replicaset_pod, validate

from sidecar.config.errors import ConfigError
from sidecar.k8s import probe_rewrite
from sidecar.k8s.inject import (
    CONFIG_VOLUME,
    INIT_CONTAINER,
    INJECTED,
    PROXY_CONTAINER,
    REFUSED,
    SKIPPED,
    STATE_VOLUME,
    image_repository,
    inject,
    json_patch,
)
from sidecar.k8s.settings import PREFIX, STATUS, InjectorConfig, Resources, quantity

CONFIG = InjectorConfig()


def injected(pod: dict, config: InjectorConfig = CONFIG):
    out = inject(pod, config)
    assert out.status == INJECTED, out.reason
    return out


def init(pod: dict, name: str) -> dict:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == name)


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def with_annotations(pod: dict, **ann: str) -> dict:
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("annotations", {}).update(
        {PREFIX + k: v for k, v in ann.items()})
    return pod


def proxy_env(pod: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom"))
            for e in init(pod, PROXY_CONTAINER)["env"]}


# ---- what an injected pod gets ------------------------------------------------------------------

def test_injected_pod_has_init_step_native_sidecar_volumes_and_status():
    pod = replicaset_pod()
    out = injected(pod)
    p = out.pod
    names = [c["name"] for c in p["spec"]["initContainers"]]
    # the app's init container first (it still reaches the network directly), then the
    # interception rules, then the proxy as a native sidecar
    assert names == ["migrate", INIT_CONTAINER, PROXY_CONTAINER]
    it = init(p, INIT_CONTAINER)
    assert it["args"] == ["iptables", "--proxy-uid", "1337", "--inbound-port", "15006",
                          "--outbound-port", "15001", "--exclude-inbound-ports", "15020"]
    sc = it["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False

    px = init(p, PROXY_CONTAINER)
    assert px["restartPolicy"] == "Always"
    assert px["args"] == ["run", "-c", "/etc/pysidecar/sidecar.yaml", "--concurrency", "1",
                          "--log-level", "info"]
    assert px["securityContext"] == {
        "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True, "privileged": False,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    assert px["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"},
                               "limits": {"cpu": "1", "memory": "128Mi"}}
    env = proxy_env(p)
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["SERVICE_ACCOUNT"]["fieldRef"]["fieldPath"] == "spec.serviceAccountName"
    assert env["POD_IP"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["SIDECAR_PROBE_PORT"] == "15020"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert px[probe]["httpGet"]["port"] == 15020
    assert px["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    assert {"name": CONFIG_VOLUME, "configMap": {"name": "pysidecar-config"}} in p["spec"]["volumes"]
    assert any(v["name"] == STATE_VOLUME and "emptyDir" in v for v in p["spec"]["volumes"])
    status = json.loads(p["metadata"]["annotations"][STATUS])
    assert status == {"initContainers": [INIT_CONTAINER, PROXY_CONTAINER],
                      "volumes": [CONFIG_VOLUME, STATE_VOLUME],
                      "rewrittenProbes": ["/app-health/web/livez", "/app-health/web/readyz",
                                          "/app-health/web/startupz"]}
    assert pod == replicaset_pod(), "the input is not modified"


def test_nothing_of_the_pods_own_is_dropped():
    pod = replicaset_pod()
    p = injected(pod).pod
    # every metadata field, every spec field, every volume and init container kept as it was
    for k, v in pod["metadata"].items():
        if k == "annotations":
            assert v.items() <= p["metadata"]["annotations"].items()
        else:
            assert p["metadata"][k] == v
    for k, v in pod["spec"].items():
        if k not in ("containers", "initContainers", "volumes"):
            assert p["spec"][k] == v, k
    assert p["spec"]["volumes"][:len(pod["spec"]["volumes"])] == pod["spec"]["volumes"]
    assert p["spec"]["initContainers"][0] == pod["spec"]["initContainers"][0]
    # containers: everything but the probe handlers moved to the sidecar
    for before, after in zip(pod["spec"]["containers"], p["spec"]["containers"], strict=False):
        for k, v in before.items():
            if k.endswith("Probe") and ("httpGet" in v or "tcpSocket" in v):
                kept = {f: x for f, x in v.items() if f not in ("httpGet", "tcpSocket")}
                assert kept.items() <= after[k].items(), (before["name"], k)
            else:
                assert after[k] == v, (before["name"], k)
    # ...and the moved handlers are carried, intact, to the sidecar
    carried = json.loads(proxy_env(p)["SIDECAR_APP_PROBERS"])
    web = container(pod, "web")
    assert carried["/app-health/web/readyz"] == {
        "httpGet": web["readinessProbe"]["httpGet"], "timeoutSeconds": 2}
    assert carried["/app-health/web/livez"]["httpGet"]["port"] == 8080     # named port resolved
    assert carried["/app-health/web/startupz"] == {"tcpSocket": {"port": 8080},
                                                   "timeoutSeconds": 1}


def test_app_probes_point_at_the_sidecar_with_their_timing_kept():
    p = injected(replicaset_pod()).pod
    web = container(p, "web")
    assert web["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"},
        "initialDelaySeconds": 5, "timeoutSeconds": 1, "periodSeconds": 10,
        "successThreshold": 1, "failureThreshold": 3}
    assert web["startupProbe"]["httpGet"]["path"] == "/app-health/web/startupz"
    assert "tcpSocket" not in web["startupProbe"]
    assert web["startupProbe"]["failureThreshold"] == 30
    # exec and gRPC probes are left as they are; gRPC gets a warning
    exporter = container(p, "exporter")
    assert exporter["livenessProbe"]["exec"]
    assert exporter["readinessProbe"]["grpc"] == {"port": 9000, "service": ""}
    out = inject(replicaset_pod(), CONFIG)
    assert any("exporter" in w and "gRPC" in w for w in out.warnings)


def test_unresolvable_named_probe_port_is_left_alone_with_a_warning():
    pod = replicaset_pod()
    container(pod, "web")["livenessProbe"]["httpGet"]["port"] = "nope"
    out = injected(pod)
    assert container(out.pod, "web")["livenessProbe"]["httpGet"]["port"] == "nope"
    assert any("'nope' names no port" in w for w in out.warnings)
    assert "/app-health/web/livez" not in json.loads(proxy_env(out.pod)["SIDECAR_APP_PROBERS"])


@pytest.mark.parametrize("make", [replicaset_pod, lambda: deployment()["spec"]["template"]])
def test_injected_pods_validate_against_the_kubernetes_schemas(make):
    obj = make()
    p = injected(obj).pod
    if "kind" not in p:          # a template: validate it as a Pod
        p = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **p["metadata"]},
             "spec": p["spec"]}
    validate(p)
    for ann in ({"interceptionMode": "NONE"}, {"rewriteAppProbers": "false"},
                {"excludeOutboundIPRanges": "10.0.0.0/8,fd00::/8", "excludeInboundPorts": "9000",
                 "excludeOutboundPorts": "5432,6379", "proxyCPU": "250m",
                 "proxyMemoryLimit": "1Gi", "concurrency": "2", "logLevel": "debug",
                 "proxyImage": "registry.example.com/mesh/pysidecar:0.2.0@sha256:" + "a" * 64}):
        validate(injected(with_annotations(replicaset_pod(), **ann)).pod)


# ---- idempotency --------------------------------------------------------------------------------

def test_injecting_an_injected_pod_changes_nothing():
    once = injected(replicaset_pod()).pod
    again = inject(once, CONFIG)
    assert again.status == SKIPPED and again.reason == "already injected"
    assert again.pod == once
    assert json_patch(once, again.pod) == []
    # also with a different injector config: the recorded injection stands
    assert inject(once, InjectorConfig(image="other/image:9")).status == SKIPPED


def test_a_broken_injection_record_is_refused_not_repaired_silently():
    once = injected(replicaset_pod()).pod
    broken = copy.deepcopy(once)
    broken["spec"]["initContainers"] = [c for c in broken["spec"]["initContainers"]
                                        if c["name"] != PROXY_CONTAINER]
    out = inject(broken, CONFIG)
    assert out.status == REFUSED and "pysidecar-proxy missing" in out.reason
    garbage = with_annotations(replicaset_pod(), status="yes")
    out = inject(garbage, CONFIG)
    assert out.status == REFUSED and "not the injector's status" in out.reason


# ---- opting out ---------------------------------------------------------------------------------

def test_opt_out_by_annotation_or_label():
    out = inject(with_annotations(replicaset_pod(), inject="false"), CONFIG)
    assert out.status == SKIPPED and "opted out" in out.reason
    pod = replicaset_pod()
    pod["metadata"]["labels"][PREFIX + "inject"] = "false"
    assert inject(pod, CONFIG).status == SKIPPED
    assert inject(with_annotations(replicaset_pod(), inject="true"), CONFIG).status == INJECTED
    out = inject(with_annotations(replicaset_pod(), inject="yes"), CONFIG)
    assert out.status == REFUSED and f'"{PREFIX}inject"' in out.reason


# ---- annotations: honoured ----------------------------------------------------------------------

def test_interception_annotations_reach_the_init_step():
    p = injected(with_annotations(replicaset_pod(), excludeInboundPorts="9000, 8443,9000",
                                  excludeOutboundPorts="6379,5432",
                                  excludeOutboundIPRanges="10.96.0.0/12, fd00::/8")).pod
    assert init(p, INIT_CONTAINER)["args"][7:] == [
        "--exclude-inbound-ports", "8443,9000,15020", "--exclude-outbound-ports", "5432,6379",
        "--exclude-outbound-cidrs", "10.96.0.0/12,fd00::/8"]


def test_interception_mode_none_has_no_init_step():
    p = injected(with_annotations(replicaset_pod(), interceptionMode="NONE")).pod
    assert [c["name"] for c in p["spec"]["initContainers"]] == ["migrate", PROXY_CONTAINER]
    assert json.loads(p["metadata"]["annotations"][STATUS])["initContainers"] == [PROXY_CONTAINER]
    # and with the injector's default set to NONE
    p = injected(replicaset_pod(), InjectorConfig(interception_mode="NONE")).pod
    assert INIT_CONTAINER not in [c["name"] for c in p["spec"]["initContainers"]]


def test_proxy_annotations_reach_the_proxy_container():
    image = "registry.example.com:5000/mesh/pysidecar:0.2.0"
    p = injected(with_annotations(replicaset_pod(), concurrency="4", logLevel="DEBUG",
                                  proxyCPU="200m", proxyCPULimit="2", proxyMemory="100Mi",
                                  proxyMemoryLimit="1Gi", proxyImage=image,
                                  configMap="web-sidecar", configKey="web.yaml")).pod
    px = init(p, PROXY_CONTAINER)
    assert px["args"] == ["run", "-c", "/etc/pysidecar/web.yaml", "--concurrency", "4",
                          "--log-level", "debug"]
    assert px["resources"] == {"requests": {"cpu": "200m", "memory": "100Mi"},
                               "limits": {"cpu": "2", "memory": "1Gi"}}
    assert px["image"] == image
    # the root init container keeps the injector's image whatever the pod asks
    assert init(p, INIT_CONTAINER)["image"] == CONFIG.image
    assert {"name": CONFIG_VOLUME, "configMap": {"name": "web-sidecar"}} in p["spec"]["volumes"]


def test_rewrite_app_probers_false_keeps_the_probes():
    pod = replicaset_pod()
    p = injected(with_annotations(pod, rewriteAppProbers="false")).pod
    assert p["spec"]["containers"] == pod["spec"]["containers"]
    assert "SIDECAR_APP_PROBERS" not in proxy_env(p)


# ---- annotations: refused by name ---------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("concurrency", "-1", "number of workers"),
    ("concurrency", "lots", "number of workers"),
    ("logLevel", "verbose", "must be one of"),
    ("interceptionMode", "TPROXY", "TPROXY is not supported"),
    ("interceptionMode", "redirect", "must be one of"),
    ("excludeInboundPorts", "80,http", "'http' is not a port"),
    ("excludeOutboundPorts", "70000", "'70000' is not a port"),
    ("excludeOutboundIPRanges", "10.0.0.1/8", "has host bits set"),
    ("excludeOutboundIPRanges", "everything", "is not a CIDR"),
    ("proxyCPU", "lots", "not a Kubernetes quantity"),
    ("proxyMemory", "64MB", "not a Kubernetes quantity"),
    ("proxyCPU", "2", "CPU request 2 exceeds its CPU limit 1"),
    ("proxyMemoryLimit", "32Mi", "memory request 64Mi exceeds its memory limit 32Mi"),
    ("proxyImage", "Not An Image", "not an image reference"),
    ("configMap", "Bad_Name", "not a ConfigMap name"),
    ("configKey", "../etc/passwd", "not a ConfigMap key"),
    ("rewriteAppProbers", "no", 'must be "true" or "false"'),
    ("excludeInboundPort", "80", "unknown annotation"),
])
def test_bad_annotations_are_refused_by_name(key, value, message):
    out = inject(with_annotations(replicaset_pod(), **{key: value}), CONFIG)
    assert out.status == REFUSED
    assert f'metadata.annotations["{PREFIX}{key}"]' in out.reason, out.reason
    assert message in out.reason, out.reason


def test_exclusions_without_interception_are_refused():
    out = inject(with_annotations(replicaset_pod(), interceptionMode="NONE",
                                  excludeOutboundPorts="5432"), CONFIG)
    assert out.status == REFUSED and "no effect with interceptionMode NONE" in out.reason


# ---- pods that cannot be patched safely ---------------------------------------------------------

def _refused(pod: dict) -> str:
    out = inject(pod, CONFIG)
    assert out.status == REFUSED, out
    assert out.pod == pod
    return out.reason


def test_refuses_host_network_pods():
    pod = replicaset_pod()
    pod["spec"]["hostNetwork"] = True
    assert "hostNetwork" in _refused(pod)


def test_refuses_windows_pods():
    pod = replicaset_pod()
    pod["spec"]["os"] = {"name": "windows"}
    assert "Windows" in _refused(pod)


def test_refuses_a_foreign_container_with_the_sidecars_name():
    pod = replicaset_pod()
    container(pod, "exporter")["name"] = PROXY_CONTAINER
    assert f"already named '{PROXY_CONTAINER}'" in _refused(pod)
    pod = replicaset_pod()
    pod["spec"]["initContainers"][0]["name"] = INIT_CONTAINER
    assert f"already named '{INIT_CONTAINER}'" in _refused(pod)


def test_refuses_a_hand_written_sidecar():
    pod = replicaset_pod()
    container(pod, "exporter")["image"] = "pysidecar:0.0.9"
    assert "hand-written sidecar" in _refused(pod)


def test_refuses_a_foreign_volume_with_the_sidecars_name():
    pod = replicaset_pod()
    pod["spec"]["volumes"][0]["name"] = STATE_VOLUME
    container(pod, "web")["volumeMounts"][0]["name"] = STATE_VOLUME
    assert f"volume is already named '{STATE_VOLUME}'" in _refused(pod)


@pytest.mark.parametrize("port,what", [(15001, "outbound listener"), (15006, "inbound listener"),
                                       (15020, "probe port"), (9901, "admin port")])
def test_refuses_port_clashes(port, what):
    pod = replicaset_pod()
    container(pod, "exporter")["ports"].append({"containerPort": port, "protocol": "TCP"})
    reason = _refused(pod)
    assert f"declares port {port}, the sidecar's {what}" in reason


def test_refuses_port_name_clashes():
    pod = replicaset_pod()
    container(pod, "web")["ports"][1]["name"] = "sidecar-probes"
    assert "port named 'sidecar-probes'" in _refused(pod)


def test_refuses_apps_running_as_the_proxy_uid_when_intercepting():
    pod = replicaset_pod()
    container(pod, "web")["securityContext"]["runAsUser"] = 1337
    assert "bypass interception" in _refused(pod)
    pod = replicaset_pod()
    pod["spec"]["securityContext"]["runAsUser"] = 1337            # inherited by both
    assert "UID 1337" in _refused(pod)
    # no interception, no bypass: fine
    assert inject(with_annotations(pod, interceptionMode="NONE"), CONFIG).status == INJECTED


def test_refuses_what_is_not_a_pod():
    assert inject({"metadata": {}, "spec": {}}, CONFIG).reason == "no spec.containers"


# ---- the JSONPatch ------------------------------------------------------------------------------

def test_patch_applies_with_jsonpatch_and_only_adds():
    pod = replicaset_pod()
    out = injected(pod)
    ops = json_patch(pod, out.pod)
    assert jsonpatch.apply_patch(pod, ops) == out.pod
    touched = {op["path"].split("/")[1:3][0] + "/" + op["path"].split("/")[2] for op in ops}
    assert touched <= {"metadata/annotations", "spec/volumes", "spec/initContainers",
                       "spec/containers"}
    # the pod's own lists are appended to, never replaced
    assert {op["path"] for op in ops if op["path"].startswith(("/spec/volumes",
                                                               "/spec/initContainers"))} \
        == {"/spec/volumes/-", "/spec/initContainers/-"}


def test_patch_creates_missing_lists_and_annotations():
    pod = replicaset_pod()
    del pod["metadata"]["annotations"]
    del pod["spec"]["initContainers"]
    out = injected(pod)
    ops = json_patch(pod, out.pod)
    assert {"op": "add", "path": "/metadata/annotations",
            "value": out.pod["metadata"]["annotations"]} in ops
    assert jsonpatch.apply_patch(pod, ops) == out.pod


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                     lambda kids: st.lists(kids, max_size=4) |
                     st.dictionaries(st.text(alphabet="ab/~", max_size=3), kids, max_size=4),
                     max_leaves=20)


@hsettings(max_examples=200, deadline=None)
@given(_json, _json)
def test_json_patch_turns_any_document_into_any_other(old, new):
    doc = {"root": old}
    assert jsonpatch.apply_patch(doc, json_patch(doc, {"root": new})) == {"root": new}


# ---- helpers ------------------------------------------------------------------------------------

def test_quantities():
    assert quantity("100m", "x") * 10 == 1
    assert quantity("64Mi", "x") == 64 * 2 ** 20
    assert quantity("1.5", "x") == quantity("1500m", "x")
    assert quantity("1e3", "x") == quantity("1k", "x")
    for bad in ("", "-1", "1.2.3", "10 Mi", "M"):
        with pytest.raises(ConfigError):
            quantity(bad, "x")


def test_injector_config_is_checked():
    InjectorConfig().check()
    for bad in (InjectorConfig(image="bad image!"), InjectorConfig(concurrency=-1),
                InjectorConfig(log_level="loud"), InjectorConfig(config_map="a_b"),
                InjectorConfig(proxy_resources=Resources("2", "1Mi", "1", "1Mi"))):
        with pytest.raises(ConfigError):
            bad.check()


def test_image_repository():
    assert image_repository("pysidecar:0.1.0") == "pysidecar"
    assert image_repository("reg:5000/a/pysidecar") == "reg:5000/a/pysidecar"
    assert image_repository("reg:5000/a/pysidecar:1@sha256:" + "0" * 64) == "reg:5000/a/pysidecar"


def test_carried_probes_parse_back_on_the_sidecar_side():
    p = injected(replicaset_pod()).pod
    probers = probe_rewrite.parse_probers(proxy_env(p)["SIDECAR_APP_PROBERS"])
    ready = probers["/app-health/web/readyz"]
    assert ready.action == probe_rewrite.HttpProbe(port=8080, path="/ready", scheme="HTTP",
                                                   headers=(("X-Probe", "readiness"),))
    assert ready.timeout_s == 2
    assert probers["/app-health/web/startupz"].action == probe_rewrite.TcpProbe(port=8080)


@pytest.mark.parametrize("text,message", [
    ("not json", "not JSON"),
    ("[]", "must be a JSON object"),
    ('{"/x": {}}', "keys must be /app-health/<container>/<kind>"),
    ('{"/app-health/a/livez": {"exec": {}}}', "unknown field(s) exec"),
    ('{"/app-health/a/livez": {"httpGet": {"port": 0}}}', "must be a port number"),
    ('{"/app-health/a/livez": {"httpGet": {"port": 80, "scheme": "FTP"}}}', "HTTP or HTTPS"),
    ('{"/app-health/a/livez": {"tcpSocket": {"port": 80}, "timeoutSeconds": 0}}', "positive"),
    (('{"/app-health/a/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "a\\r\\nb", '
      '"value": ""}]}}}'), "invalid header"),
])
def test_malformed_carried_probes_are_refused(text, message):
    with pytest.raises(ConfigError) as e:
        probe_rewrite.parse_probers(text)
    assert message in str(e.value)


# ---- malformed pods (mutating admission runs before validation) --------------------------------

_PATHS = [("metadata",), ("metadata", "annotations"), ("metadata", "labels"), ("spec",),
          ("spec", "containers"), ("spec", "containers", 0), ("spec", "containers", 0, "name"),
          ("spec", "containers", 0, "ports"), ("spec", "containers", 0, "ports", 0),
          ("spec", "containers", 0, "ports", 0, "containerPort"),
          ("spec", "containers", 0, "livenessProbe"),
          ("spec", "containers", 0, "livenessProbe", "httpGet"),
          ("spec", "containers", 0, "livenessProbe", "httpGet", "port"),
          ("spec", "containers", 0, "securityContext"), ("spec", "initContainers"),
          ("spec", "initContainers", 0), ("spec", "volumes"), ("spec", "volumes", 0),
          ("spec", "securityContext"), ("spec", "os"), ("spec", "hostNetwork")]


@hsettings(max_examples=300, deadline=None)
@given(st.sampled_from(_PATHS), _json)
def test_any_malformed_pod_gets_an_outcome_never_an_exception(path, value):
    pod = replicaset_pod()
    node = pod
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    out = inject(pod, CONFIG)
    assert out.status in (INJECTED, SKIPPED, REFUSED)
    if out.status == INJECTED:
        assert jsonpatch.apply_patch(pod, json_patch(pod, out.pod)) == out.pod


def test_malformed_pods_are_refused_with_the_place():
    pod = replicaset_pod()
    pod["spec"]["initContainers"][0] = {"image": "x"}
    assert inject(pod, CONFIG).reason == "spec.initContainers[0] has no name"
    pod = replicaset_pod()
    pod["metadata"]["annotations"]["a"] = 1
    assert inject(pod, CONFIG).reason == "metadata.annotations is not a map of strings"
