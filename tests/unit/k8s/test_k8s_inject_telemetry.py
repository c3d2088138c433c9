"""Injection for scraping and Istio metrics: the metrics port and scrape annotations, and the
workload identity (name, app, version, canonical service/revision) the proxy's Istio metrics
are labelled with, worked out as Istio does from the pod's owner and labels."""

from __future__ import annotations

import copy

import pytest
from k8s_objects import deployment, replicaset_pod, validate

from sidecar.k8s.inject import INJECTED, PROXY_CONTAINER, REFUSED, inject, workload_name
from sidecar.k8s.settings import PREFIX, InjectorConfig
from sidecar.observability.workload import Workload

CONFIG = InjectorConfig()


def proxy(pod: dict) -> dict:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == PROXY_CONTAINER)


def env(pod: dict) -> dict:
    return {e["name"]: e.get("value") for e in proxy(pod)["env"] if "value" in e}


def plain_pod(**labels: str) -> dict:
    pod = replicaset_pod()
    pod["metadata"].pop("annotations")
    pod["metadata"]["labels"] = {**labels, "pod-template-hash": "7d4b9c8f6d"}
    return pod


def test_metrics_port_and_scrape_annotations():
    out = inject(plain_pod(app="web"), CONFIG)
    assert out.status == INJECTED and not any("prometheus" in w for w in out.warnings)
    pod = out.pod
    assert {"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"} in proxy(pod)["ports"]
    ann = pod["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == \
        ("true", "15090", "/stats/prometheus")
    validate(pod)


def test_the_apps_own_scrape_annotations_are_kept_with_a_warning():
    pod = replicaset_pod()          # its exporter is scraped on 9100
    out = inject(pod, CONFIG)
    assert out.status == INJECTED
    ann = out.pod["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"]) == ("true", "9100")
    assert "prometheus.io/path" not in ann
    assert any("PodMonitor" in w and "15090" in w for w in out.warnings)


def test_prometheus_scrape_false_adds_no_annotations():
    pod = plain_pod(app="web")
    pod["metadata"]["annotations"] = {PREFIX + "prometheusScrape": "false"}
    out = inject(pod, CONFIG)
    assert not any(k.startswith("prometheus.io/") for k in out.pod["metadata"]["annotations"])
    pod["metadata"]["annotations"] = {PREFIX + "prometheusScrape": "maybe"}
    out = inject(pod, CONFIG)
    assert out.status == REFUSED and f'{PREFIX}prometheusScrape' in out.reason


def test_the_metrics_port_is_the_sidecars():
    pod = plain_pod(app="web")
    pod["spec"]["containers"][0]["ports"].append({"containerPort": 15090, "protocol": "TCP"})
    out = inject(pod, CONFIG)
    assert out.status == REFUSED and "15090, the sidecar's metrics port" in out.reason


@pytest.mark.parametrize("meta, expected", [
    ({"generateName": "web-7d4b9c8f6d-", "labels": {"pod-template-hash": "7d4b9c8f6d"},
      "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d4b9c8f6d", "controller": True}]},
     "web"),
    ({"name": "db-0", "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]},
     "db"),
    ({"generateName": "report-28911460-", "ownerReferences": [
        {"kind": "Job", "name": "report-28911460", "controller": True}]}, "report"),
    ({"generateName": "migrate-", "ownerReferences": [
        {"kind": "Job", "name": "migrate", "controller": True}]}, "migrate"),
    ({"name": "debug"}, "debug"),
    # admission before the ReplicaSet's ownerReference is visible: the hash still comes off
    ({"generateName": "web-7d4b9c8f6d-", "labels": {"pod-template-hash": "7d4b9c8f6d"}}, "web"),
    ({"generateName": "x-"}, "x"),
    ({}, "unknown"),
    # a non-controller owner is not the workload
    ({"name": "p", "ownerReferences": [{"kind": "Node", "name": "n1"}]}, "p"),
])
def test_workload_name_as_istio_works_it_out(meta, expected):
    assert workload_name(meta) == expected


@pytest.mark.parametrize("labels, expected", [
    ({"app": "reviews", "version": "v2"},
     {"SIDECAR_APP": "reviews", "SIDECAR_VERSION": "v2", "SIDECAR_CANONICAL_SERVICE": "reviews",
      "SIDECAR_CANONICAL_REVISION": "v2"}),
    ({"app.kubernetes.io/name": "web", "app.kubernetes.io/version": "2.4.1"},
     {"SIDECAR_APP": "web", "SIDECAR_VERSION": "2.4.1", "SIDECAR_CANONICAL_SERVICE": "web",
      "SIDECAR_CANONICAL_REVISION": "2.4.1"}),
    ({"app": "reviews", "service.istio.io/canonical-name": "reviews-svc",
      "service.istio.io/canonical-revision": "blue"},
     {"SIDECAR_APP": "reviews", "SIDECAR_CANONICAL_SERVICE": "reviews-svc",
      "SIDECAR_CANONICAL_REVISION": "blue"}),
    ({}, {"SIDECAR_CANONICAL_SERVICE": "web", "SIDECAR_CANONICAL_REVISION": "latest"}),
])
def test_workload_labels_reach_the_proxy_env(labels, expected):
    pod = inject(plain_pod(**labels), CONFIG).pod
    got = {k: v for k, v in env(pod).items() if k.startswith("SIDECAR_") and k not in
           ("SIDECAR_ADMIN_PORT", "SIDECAR_PROBE_PORT", "SIDECAR_APP_PROBERS")}
    assert got == {"SIDECAR_WORKLOAD_NAME": "web", **expected}
    # and the proxy reads them back as the same identity
    w = Workload.from_env({**got, "POD_NAME": "web-7d4b9c8f6d-abcde", "POD_NAMESPACE": "shop",
                           "SERVICE_ACCOUNT": "web"})
    assert (w.workload, w.canonical_service, w.canonical_revision) == \
        ("web", expected["SIDECAR_CANONICAL_SERVICE"], expected["SIDECAR_CANONICAL_REVISION"])
    assert w.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"


def test_offline_template_and_webhook_pod_get_the_same_identity():
    dep = deployment(plain_pod(app="web", version="v1"))
    tpl = inject(copy.deepcopy(dep["spec"]["template"]), CONFIG, workload="web").pod
    pod = inject(plain_pod(app="web", version="v1"), CONFIG).pod
    assert env(tpl) == env(pod)
