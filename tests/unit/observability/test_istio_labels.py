"""The labels of Istio's metrics: this pod's workload from the injector's env, peers from their
SPIFFE ID and metadata exchange (trusted only when it agrees with the verified identity),
bounded values, and the recorder's children reused per label combination."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config.cluster import Cluster, Endpoint
from sidecar.config.telemetry import IstioMetrics
from sidecar.config.tls import UpstreamTls
from sidecar.observability.istio import (
    HTTP_LABELS,
    MAX_PEERS,
    TCP_LABELS,
    HttpRecorder,
    IstioFamilies,
    TcpReporter,
    cluster_facts,
    flags_label,
    service_labels,
)
from sidecar.observability.metrics import Metrics
from sidecar.observability.workload import (
    PEER_METADATA,
    PEER_METADATA_ID,
    UNKNOWN,
    Workload,
    WorkloadLabels,
    peer_from_identity,
    peer_from_metadata,
)

ENV = {"POD_NAME": "reviews-v2-7d9f8c6b5d-x2x9z", "POD_NAMESPACE": "shop",
       "SERVICE_ACCOUNT": "reviews", "SIDECAR_APP": "reviews", "SIDECAR_VERSION": "v2"}
REVIEWS = "spiffe://cluster.local/ns/shop/sa/reviews"


def encode(fields: dict) -> str:
    s = struct_pb2.Struct()
    s.update(fields)
    return base64.b64encode(s.SerializeToString()).decode()


def test_workload_from_env_with_istio_defaults():
    w = Workload.from_env(ENV)
    # no SIDECAR_WORKLOAD_NAME: the Deployment's name from the pod's
    assert (w.workload, w.canonical_service, w.canonical_revision) == ("reviews-v2", "reviews", "v2")
    assert w.spiffe_id == REVIEWS
    assert w.default_service() == "reviews.shop.svc.cluster.local"
    empty = Workload.from_env({})
    assert (empty.workload, empty.namespace, empty.spiffe_id, empty.canonical_revision) == \
        (UNKNOWN, UNKNOWN, UNKNOWN, "latest")
    assert empty.default_service() == UNKNOWN


def test_our_metadata_round_trips_through_istios_encoding():
    w = Workload.from_env(ENV)
    (name, value), (id_name, ident) = w.metadata_headers()
    assert (name, id_name) == (PEER_METADATA, PEER_METADATA_ID)
    assert ident == "sidecar~reviews-v2-7d9f8c6b5d-x2x9z.shop~shop.svc.cluster.local"
    peer = peer_from_metadata(value, REVIEWS)
    assert peer == WorkloadLabels("reviews-v2", "shop", REVIEWS, "reviews", "v2", "Kubernetes",
                                  "reviews", "v2")


@pytest.mark.parametrize("header, identity", [
    (encode({"NAMESPACE": "shop", "SERVICE_ACCOUNT": "admin"}), REVIEWS),      # claims another SA
    (encode({"NAMESPACE": "prod", "SERVICE_ACCOUNT": "reviews"}), REVIEWS),    # another namespace
    (encode({"NAMESPACE": "shop", "SERVICE_ACCOUNT": "reviews"}), "spiffe://x/not-k8s"),
    (encode({"NAMESPACE": "shop", "SERVICE_ACCOUNT": "reviews"}), ""),          # no identity
    ("not base64!", REVIEWS),
    (base64.b64encode(b"\xff\xff\xff").decode(), REVIEWS),                     # not a Struct
    ("A" * 5000, REVIEWS),                                                     # too large
])
def test_metadata_that_does_not_agree_or_parse_is_ignored(header, identity):
    assert peer_from_metadata(header, identity) is None


def test_peer_values_are_kubernetes_shaped_or_unknown():
    header = encode({"NAMESPACE": "shop", "SERVICE_ACCOUNT": "reviews",
                     "WORKLOAD_NAME": "x" * 300, "CLUSTER_ID": "bad value\n",
                     "LABELS": {"app": "ok-app", "version": "{}"}})
    peer = peer_from_metadata(header, REVIEWS)
    assert peer is not None
    assert (peer.workload, peer.cluster, peer.app, peer.version) == (UNKNOWN, UNKNOWN, "ok-app", UNKNOWN)
    assert peer.canonical_service == "ok-app" and peer.canonical_revision == "latest"


def test_peer_from_identity():
    assert peer_from_identity(REVIEWS) == WorkloadLabels(namespace="shop", principal=REVIEWS)
    assert peer_from_identity("spiffe://td/other") == WorkloadLabels(principal="spiffe://td/other")
    assert peer_from_identity(None) == WorkloadLabels()


@pytest.mark.parametrize("host, expected", [
    ("reviews.shop.svc.cluster.local", ("reviews.shop.svc.cluster.local", "reviews", "shop")),
    ("reviews.shop.svc", ("reviews.shop.svc", "reviews", "shop")),
    ("api.example.com", ("api.example.com", "api.example.com", UNKNOWN)),
    ("", (UNKNOWN, UNKNOWN, UNKNOWN)),
])
def test_service_labels(host, expected):
    assert service_labels(host).values() == expected


def test_flags_are_bounded():
    assert flags_label([]) == "-"
    assert flags_label(["UF", "URX"]) == "UF,URX"
    assert flags_label(["UF", "made-up"]) == "UF,other"


def samples(m: Metrics, name: str) -> list:
    body, _ = m.render("")
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples
            if s.name == name]


def record(rec: HttpRecorder, peer: WorkloadLabels, status: int = 200, **kw) -> None:
    args = dict(local=WorkloadLabels(workload="me"), peer=peer, service=service_labels("a.b.svc"),
                grpc=False, status=status, grpc_status="", flags=[], mtls=True, duration_s=0.002,
                request_bytes=10, response_bytes=100)
    args.update(kw)
    rec.record(**args)


def test_recorder_labels_and_reuse():
    m = Metrics()
    fam = IstioFamilies(m)
    rec = HttpRecorder(fam, inbound=True)
    peer = WorkloadLabels(workload="caller", namespace="shop")
    for _ in range(3):
        record(rec, peer)
    record(rec, peer, grpc=True, grpc_status="14")
    record(rec, peer, grpc=True, grpc_status="999")
    assert len(rec._children) == 3          # bound once per combination
    rows = {(s.labels["request_protocol"], s.labels["grpc_response_status"]): s.value
            for s in samples(m, "istio_requests_total")}
    assert rows == {("http", ""): 3, ("grpc", "14"): 1, ("grpc", UNKNOWN): 1}
    s = samples(m, "istio_requests_total")[0]
    assert tuple(s.labels) == HTTP_LABELS or set(s.labels) == set(HTTP_LABELS)
    assert (s.labels["reporter"], s.labels["source_workload"], s.labels["destination_workload"],
            s.labels["connection_security_policy"]) == ("destination", "caller", "me", "mutual_tls")
    out = HttpRecorder(fam, inbound=False)
    record(out, peer)
    s = [x for x in samples(m, "istio_requests_total") if x.labels["reporter"] == "source"][0]
    assert (s.labels["source_workload"], s.labels["destination_workload"],
            s.labels["connection_security_policy"]) == ("me", "caller", "unknown")
    ms = samples(m, "istio_request_duration_milliseconds_sum")
    assert ms and all(x.value == pytest.approx(2.0 * (3 if x.labels["request_protocol"] == "http"
                                                      and x.labels["reporter"] == "destination" else 1))
                      for x in ms)


def test_peers_beyond_the_bound_are_unknown():
    m = Metrics()
    fam = IstioFamilies(m)
    rec = HttpRecorder(fam, inbound=True)
    for i in range(MAX_PEERS + 50):
        record(rec, WorkloadLabels(workload=f"w{i}", namespace="shop"))
    workloads = {s.labels["source_workload"] for s in samples(m, "istio_requests_total")}
    assert len(workloads) == MAX_PEERS + 1 and UNKNOWN in workloads


def test_cluster_facts_name_the_destination_service_and_identity():
    tls = UpstreamTls(cert_file="c.pem", key_file="k.pem", match_san_uris=(REVIEWS,))
    f = cluster_facts("outbound|9080||reviews.shop.svc.cluster.local", Cluster("x", tls=tls))
    assert (f.service.values(), f.principal, f.mtls) == (
        ("reviews.shop.svc.cluster.local", "reviews", "shop"), REVIEWS, True)
    dns = Cluster("db", type="strict_dns", endpoints=(Endpoint("db.data.svc.cluster.local", 5432),))
    f = cluster_facts("db", dns)
    assert (f.service.values(), f.principal, f.mtls) == (
        ("db.data.svc.cluster.local", "db", "data"), UNKNOWN, False)
    assert cluster_facts("gone", None).service.values() == ("gone", "gone", UNKNOWN)


def tcp_rows(m: Metrics, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[k] for k in ("reporter", "source_workload", "source_principal",
                                        "destination_workload", "destination_principal",
                                        "destination_service", "response_flags",
                                        "connection_security_policy")): s.value
            for s in samples(m, name)}


def test_tcp_reporter_labels_each_connection_once_and_shares_recorders():
    m = Metrics()
    fam = IstioFamilies(m)
    me = Workload.from_env(ENV)
    inbound = TcpReporter(fam, me, True, IstioMetrics())
    caller = "spiffe://cluster.local/ns/shop/sa/productpage"
    a = inbound.recorder(peer_identity=caller, downstream_tls=True, cluster="local_app",
                         config=None, flags=[])
    assert inbound.recorder(peer_identity=caller, downstream_tls=True, cluster="other",
                            config=None, flags=[]) is a        # same labels: shared children
    a.opened.inc()
    a.received.inc(10)
    plain = inbound.recorder(peer_identity=None, downstream_tls=False, cluster="local_app",
                             config=None, flags=["UF", "URX"])
    plain.opened.inc()
    s = samples(m, "istio_tcp_connections_opened_total")[0]
    assert set(s.labels) == set(TCP_LABELS) and s.labels["request_protocol"] == "tcp"
    assert tcp_rows(m, "istio_tcp_connections_opened_total") == {
        ("destination", UNKNOWN, caller, "reviews-v2", REVIEWS, "reviews.shop.svc.cluster.local",
         "-", "mutual_tls"): 1,
        ("destination", UNKNOWN, UNKNOWN, "reviews-v2", UNKNOWN, "reviews.shop.svc.cluster.local",
         "UF,URX", "none"): 1}
    assert tcp_rows(m, "istio_tcp_received_bytes_total")[
        ("destination", UNKNOWN, caller, "reviews-v2", REVIEWS, "reviews.shop.svc.cluster.local",
         "-", "mutual_tls")] == 10
    # outbound: the destination is the cluster's service and the identity its TLS verifies
    outbound = TcpReporter(fam, me, False, IstioMetrics(service="ignored.outbound"))
    db = "spiffe://cluster.local/ns/data/sa/db"
    cfg = Cluster("outbound|5432||db.data.svc.cluster.local",
                  tls=UpstreamTls(cert_file="c", key_file="k", match_san_uris=(db,)))
    outbound.recorder(peer_identity=caller, downstream_tls=True, cluster=cfg.name, config=cfg,
                      flags=[]).opened.inc()
    assert ("source", "reviews-v2", REVIEWS, UNKNOWN, db, "db.data.svc.cluster.local", "-",
            "unknown") in tcp_rows(m, "istio_tcp_connections_opened_total")
