"""The injection webhook served over real HTTPS on loopback, called the way kube-apiserver
calls it (AdmissionReview v1 POSTed to /inject, the server certificate verified against the
caBundle for the Service's DNS name), its JSONPatch applied with the `jsonpatch` package, the
patched pods validated offline against the Kubernetes schemas and compared with what the
offline `sidecar inject -f` makes of the same input."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import jsonpatch
import pytest
import yaml
from k8s_objects import (
    REPO,
    admission_review,
    deployment,
    pod_from_template,
    replicaset_pod,
    validate,
)

from sidecar.cli.certs import DevCA
from sidecar.k8s.settings import PREFIX, InjectorConfig
from sidecar.k8s.webhook import WebhookServer
from sidecar.testing import free_port

SERVICE_DNS = "pysidecar-injector.mesh-system.svc"
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def certs(tmp_path):
    ca = DevCA.create()
    ca_path, _ = ca.write(str(tmp_path / "ca"))
    cert, key = ca.issue("mesh-system", "pysidecar-injector", dns=[SERVICE_DNS]).write(
        str(tmp_path), "injector")
    return {"ca": ca, "ca_path": ca_path, "cert": cert, "key": key}


def client_ssl(ca_path: str) -> ssl.SSLContext:
    """What kube-apiserver does with the caBundle: verify the chain and the Service name."""
    return ssl.create_default_context(cafile=ca_path)


async def post(port: int, ca_path: str, body: bytes | dict | list):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, \
            s.post(f"https://127.0.0.1:{port}/inject?timeout=5s", data=data,
                   headers={"Content-Type": "application/json"},
                   ssl=client_ssl(ca_path), server_hostname=SERVICE_DNS) as r:
        return r.status, (await r.json() if r.status == 200 else await r.text())


async def healthz(port: int, ca_path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, \
            s.get(f"https://127.0.0.1:{port}/healthz", ssl=client_ssl(ca_path),
                  server_hostname=SERVICE_DNS) as r:
        return r.status, await r.text()


@pytest.fixture
async def webhook(certs):
    servers = []

    async def start(config: InjectorConfig | None = None, **kw) -> WebhookServer:
        server = WebhookServer(config or InjectorConfig(), certs["cert"], certs["key"], host="127.0.0.1", port=0,
                               **kw)
        await server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.close()


def apply(pod: dict, answer: dict) -> dict:
    resp = answer["response"]
    assert resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    return jsonpatch.JsonPatch(ops).apply(pod)


def offline(obj: dict, *args: str) -> dict:
    cp = subprocess.run([sys.executable, "-m", "sidecar", "inject", "-f", "-", *args],
                        input=yaml.safe_dump(obj), capture_output=True, text=True, timeout=60, check=False,
                        env=ENV, cwd=REPO)
    assert cp.returncode == 0, cp.stderr
    return yaml.safe_load(cp.stdout)


# ---- injection -----------------------------------------------------------------------------------

async def test_webhook_injects_and_matches_the_offline_command(webhook, certs):
    server = await webhook()
    pod = replicaset_pod()
    review = admission_review(pod)
    status, answer = await post(server.port, certs["ca_path"], review)
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    resp = answer["response"]
    assert resp["uid"] == review["request"]["uid"] and resp["allowed"] is True
    assert any("gRPC probe" in w for w in resp["warnings"])
    patched = apply(pod, answer)
    validate(patched)
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    assert names == ["migrate", "pysidecar-init", "pysidecar-proxy"]
    # the webhook and `sidecar inject -f` make the same pod of the same input
    assert patched == offline(pod)


async def test_webhook_and_offline_agree_on_annotated_pods_too(webhook, certs):
    server = await webhook()
    pod = replicaset_pod()
    pod["metadata"]["annotations"].update({
        PREFIX + "excludeOutboundIPRanges": "10.96.0.0/12", PREFIX + "concurrency": "2",
        PREFIX + "proxyMemoryLimit": "256Mi", PREFIX + "interceptionMode": "REDIRECT"})
    _, answer = await post(server.port, certs["ca_path"], admission_review(pod))
    patched = apply(pod, answer)
    validate(patched)
    assert patched == offline(pod)


async def test_pods_of_an_offline_injected_deployment_are_left_alone(webhook, certs):
    """GitOps: the Deployment was injected offline; the pods its ReplicaSet creates reach the
    webhook already injected, and come out unchanged."""
    server = await webhook()
    injected_dep = offline(deployment())
    pod = pod_from_template(injected_dep["spec"]["template"])
    _, answer = await post(server.port, certs["ca_path"], admission_review(pod))
    assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}
    validate(pod)
    # ...and a pod of the plain Deployment gets from the webhook what offline put in the template
    plain = pod_from_template(deployment()["spec"]["template"])
    _, answer = await post(server.port, certs["ca_path"], admission_review(plain))
    assert apply(plain, answer)["spec"] == pod["spec"]


async def test_injecting_twice_through_the_webhook_changes_nothing(webhook, certs):
    server = await webhook()
    pod = replicaset_pod()
    _, answer = await post(server.port, certs["ca_path"], admission_review(pod))
    once = apply(pod, answer)
    _, again = await post(server.port, certs["ca_path"], admission_review(once))
    assert "patch" not in again["response"] and again["response"]["allowed"] is True


async def test_dry_run_gets_the_same_patch(webhook, certs):
    server = await webhook()
    pod = replicaset_pod()
    _, real = await post(server.port, certs["ca_path"], admission_review(pod))
    dry_review = admission_review(pod, dry_run=True)
    _, dry = await post(server.port, certs["ca_path"], dry_review)
    assert dry["response"]["uid"] == dry_review["request"]["uid"]
    assert dry["response"]["patch"] == real["response"]["patch"]


# ---- selection and refusals ----------------------------------------------------------------------

async def test_opted_out_pods_get_no_patch(webhook, certs):
    server = await webhook()
    pod = replicaset_pod()
    pod["metadata"]["annotations"][PREFIX + "inject"] = "false"
    _, answer = await post(server.port, certs["ca_path"], admission_review(pod))
    assert answer["response"] == {"uid": answer["response"]["uid"], "allowed": True}


async def test_refused_pods_are_admitted_with_a_warning_or_denied_fail_closed(webhook, certs):
    pod = replicaset_pod()
    pod["spec"]["hostNetwork"] = True
    open_server = await webhook()
    _, answer = await post(open_server.port, certs["ca_path"], admission_review(pod))
    resp = answer["response"]
    assert resp["allowed"] is True and "patch" not in resp
    assert resp["warnings"] == [("pysidecar: sidecar not injected: hostNetwork pod: it shares "
                                 "the node's network namespace, where interception rules and "
                                 "the sidecar's ports would affect the whole node")]
    closed = await webhook(InjectorConfig(fail_closed=True))
    _, answer = await post(closed.port, certs["ca_path"], admission_review(pod))
    resp = answer["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert resp["status"]["code"] == 403
    assert resp["status"]["message"].startswith("pysidecar: cannot inject the sidecar: hostNetwork")
    # a bad annotation is a refusal too, named
    pod = replicaset_pod()
    pod["metadata"]["annotations"][PREFIX + "concurrency"] = "many"
    _, answer = await post(closed.port, certs["ca_path"], admission_review(pod))
    assert f'{PREFIX}concurrency' in answer["response"]["status"]["message"]
    # fail-closed still lets opted-out pods through
    pod["metadata"]["annotations"][PREFIX + "inject"] = "false"
    _, answer = await post(closed.port, certs["ca_path"], admission_review(pod))
    assert answer["response"]["allowed"] is True


async def test_what_is_not_a_pod_create_passes_untouched(webhook, certs):
    server = await webhook()
    pod = replicaset_pod()
    for review in (admission_review(pod, operation="UPDATE"),
                   admission_review({"metadata": {"name": "x"}, "data": {}}, kind="ConfigMap")):
        _, answer = await post(server.port, certs["ca_path"], review)
        assert answer["response"] == {"uid": review["request"]["uid"], "allowed": True}
    review = admission_review(pod)
    review["request"]["subResource"] = "ephemeralcontainers"
    _, answer = await post(server.port, certs["ca_path"], review)
    assert "patch" not in answer["response"]


async def test_malformed_requests_get_400(webhook, certs):
    server = await webhook()
    review = admission_review(replicaset_pod())
    old = dict(review, apiVersion="admission.k8s.io/v1beta1")
    no_uid = json.loads(json.dumps(review))
    del no_uid["request"]["uid"]
    no_obj = json.loads(json.dumps(review))
    del no_obj["request"]["object"]
    for body, message in ((b"{not json", "Expecting"), (old, "only admission.k8s.io/v1"),
                          (no_uid, "request.uid missing"), ([1, 2], "not an AdmissionReview"),
                          (no_obj, "request.object missing")):
        status, text = await post(server.port, certs["ca_path"], body)
        assert status == 400 and message in text, (body, text)
    # and the server still answers well-formed requests
    status, _ = await post(server.port, certs["ca_path"], review)
    assert status == 200


# ---- TLS -----------------------------------------------------------------------------------------

async def test_tls_is_verified_like_the_api_server_does(webhook, certs, tmp_path):
    server = await webhook()
    assert await healthz(server.port, certs["ca_path"]) == (200, "ok\n")
    other_ca, _ = DevCA.create().write(str(tmp_path / "other"))
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with aiohttp.ClientSession() as s:
            await s.get(f"https://127.0.0.1:{server.port}/healthz", ssl=client_ssl(other_ca),
                        server_hostname=SERVICE_DNS)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with aiohttp.ClientSession() as s:       # a name the certificate does not carry
            await s.get(f"https://127.0.0.1:{server.port}/healthz",
                        ssl=client_ssl(certs["ca_path"]), server_hostname="evil.example")


async def _served_serial(port: int, ca_path: str) -> int:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl(ca_path),
                                                   server_hostname=SERVICE_DNS)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_renewed_certificate_is_served_to_new_connections(webhook, certs):
    server = await webhook(cert_check_interval_s=0.05)
    first = await _served_serial(server.port, certs["ca_path"])
    renewed = certs["ca"].issue("mesh-system", "pysidecar-injector", dns=[SERVICE_DNS])
    renewed.write(os.path.dirname(certs["cert"]), "injector")      # as the kubelet swaps files
    for _ in range(200):
        if server.certs.reloads:
            break
        await asyncio.sleep(0.05)
    assert server.certs.reloads == 1
    second = await _served_serial(server.port, certs["ca_path"])
    assert second != first
    from cryptography import x509
    assert second == x509.load_pem_x509_certificate(renewed.cert_pem).serial_number
    # a broken pair (half-written) keeps the current certificate
    Path(certs["key"]).write_text("not a key")
    assert server.certs.check() is False
    assert await _served_serial(server.port, certs["ca_path"]) == second


# ---- the command ---------------------------------------------------------------------------------

async def test_inject_serve_command(certs):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "inject", "serve", "--cert", certs["cert"], "--key",
        certs["key"], "--port", str(port), "--address", "127.0.0.1", "--image",
        "registry.example.com/pysidecar:0.2.0", env=ENV, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                assert await healthz(port, certs["ca_path"]) == (200, "ok\n")
                break
            except aiohttp.ClientConnectionError:
                assert proc.returncode is None
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the webhook never answered /healthz")
        pod = replicaset_pod()
        _, answer = await post(port, certs["ca_path"], admission_review(pod))
        patched = apply(pod, answer)
        assert patched == offline(pod, "--image", "registry.example.com/pysidecar:0.2.0")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        out = (await proc.stdout.read()).decode()
        assert "injection webhook on https://127.0.0.1:" in out
        assert "pod shop/web-7d4b9c8f6d-*: injected" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_documented_sidecar_certs_step_gives_a_serving_certificate(tmp_path):
    """The `sidecar certs` commands of docs/deploy.md, run as written: the certificate they
    make serves the webhook for the Service name the API server uses."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    commands, buf = [], ""
    for line in doc.splitlines():
        line = line.strip()
        if buf or line.startswith("sidecar certs "):
            buf += line.rstrip("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(buf.split())
                buf = ""
    assert [c[:3] for c in commands] == [["sidecar", "certs", "ca"], ["sidecar", "certs", "issue"]]
    for argv in commands:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *argv, cwd=str(tmp_path), env=ENV,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()
    certs_dir = tmp_path / "injector-certs"
    server = WebhookServer(InjectorConfig(), str(certs_dir / "pysidecar-injector.pem"),
                           str(certs_dir / "pysidecar-injector-key.pem"), host="127.0.0.1",
                           port=0)
    port = await server.start()
    try:
        assert await healthz(port, str(certs_dir / "ca.pem")) == (200, "ok\n")
    finally:
        await server.close()
