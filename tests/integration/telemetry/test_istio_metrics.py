"""Istio standard metrics between two real sidecars (productpage -> reviews over mTLS): both
reporters, Istio's label set from the pods' env and the peers' verified identities, metadata
exchange that never reaches the apps, and forged metadata ignored. The scrapes are parsed with
prometheus_client's text parser."""

from __future__ import annotations

import base64
import ssl

import aiohttp
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.istio import HTTP_LABELS
from tests.integration.telemetry.mesh import NS, PRODUCTPAGE_ID, REVIEWS_HOST, REVIEWS_ID, Mesh

ISTIO_HTTP = ("istio_requests", "istio_request_duration_milliseconds", "istio_request_bytes",
              "istio_response_bytes")


@pytest.fixture
async def mesh(tmp_path):
    m = await Mesh(str(tmp_path)).start()
    try:
        yield m
    finally:
        await m.stop()


async def scrape(port: int) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/stats/prometheus") as r:
        assert r.status == 200
        return {f.name: f for f in text_string_to_metric_families(await r.text())}


def requests_by(fams: dict, **match: str) -> dict[tuple, float]:
    out = {}
    for s in fams["istio_requests"].samples:
        if s.name == "istio_requests_total" and all(s.labels.get(k) == v for k, v in match.items()):
            out[(s.labels["response_code"], s.labels["reporter"])] = s.value
    return out


PRODUCTPAGE = {"workload": "productpage-v1", "workload_namespace": NS, "principal": PRODUCTPAGE_ID,
               "app": "productpage", "version": "v1", "cluster": "Kubernetes",
               "canonical_service": "productpage", "canonical_revision": "v1"}
REVIEWS = {"workload": "reviews-v2", "workload_namespace": NS, "principal": REVIEWS_ID,
           "app": "reviews", "version": "v2", "cluster": "Kubernetes",
           "canonical_service": "reviews", "canonical_revision": "v2"}


def side(prefix: str, labels: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in labels.items()}


async def test_both_reporters_label_the_same_requests(mesh):
    async with aiohttp.ClientSession() as s:
        for path, n in (("/reviews/1", 5), ("/missing", 2), ("/fail", 1)):
            for _ in range(n):
                async with s.post(f"http://127.0.0.1:{mesh.outbound_port}{path}", data=b"x" * 10,
                                  headers={"host": "reviews"}) as r:
                    await r.read()
                    assert not any(h.lower().startswith("x-envoy-peer-metadata") for h in r.headers)
    # the apps never see the exchange
    assert mesh.seen_headers and not any(
        k.lower().startswith("x-envoy-peer-metadata") for h in mesh.seen_headers for k in h)

    common = {**side("source", PRODUCTPAGE), **side("destination", REVIEWS),
              "destination_service": REVIEWS_HOST, "destination_service_name": "reviews",
              "destination_service_namespace": NS, "request_protocol": "http",
              "grpc_response_status": "", "response_flags": "-"}
    server, client = await scrape(mesh.server_metrics), await scrape(mesh.client_metrics)
    for fams in (server, client):
        assert {n for n in ISTIO_HTTP} <= set(fams)
        for name in ISTIO_HTTP:
            for sample in fams[name].samples:
                assert set(sample.labels) - {"le"} == set(HTTP_LABELS), sample
    got = requests_by(server, connection_security_policy="mutual_tls", **common)
    assert got == {("200", "destination"): 5, ("404", "destination"): 2, ("503", "destination"): 1}
    got = requests_by(client, connection_security_policy="unknown", **common)
    assert got == {("200", "source"): 5, ("404", "source"): 2, ("503", "source"): 1}

    # sizes and durations: 8 requests of 10 body bytes; 5 responses of 110, 2 of 14, 1 of 10
    for fams in (server, client):
        def total(name, fams=fams):
            family = name.rsplit("_", 1)[0]
            return sum(s.value for s in fams[family].samples if s.name == name)
        assert total("istio_request_bytes_count") == 8
        assert total("istio_request_bytes_sum") == 80
        assert total("istio_response_bytes_sum") == 5 * 110 + 2 * len("no such review") + len("overloaded")
        assert total("istio_request_duration_milliseconds_count") == 8
        assert total("istio_request_duration_milliseconds_sum") > 0


def forged_metadata(ns: str, sa: str, workload: str) -> str:
    s = struct_pb2.Struct()
    s.update({"NAMESPACE": ns, "SERVICE_ACCOUNT": sa, "WORKLOAD_NAME": workload,
              "LABELS": {"app": workload}})
    return base64.b64encode(s.SerializeToString()).decode()


async def test_metadata_must_agree_with_the_verified_identity(mesh):
    """A client with the intruder's certificate claims to be productpage: its claim is ignored
    (labelled from its certificate only), and it gets no metadata back for a bogus header."""
    ctx = ssl.create_default_context(cafile=mesh.pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(mesh.pki["intruder"], mesh.pki["intruder-key"])
    url = f"https://127.0.0.1:{mesh.inbound_port}/reviews/9"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, ssl=ctx, headers={
                "x-envoy-peer-metadata": forged_metadata(NS, "productpage", "productpage-v1"),
                "x-envoy-peer-metadata-id": "sidecar~x"}) as r:
            assert r.status == 200
            assert "x-envoy-peer-metadata" in r.headers      # a mesh peer gets ours
        async with s.get(url, ssl=ctx, headers={"x-envoy-peer-metadata": "%%% not base64"}) as r:
            assert r.status == 200
        async with s.get(url, ssl=ctx) as r:               # no metadata sent: none returned
            assert r.status == 200 and "x-envoy-peer-metadata" not in r.headers
        async with s.get(url, ssl=ctx, headers={
                "x-envoy-peer-metadata": forged_metadata(NS, "intruder", "intruder-v9")}) as r:
            assert r.status == 200
    fams = await scrape(mesh.server_metrics)
    rows = {(s.labels["source_workload"], s.labels["source_principal"]): s.value
            for s in fams["istio_requests"].samples if s.name == "istio_requests_total"}
    intruder = f"spiffe://cluster.local/ns/{NS}/sa/intruder"
    assert rows == {("unknown", intruder): 3, ("intruder-v9", intruder): 1}
    assert not any(k.lower().startswith("x-envoy-peer") for h in mesh.seen_headers for k in h)
