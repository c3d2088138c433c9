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

from filters import jwt_authn as J
from filters.jwt_authn import status as S
from filters.jwt_authn.config import JwtAuthnConfig
from sidecar.core.context import RequestContext
from sidecar.core.message import Request, Response
from sidecar.observability.metrics import Metrics
from sidecar.testing import FakeRoute, FilterTestEnv, build_filter

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


def runtime(metrics: Metrics | None = None, clusters: dict | None = None) -> FilterTestEnv:
    """A filter environment; ``clusters`` (name -> ["host:port"]) are real clusters."""
    return FilterTestEnv(metrics, clusters)


def metric(rt: FilterTestEnv, name: str, **labels: str) -> float:
    return rt.metric(name, **labels)


RouteInfo = FakeRoute


# ---- jwt_authn filters built directly -------------------------------------------------------

def native(providers: dict, rules=None, **kw) -> JwtAuthnConfig:
    d = {"providers": providers}
    if rules is not None:
        d["rules"] = rules
    d.update(kw)
    return J.SPEC.from_native(d, "jwt_authn")


def rsa_provider(**kw) -> dict:
    p = {"issuer": ISSUER, "audiences": [AUDIENCE],
         "jwks": jwks(public_jwk(rsa_key("a"), "k1"), public_jwk(ec_key("a"), "e1"),
                      public_jwk(ed_key("a"), "d1"), public_jwk(rsa_key("b"), "ps", "PS256"))}
    p.update(kw)
    return p


def build(cfg, per_route=None, rt=None):
    rt = rt or runtime()
    return build_filter(J.SPEC, cfg, per_route, rt, RouteInfo()), rt


async def call(f, req):
    n = Next()
    resp = await f(req, n)
    return resp, n


def unb64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


# ---- the attack table (also run against the real Envoy in tests/integration) -----------------

def attack_cases() -> list[tuple[str, str, int, str | None]]:
    """The attack table: (name, token, expected status, expected body) against the
    ``rsa_provider()`` keys."""
    now = int(time.time())
    k = rsa_key("a")
    good = mint()
    h, p, s = good.split(".")
    flipped = s[:-4] + ("AAAA" if s[-4:] != "AAAA" else "BBBB")
    other_key_same_kid = mint(key=rsa_key("evil"))
    dup_header = b64(b'{"alg":"none","alg":"RS256","kid":"k1"}')
    tampered = b64(json.dumps(dict(sub="admin", iss=ISSUER, aud=AUDIENCE, exp=now + 60)).encode())
    return [
        # name, token, expected status, expected body
        ("valid", good, 200, None),
        ("alg none, empty signature", jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60},
                                                 None, algorithm="none"),
         401, S.BAD_FORMAT.message),
        ("alg none, with signature", raw_token({"alg": "none", "kid": "k1"},
                                               {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}),
         401, S.ALG_UNSUPPORTED.message),
        ("alg None case trick", raw_token({"alg": "None", "kid": "k1"},
                                          {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}),
         401, S.ALG_UNSUPPORTED.message),
        ("no alg", raw_token({"kid": "k1"}, {"iss": ISSUER}), 401, S.ALG_MISSING.message),
        ("key confusion HS256 with RSA public key", hs_confusion_token(public_pem(k)),
         401, "Jwt verification fails"),
        ("expired", mint(exp=now - 3600), 401, "Jwt is expired"),
        ("expired within clock skew", mint(exp=now - 30), 200, None),
        ("not yet valid", mint(nbf=now + 3600), 401, "Jwt not yet valid"),
        ("nbf within clock skew", mint(nbf=now + 30), 200, None),
        ("wrong issuer", mint(iss="https://evil.test"), 401, "Jwt issuer is not configured"),
        ("no issuer", mint(iss=None), 401, "Jwt issuer is not configured"),
        ("wrong audience", mint(aud="other"), 403, "Audiences in Jwt are not allowed"),
        ("no audience", mint(aud=None), 403, "Audiences in Jwt are not allowed"),
        ("one of several audiences", mint(aud=["x", AUDIENCE]), 200, None),
        ("bad signature", f"{h}.{p}.{flipped}", 401, "Jwt verification fails"),
        ("tampered payload", f"{h}.{tampered}.{s}",
         401, "Jwt verification fails"),
        ("signed by another key, same kid", other_key_same_kid, 401, "Jwt verification fails"),
        ("malformed base64 header", f"!!!!.{p}.{s}", 401, S.BAD_FORMAT.message),
        ("header not base64 length", f"a.{p}.{s}", 401, S.HEADER_BAD_B64.message),
        ("header not JSON", f"{b64(b'not json')}.{p}.{s}", 401, S.HEADER_BAD_JSON.message),
        ("header JSON array", f"{b64(b'[1]')}.{p}.{s}", 401, S.HEADER_BAD_JSON.message),
        ("duplicate alg in header", dup_header + f".{p}.{s}",
         401, S.HEADER_BAD_JSON.message),
        ("payload not base64", f"{h}.a.{s}", 401, S.PAYLOAD_BAD_B64.message),
        ("payload not JSON", f"{h}.{b64(b'{')}.{s}", 401, S.PAYLOAD_BAD_JSON.message),
        ("two segments", f"{h}.{p}", 401, S.BAD_FORMAT.message),
        ("four segments", f"{h}.{p}.{s}.{s}", 401, S.BAD_FORMAT.message),
        ("oversized", mint(pad="x" * 9000), 401, S.TOO_LARGE.message),
        ("unknown kid", mint(kid="nope"), 401, S.NO_KEY.message),
        ("jku header", mint(headers={"jku": "https://evil.test/jwks"}), 401,
         "Jwt header [jku] is not allowed"),
        ("x5u header", mint(headers={"x5u": "https://evil.test/cert"}), 401,
         "Jwt header [x5u] is not allowed"),
        ("embedded jwk header", mint(key=rsa_key("evil"),
                                     headers={"jwk": public_jwk(rsa_key("evil"), "k1")}),
         401, "Jwt header [jwk] is not allowed"),
        ("x5c header", mint(headers={"x5c": ["MIIB"]}), 401, "Jwt header [x5c] is not allowed"),
        ("crit header", mint(headers={"crit": ["exp"]}), 401, "Jwt header [crit] is not allowed"),
        ("exp not a number", mint(exp="tomorrow"), 401, "Jwt payload [exp] field is not an integer"),
        ("aud not strings", mint(aud=[1, 2]), 401,
         "Jwt payload [aud] field is not a string or string list"),
        ("RS384 against key that allows it (no alg in JWK)", mint(alg="RS384"), 200, None),
        ("PS256 token on a PS256 key", mint(key=rsa_key("b"), alg="PS256", kid="ps"), 200, None),
        ("RS256 token on a PS256-only key", mint(key=rsa_key("b"), alg="RS256", kid="ps"),
         401, S.NO_KEY.message),
        ("ES256", mint(key=ec_key("a"), alg="ES256", kid="e1"), 200, None),
        ("ES256 token claiming RSA kid", mint(key=ec_key("a"), alg="ES256", kid="k1"),
         401, "Jwt verification fails"),
        ("EdDSA", mint(key=ed_key("a"), alg="EdDSA", kid="d1"), 200, None),
        ("no kid: tries keys that allow the alg", mint(kid=None), 200, None),
        ("HS256 token on RSA-only provider", jwt.encode(dict(iss=ISSUER, aud=AUDIENCE, exp=now + 60),
                                                        HS_SECRET, algorithm="HS256",
                                                        headers={"kid": "k1"}),
         401, "Jwt verification fails"),
        ("key confusion against a JWK with explicit alg", hs_confusion_token(public_pem(rsa_key("b")), kid="ps"),
         401, S.NO_KEY.message),
    ]


ATTACKS = attack_cases()
_fresh: dict = {}


def fresh_attack(name: str):
    """The case minted again close to when it runs: time-relative cases (exp/nbf within the
    clock skew) must not age while a long suite runs. Re-minted at most every 10 s."""
    stamp = int(time.time() // 10)
    if _fresh.get("stamp") != stamp:
        _fresh.clear()
        _fresh["stamp"] = stamp
        _fresh.update({a[0]: a for a in attack_cases()})
    return _fresh[name]
