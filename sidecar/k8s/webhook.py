"""The mutating admission webhook: ``sidecar inject serve --cert --key --port``.

An HTTPS server (aiohttp) answering ``admission.k8s.io/v1`` AdmissionReview requests on
``POST /inject`` with a base64 JSONPatch (RFC 6902) that injects the sidecar; ``GET /healthz``
for its own probes.

Selection. The API server calls the webhook only for pods the MutatingWebhookConfiguration
selects (deploy/kubernetes/injector/webhook.yaml): pods in namespaces labelled
``pysidecar-injection: enabled`` (namespaceSelector) unless the pod is labelled
``sidecar.pysidecar.io/inject: "false"``, and pods labelled ``sidecar.pysidecar.io/inject:
"true"`` in other namespaces (objectSelector; the API server cannot select on annotations).
Here, the pod's own label or annotation ``sidecar.pysidecar.io/inject: "false"`` opts out
(no patch); anything else called in is injected. The webhook never sees namespace labels.

Answers (always HTTP 200 with an AdmissionReview, unless the request is not one: 400):

* injected: ``allowed: true`` and the patch (warnings for probes left as they were);
* skipped (opted out, already injected, not a Pod CREATE): ``allowed: true``, no patch;
* refused (cannot be patched safely, bad annotation): ``allowed: true`` with a warning
  ``pysidecar: sidecar not injected: <reason>`` (kubectl prints it), or with ``--fail-closed``
  ``allowed: false`` and the reason, so no pod runs outside the mesh by accident.

``dryRun`` requests (``kubectl apply --dry-run=server``) get the very same answer, so the
preview shows the injected pod; the webhook has no side effects to skip (sideEffects: None),
and logs them as dry runs.

The certificate and key files are re-read when they change (cert-manager renews the Secret and
the kubelet updates the mounted files): new connections use the new certificate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl

from aiohttp import web

from sidecar.k8s.inject import INJECTED, REFUSED, Outcome, inject, json_patch
from sidecar.k8s.settings import InjectorConfig

log = logging.getLogger("sidecar.k8s.webhook")

API_VERSION = "admission.k8s.io/v1"
WARNING_PREFIX = "pysidecar: "
MAX_BODY = 8 * 1024 * 1024        # a Pod is at most ~1.5 MiB in etcd; reviews carry it twice
CERT_CHECK_INTERVAL_S = 10.0


class BadReview(Exception):
    """The body is not an admission.k8s.io/v1 AdmissionReview request."""


def _answer(uid: str, *, allowed: bool = True, patch: list | None = None,
            warnings: tuple[str, ...] | list[str] = (), message: str = "") -> dict:
    response: dict = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(patch, separators=(",", ":")).encode()).decode("ascii")
    if warnings:
        response["warnings"] = [WARNING_PREFIX + w for w in warnings]
    if not allowed:
        response["status"] = {"status": "Failure", "code": 403, "reason": "Forbidden",
                              "message": message}
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def review_response(review: object, config: InjectorConfig) -> dict:
    """An AdmissionReview request -> the AdmissionReview response. Pure."""
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise BadReview("not an AdmissionReview")
    if review.get("apiVersion") != API_VERSION:
        raise BadReview(f"apiVersion {review.get('apiVersion')!r}: only {API_VERSION} is "
                        f"served (admissionReviewVersions: [v1])")
    req = review.get("request")
    if not isinstance(req, dict) or not isinstance(req.get("uid"), str) or not req["uid"]:
        raise BadReview("request.uid missing")
    uid = req["uid"]
    raw_kind = req.get("kind")
    kind: dict = raw_kind if isinstance(raw_kind, dict) else {}
    if (kind.get("group"), kind.get("kind")) != ("", "Pod") or req.get("subResource") \
            or req.get("operation") != "CREATE":
        return _answer(uid)       # not ours to mutate: let it through untouched
    pod = req.get("object")
    if not isinstance(pod, dict):
        raise BadReview("request.object missing for a Pod CREATE")
    dry = bool(req.get("dryRun"))
    raw_meta = pod.get("metadata")
    meta: dict = raw_meta if isinstance(raw_meta, dict) else {}
    name = meta.get("name") or f"{meta.get('generateName', '')}*"
    where = f"{req.get('namespace') or meta.get('namespace') or '?'}/{name}"
    try:
        outcome = inject(pod, config)
    except Exception as e:      # a bug must not become an opaque HTTP 500 for the API server
        log.exception("%s pod %s: injection failed", uid, where)
        outcome = Outcome(REFUSED, pod, f"internal error ({type(e).__name__}); see the "
                                        f"injector's log")
    log.info("%s%s pod %s: %s%s", "dry run: " if dry else "", uid, where, outcome.status,
             f" ({outcome.reason})" if outcome.reason else "")
    if outcome.status == INJECTED:
        return _answer(uid, patch=json_patch(pod, outcome.pod), warnings=outcome.warnings)
    if outcome.status == REFUSED:
        if config.fail_closed:
            return _answer(uid, allowed=False,
                           message=f"pysidecar: cannot inject the sidecar: {outcome.reason}")
        return _answer(uid, warnings=[f"sidecar not injected: {outcome.reason}"])
    return _answer(uid)


def make_app(config: InjectorConfig) -> web.Application:
    async def admit(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            answer = review_response(body, config)
        except (ValueError, BadReview) as e:
            log.warning("bad admission request from %s: %s", request.remote, e)
            return web.Response(status=400, text=f"{e}\n")
        return web.json_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/inject", admit)
    app.router.add_get("/healthz", healthz)
    return app


class CertReloader:
    """One server SSLContext whose certificate follows the files (new handshakes only)."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp = self._mtimes()
        self.context.load_cert_chain(cert, key)    # errors here stop the start: bad files
        self.reloads = 0

    def _mtimes(self) -> tuple:
        return tuple(os.stat(p).st_mtime_ns for p in (self.cert, self.key))

    def check(self) -> bool:
        """Reload if the files changed; a half-written pair is retried at the next check."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            log.warning("certificate %s / %s not reloaded (kept the previous one): %s",
                        self.cert, self.key, e)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("certificate reloaded from %s", self.cert)
        return True


class WebhookServer:
    def __init__(self, config: InjectorConfig, cert: str, key: str, *, host: str = "0.0.0.0",
                 port: int = 8443, cert_check_interval_s: float = CERT_CHECK_INTERVAL_S):
        self.config = config
        self.certs = CertReloader(cert, key)
        self.host, self.port = host, port
        self.interval = cert_check_interval_s
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        self._runner = web.AppRunner(make_app(self.config), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.certs.context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self.port

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.certs.check()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
