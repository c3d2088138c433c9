"""Istio standard metrics between two real sidecars (productpage -> reviews over mTLS): both
reporters, Istio's label set from the pods' env and the peers' verified identities, metadata
exchange that never reaches the apps, and forged metadata ignored; and the TCP metrics of real
TCP connections through their tcp_proxy listeners. The scrapes (of the metrics-only
listeners) are parsed with prometheus_client's text parser."""

from __future__ import annotations

import asyncio
import base64
import ssl

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.istio import HTTP_LABELS, TCP_LABELS
from tests.integration.telemetry.mesh import (
    NS,
    PRODUCTPAGE_ID,
    RATINGS_HOST,
    RATINGS_ID,
    REVIEWS_HOST,
    REVIEWS_ID,
    Mesh,
)

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


def tcp_by(fams: dict, family: str) -> dict[tuple, float]:
    """istio_tcp_<family>_total by (reporter, response_flags), with every sample's labels
    checked to be exactly Istio's TCP set."""
    out: dict[tuple, float] = {}
    for s in fams[f"istio_tcp_{family}"].samples:
        if s.name != f"istio_tcp_{family}_total":
            continue
        assert set(s.labels) == set(TCP_LABELS), s
        key = (s.labels["reporter"], s.labels["response_flags"])
        out[key] = out.get(key, 0) + s.value
    return out


def tcp_labels(fams: dict, flags: str = "-") -> dict[str, str]:
    (s,) = [s for s in fams["istio_tcp_connections_opened"].samples
            if s.name.endswith("_total") and s.labels["response_flags"] == flags]
    return s.labels


async def test_tcp_connections_through_both_sidecars(mesh):
    """Real TCP connections, productpage -> reviews over mTLS through the tcp_proxy listeners:
    both reporters count them opened and closed, with the bytes each way, labelled from the
    pods' env and the verified identities; a refused connection is counted with UF,URX."""
    families = ("connections_opened", "connections_closed", "received_bytes", "sent_bytes")

    async def counts() -> tuple[dict, dict, dict]:
        server, client = await scrape(mesh.server_metrics), await scrape(mesh.client_metrics)
        return server, client, {(side_, f): tcp_by(fams, f) for side_, fams in
                                (("server", server), ("client", client)) for f in families}

    async def until(done, what: str) -> tuple[dict, dict, dict]:
        # a close is counted once the proxy has seen both sides closed: wait for it (bounded)
        for _ in range(100):
            got = await counts()
            if done(got[2]):
                return got
            await asyncio.sleep(0.2)
        raise AssertionError(f"{what}: {got[2]}")

    def quiet(c: dict) -> bool:
        return all(c[(s_, "connections_opened")] == c[(s_, "connections_closed")]
                   for s_ in ("server", "client"))

    # the start-up probes (wait_for_port) were connections too: count from when they are done
    # (all closed, and nothing new between two scrapes)
    seen: list[dict] = []

    def settled(c: dict) -> bool:
        seen.append(c)
        return quiet(c) and len(seen) > 1 and seen[-2] == c
    *_, base = await until(settled, "start-up connections never settled")
    for i in range(3):
        assert await mesh.tcp_exchange(b"%d" % i * 1000) == b"%d" % i * 2000
    assert await mesh.tcp_refused() == b""

    def delta(c: dict, side_: str, family: str, key: tuple) -> float:
        return c[(side_, family)].get(key, 0) - base[(side_, family)].get(key, 0)

    server, client, now = await until(
        lambda c: quiet(c) and delta(c, "server", "connections_closed", ("destination", "-")) == 3
        and delta(c, "client", "connections_closed", ("source", "-")) == 3
        and delta(c, "client", "connections_closed", ("source", "UF,URX")) == 1,
        "closes not counted")
    for side_, rep in (("server", "destination"), ("client", "source")):
        assert delta(now, side_, "connections_opened", (rep, "-")) == 3
        assert delta(now, side_, "received_bytes", (rep, "-")) == 3000    # from the downstream
        assert delta(now, side_, "sent_bytes", (rep, "-")) == 6000        # to the downstream
    # the refused connection: opened and closed, no bytes, its flags
    assert delta(now, "client", "connections_opened", ("source", "UF,URX")) == 1
    assert delta(now, "client", "received_bytes", ("source", "UF,URX")) == 0

    service = {"destination_service": REVIEWS_HOST, "destination_service_name": "reviews",
               "destination_service_namespace": NS, "request_protocol": "tcp",
               "response_flags": "-"}
    # reviews' side: the caller is known by its verified identity (no metadata exchange on TCP)
    assert tcp_labels(server) == {
        "reporter": "destination", **side("destination", REVIEWS), **service,
        **side("source", {**{k: "unknown" for k in REVIEWS}, "workload_namespace": NS,
                          "principal": PRODUCTPAGE_ID}),
        "connection_security_policy": "mutual_tls"}
    # productpage's side: the destination from the cluster (Istio's outbound|port||host name)
    # and the identity its TLS verifies
    assert tcp_labels(client) == {
        "reporter": "source", **side("source", PRODUCTPAGE), **service,
        **side("destination", {**{k: "unknown" for k in REVIEWS}, "workload_namespace": NS,
                               "principal": REVIEWS_ID}),
        "connection_security_policy": "unknown"}
    dead = tcp_labels(client, "UF,URX")
    assert (dead["destination_service"], dead["destination_principal"],
            dead["source_principal"]) == ("dead", "unknown", "unknown")      # plain, no mTLS


RATINGS = {"workload": "ratings-v1", "workload_namespace": NS, "principal": RATINGS_ID,
           "app": "ratings", "version": "v1", "cluster": "Kubernetes",
           "canonical_service": "ratings", "canonical_revision": "v1"}


async def test_grpc_through_the_sidecars(mesh):
    """A grpcio client in productpage calls the grpcio ratings service, each app behind its
    injected sidecar (h2c to productpage's sidecar, HTTP/2 over mTLS between the sidecars, h2c
    to the app): both reporters count the calls as gRPC, by grpc-status (from the trailers,
    or the headers of a trailers-only answer), with the peers' workloads."""
    got = [await mesh.grpc_call(b"1") for _ in range(3)] + \
        [await mesh.grpc_call(b"9") for _ in range(2)]
    assert got == [(grpc.StatusCode.OK, b"5 stars")] * 3 + [(grpc.StatusCode.NOT_FOUND, b"")] * 2
    # the app never sees the metadata exchange
    assert len(mesh.grpc_seen) == 5 and not any(
        k.startswith("x-envoy-peer-metadata") for md in mesh.grpc_seen for k in md)
    expected = {**side("source", PRODUCTPAGE), **side("destination", RATINGS),
                "destination_service": RATINGS_HOST, "destination_service_name": "ratings",
                "destination_service_namespace": NS, "request_protocol": "grpc",
                "response_code": "200", "response_flags": "-",
                "connection_security_policy": "mutual_tls"}
    for port, reporter in ((mesh.client_metrics, "source"), (mesh.grpc_metrics, "destination")):
        fams = await scrape(port)
        counts = {}
        for s in fams["istio_requests"].samples:
            if s.name == "istio_requests_total" and s.labels.get("request_protocol") == "grpc":
                for k, v in expected.items():
                    if k == "connection_security_policy" and reporter == "source":
                        continue          # Istio: unknown on the client side
                    assert s.labels[k] == v, (reporter, k, s.labels[k])
                assert s.labels["reporter"] == reporter
                counts[s.labels["grpc_response_status"]] = s.value
        assert counts == {"0": 3.0, "5": 2.0}, (reporter, counts)
