"""The Prometheus operator objects in deploy/kubernetes/monitoring agree with what the
injector gives a pod (port name and number, path) and with the example app; the Service they
need validates offline. (The operator's CRD schemas are not available offline: the objects'
fields are checked against the operator's documented v1 API by hand, below.)"""

from __future__ import annotations

import pytest
import yaml
from k8s_objects import REPO, load_docs, validate

from sidecar.k8s.inject import INJECTED, PROXY_CONTAINER, inject
from sidecar.k8s.settings import METRICS_PORT, InjectorConfig

MONITORING = REPO / "deploy" / "kubernetes" / "monitoring"
EXAMPLE = REPO / "deploy" / "kubernetes" / "injector" / "example-app.yaml"

# the fields these manifests may use, per the operator's monitoring.coreos.com/v1 API
POD_MONITOR_SPEC = {"namespaceSelector", "selector", "jobLabel", "podMetricsEndpoints",
                    "podTargetLabels", "sampleLimit"}
SERVICE_MONITOR_SPEC = {"namespaceSelector", "selector", "jobLabel", "endpoints",
                        "targetLabels", "podTargetLabels", "sampleLimit"}
ENDPOINT = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
            "metricRelabelings", "honorLabels"}
RELABEL = {"action", "sourceLabels", "separator", "targetLabel", "regex", "replacement",
           "modulus"}


def injected_example_pod() -> dict:
    dep = next(d for d in load_docs(EXAMPLE) if d["kind"] == "Deployment")
    out = inject(dep["spec"]["template"], InjectorConfig(), workload=dep["metadata"]["name"])
    assert out.status == INJECTED
    return out.pod


def metrics_port(pod: dict) -> dict:
    proxy = next(c for c in pod["spec"]["initContainers"] if c["name"] == PROXY_CONTAINER)
    return next(p for p in proxy["ports"] if p["containerPort"] == METRICS_PORT)


def test_pod_monitor_scrapes_the_injected_metrics_port():
    (pm,) = load_docs(MONITORING / "podmonitor.yaml")
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert set(pm["spec"]) <= POD_MONITOR_SPEC
    assert pm["spec"]["namespaceSelector"] == {"any": True} and pm["spec"]["selector"] == {}
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) <= ENDPOINT and all(set(r) <= RELABEL for r in ep["relabelings"])
    pod = injected_example_pod()
    assert ep["port"] == metrics_port(pod)["name"] == "http-envoy-prom"
    assert ep["path"] == pod["metadata"]["annotations"]["prometheus.io/path"] == "/stats/prometheus"
    keep = next(r for r in ep["relabelings"] if r.get("action") == "keep")
    assert keep["sourceLabels"] == ["__meta_kubernetes_pod_container_name"]
    assert keep["regex"] == PROXY_CONTAINER


def test_service_monitor_and_its_service_select_the_example_pods():
    svc, sm = load_docs(MONITORING / "servicemonitor.yaml")
    validate(svc)
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert set(sm["spec"]) <= SERVICE_MONITOR_SPEC
    (ep,) = sm["spec"]["endpoints"]
    assert set(ep) <= ENDPOINT
    # the ServiceMonitor selects the Service, the Service the example's pods, in one namespace
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert ep["port"] == port["name"] and ep["path"] == "/stats/prometheus"
    pod = injected_example_pod()
    dep = next(d for d in load_docs(EXAMPLE) if d["kind"] == "Deployment")
    assert svc["metadata"]["namespace"] == dep["metadata"]["namespace"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert port["targetPort"] == metrics_port(pod)["containerPort"]


@pytest.mark.parametrize("path", sorted(MONITORING.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_are_plain_yaml_documents(path):
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
