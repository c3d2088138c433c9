"""Shared helpers for the security filter tests: keys (cryptography), tokens (PyJWT), requests
built directly for unit-level filter calls, and a ``next`` that records whether it ran."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from multidict import MultiDict

from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response
from sidecar.observability.metrics import Metrics
from sidecar.testing import FakeRoute, FilterTestEnv

ISSUER = "https://issuer.test"
AUDIENCE = "api"
HS_SECRET = "0123456789abcdef0123456789abcdef-hs-secret"   # 43 bytes: HS256 only


@functools.cache
def rsa_key(name: str = "a") -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(name: str = "a") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def ed_key(name: str = "a") -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: Any, kid: str | None, alg: str | None = None) -> dict:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        d = json.loads(RSAAlgorithm.to_jwk(pub))
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        d = json.loads(ECAlgorithm.to_jwk(pub))
    else:
        d = json.loads(OKPAlgorithm.to_jwk(pub))
    if kid is not None:
        d["kid"] = kid
    if alg is not None:
        d["alg"] = alg
    d["use"] = "sig"
    return d


def jwks(*entries: dict) -> dict:
    return {"keys": list(entries)}


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(**kw: Any) -> dict:
    now = int(time.time())
    c = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3600}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def mint(key: Any = None, alg: str = "RS256", kid: str | None = "k1",
         headers: dict | None = None, **claim_kw: Any) -> str:
    """A token signed by PyJWT (``key`` defaults to rsa_key('a'))."""
    if key is None:
        key = rsa_key("a")
    h = dict(headers or {})
    if kid is not None:
        h["kid"] = kid
    return jwt.encode(claims(**claim_kw), key, algorithm=alg, headers=h)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict, payload: dict, signature: bytes = b"sig") -> str:
    """A hand-assembled token (for attacks PyJWT refuses to produce)."""
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()),
                     b64(signature)))


def hs_confusion_token(public_pem_bytes: bytes, kid: str = "k1", **claim_kw: Any) -> str:
    """The classic key-confusion attack: HS256 with the RSA *public key* PEM as the secret."""
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    p = b64(json.dumps(claims(**claim_kw)).encode())
    sig = hmac.new(public_pem_bytes, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"


# ---- requests --------------------------------------------------------------------------------

def make_request(path: str = "/api/x", *, method: str = "GET", query: str = "",
                 headers: dict | list | None = None, token: str | None = None,
                 peer: str | None = None, client_ip: str = "127.0.0.1",
                 host: str = "svc.local") -> Request:
    h = MultiDict()
    h["host"] = host
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    for k, v in items:
        h.add(k.lower(), v)
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    ctx = RequestContext("test", (client_ip, 40000), time.monotonic())
    ctx.peer_identity = peer
    return Request(method, path, query, h, b"", ctx)


class Next:
    """The rest of the chain: records the request it received and answers 200."""

    def __init__(self, status: int = 200):
        self.calls: list[Request] = []
        self.status = status

    async def __call__(self, req: Request) -> Response:
        self.calls.append(req)
        return Response(self.status, MultiDict({"content-type": "text/plain"}), b"ok")

    @property
    def called(self) -> bool:
        return bool(self.calls)

    @property
    def last(self) -> Request:
        return self.calls[-1]


def runtime(metrics: Metrics | None = None) -> FilterTestEnv:
    return FilterTestEnv(metrics)


def metric(rt: FilterTestEnv, name: str, **labels: str) -> float:
    return rt.metric(name, **labels)


RouteInfo = FakeRoute
