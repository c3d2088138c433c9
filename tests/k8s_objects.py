"""Realistic Kubernetes objects for the injection tests.

``replicaset_pod()`` is a Pod the way the API server hands it to a mutating webhook when a
Deployment's ReplicaSet creates it: ``generateName`` and ``ownerReferences`` set by the
controller, every field defaulted (``terminationMessagePath``, probe timings, ``scheme``,
``protocol``, ``dnsPolicy``, tolerations...), and the ``kube-api-access-*`` projected volume
added by the ServiceAccount admission plugin (which runs before webhooks), but no ``uid`` or
``creationTimestamp`` yet (set after admission). Shapes follow the core/v1 and admission/v1 API
types; ``admission_review()`` wraps a Pod as kube-apiserver sends it.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S_VERSIONS = ("1.30.0", "1.37.0")
API_ACCESS_VOLUME = "kube-api-access-7xk2p"


def _probe(handler: dict, **timing) -> dict:
    base = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1,
            "failureThreshold": 3}
    base.update(timing)
    return {**handler, **base}


def _api_access_mount() -> dict:
    return {"name": API_ACCESS_VOLUME, "readOnly": True,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}


def _container_defaults(c: dict) -> dict:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    c.setdefault("imagePullPolicy", "IfNotPresent")
    c.setdefault("resources", {})
    c.setdefault("volumeMounts", []).append(_api_access_mount())
    return c


def replicaset_pod(namespace: str = "shop") -> dict:
    app = _container_defaults({
        "name": "web",
        "image": "registry.example.com/shop/web:2.4.1",
        "args": ["--listen=0.0.0.0:8080", "--admin=127.0.0.1:9090"],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": 9000, "protocol": "TCP"}],
        "env": [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {
            "name": "web-db", "key": "url"}}}],
        "livenessProbe": _probe({"httpGet": {"path": "/healthz", "port": "http",
                                             "scheme": "HTTP"}}, initialDelaySeconds=5),
        "readinessProbe": _probe({"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP",
                                              "httpHeaders": [{"name": "X-Probe",
                                                               "value": "readiness"}]}},
                                 periodSeconds=5, timeoutSeconds=2),
        "startupProbe": _probe({"tcpSocket": {"port": 8080}}, periodSeconds=2,
                               failureThreshold=30),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                      "limits": {"cpu": "1", "memory": "512Mi"}},
        "volumeMounts": [{"name": "cache", "mountPath": "/var/cache/web"},
                         {"name": "web-config", "mountPath": "/etc/web", "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    })
    exporter = _container_defaults({
        "name": "exporter",
        "image": "registry.example.com/tools/exporter:0.9.0",
        "ports": [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}],
        "livenessProbe": _probe({"exec": {"command": ["/bin/exporter", "--check"]}}),
        "readinessProbe": _probe({"grpc": {"port": 9000, "service": ""}}),
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                      "limits": {"cpu": "100m", "memory": "32Mi"}},
    })
    migrate = _container_defaults({
        "name": "migrate",
        "image": "registry.example.com/shop/web:2.4.1",
        "command": ["/app/migrate", "--wait-for-db"],
        "resources": {},
    })
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d4b9c8f6d-",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6d"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "web-7d4b9c8f6d",
                                 "uid": "3f9a1c52-7a4e-4c1b-9a8e-2b1d7e5c4f10",
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {
            "volumes": [
                {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": "web-config", "configMap": {"name": "web-config", "defaultMode": 420}},
                {"name": API_ACCESS_VOLUME, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt",
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
                        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}},
            ],
            "initContainers": [migrate],
            "containers": [app, exporter],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        },
    }


def deployment(pod: dict | None = None, name: str = "web") -> dict:
    """A Deployment whose template is ``pod``'s metadata and spec (minus what controllers and
    admission add)."""
    pod = copy.deepcopy(pod or replicaset_pod())
    meta = pod["metadata"]
    for k in ("generateName", "ownerReferences", "namespace"):
        meta.pop(k, None)
    meta["labels"].pop("pod-template-hash", None)
    spec = pod["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != API_ACCESS_VOLUME]
    for c in spec["containers"] + spec.get("initContainers", []):
        c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] != API_ACCESS_VOLUME]
        if not c["volumeMounts"]:
            del c["volumeMounts"]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": pod["metadata"].get("namespace", "shop"),
                         "labels": {"app.kubernetes.io/name": name}},
            "spec": {"replicas": 2,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                     "template": {"metadata": meta, "spec": spec}}}


def pod_from_template(template: dict, namespace: str = "shop", name: str = "web") -> dict:
    """What the ReplicaSet controller would create from a (possibly injected) template."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": copy.deepcopy(template["metadata"]),
           "spec": copy.deepcopy(template["spec"])}
    pod["metadata"].update(generateName=f"{name}-5c9d8b7f4-", namespace=namespace)
    pod["metadata"].setdefault("labels", {})["pod-template-hash"] = "5c9d8b7f4"
    pod["metadata"]["ownerReferences"] = [{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-5c9d8b7f4",
        "uid": "0c5f8d0e-2b7a-4c61-9a43-6f1d2e3b4a5c", "controller": True,
        "blockOwnerDeletion": True}]
    return pod


def admission_review(pod: dict, *, namespace: str = "shop", operation: str = "CREATE",
                     dry_run: bool = False, kind: str = "Pod") -> dict:
    gvk = {"group": "", "version": "v1", "kind": kind}
    gvr = {"group": "", "version": "v1", "resource": kind.lower() + "s"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "8c2f3f0e-1d2b-4e9a-a1d4-5f6e7d8c9b0a",
                         "groups": ["system:serviceaccounts",
                                    "system:serviceaccounts:kube-system",
                                    "system:authenticated"]},
            "object": pod,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def example_manifests() -> list[Path]:
    """Every manifest under deploy/kubernetes/ (the injector's folder included)."""
    return sorted((REPO / "deploy" / "kubernetes").rglob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def validate(obj: dict) -> None:
    """Strict offline schema validation for every supported Kubernetes version."""
    import kubernetes_validate as kv  # test extra
    for v in K8S_VERSIONS:
        kv.validate(obj, v, strict=True)
