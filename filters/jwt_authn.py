"""JWT authentication: Envoy's ``envoy.filters.http.jwt_authn``.

What a request goes through (cheapest first; the first failure answers, see docs/security.md):

1. strip client-sent copies of every header this filter produces (payload and claim headers);
2. CORS preflight bypass (when configured); pick the requirement: the per-route one, else the
   first rule whose match fits the path (no rule, or a rule without ``requires``: pass through);
3. per provider: extract tokens (header with prefix, query parameter, cookie), size limit;
4. verified-token cache: a dict hit (same token string, same key set generation, not expired)
   skips everything below - no parsing, no crypto;
5. structure (three base64url segments), header JSON (``alg`` supported and never ``none``;
   ``jku``/``x5u``/``jwk``/``x5c``/``crit``/``b64`` refused), payload JSON, claim types;
6. issuer, time (``exp``/``nbf`` with clock skew, ``max_lifetime``), audiences (403),
   subjects, required claims, ``jti`` present when replay protection is on - all before any
   key is fetched;
7. keys: local JWKS/PEM/secret, or the remote JWKS cache (fetch with aiohttp; unknown ``kid``
   refetches at most once per ``kid_refetch_interval``); the algorithm comes from the key
   (JWK ``kty``/``crv``/``alg``): a token's ``alg`` only selects among what the key allows;
8. signature (PyJWT's algorithm objects over ``cryptography``);
9. ``jti`` replay check (bounded cache until ``exp``), then cache and outputs.

Failures answer as Envoy: ``401`` (``403`` for an audience mismatch) with
``www-authenticate: Bearer realm="<scheme>://<host><path>"`` (plus ``, error="invalid_token"``
unless the token was missing), body = Envoy's status text, response code details
``jwt_authn_access_denied{<text>}`` in ``ctx.response_code_details``. Envoy sets no
response flag for these; we record the local flag ``JWT`` so denials show in access logs.

No token or secret is ever logged: log lines name the provider and the outcome only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from multidict import MultiDict

from filters.rbac import header_matcher_from_envoy, header_matcher_from_native
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.config.matchers import StringMatcher, string_matcher_from_envoy, string_matcher_from_native
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, FilterSpec
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import MetricFactory

METADATA_NAMESPACE = "envoy.filters.http.jwt_authn"   # dynamic metadata, as Envoy names it

log = logging.getLogger("sidecar.filters.jwt_authn")

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig"
# Envoy 1.40 logs no response flag for a jwt_authn denial (%RESPONSE_FLAGS% is "-"; the reason
# is only in %RESPONSE_CODE_DETAILS%). This local flag makes denials visible in our access log
# and per-flag counters; it is not an Envoy flag (see docs/security.md).
FLAG = "JWT"

DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_CACHE_SIZE = 1000
DEFAULT_CACHE_MAX_TOKEN_BYTES = 8192
DEFAULT_JTI_CACHE_SIZE = 100_000
MAX_JWKS_BYTES = 1 << 20
MAX_JWKS_KEYS = 100
MAX_CANDIDATE_KEYS = 8
MIN_RSA_BITS = 2048
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
REFRESH_FRACTION = 0.8          # remote JWKS refreshed in the background at 80% of its TTL

# =============================================================================================
# outcomes (Envoy's status texts; the outcome label is ours, for metrics)
# =============================================================================================


@dataclass(frozen=True, slots=True)
class Status:
    code: int
    message: str
    outcome: str

    @property
    def details(self) -> str:
        return "jwt_authn_access_denied{" + self.message.replace(" ", "_") + "}"


_VERIFY_FAILS = "Jwt verification fails"
MISSING = Status(401, "Jwt is missing", "missing")
TOO_LARGE = Status(401, "Jwt exceeds the size limit", "too_large")
BAD_FORMAT = Status(401, "Jwt is not in the form of Header.Payload.Signature with two dots and "
                         "3 sections", "malformed")
HEADER_BAD_B64 = Status(401, "Jwt header is an invalid Base64url encoded", "malformed")
HEADER_BAD_JSON = Status(401, "Jwt header is an invalid JSON", "malformed")
PAYLOAD_BAD_B64 = Status(401, "Jwt payload is an invalid Base64url encoded", "malformed")
PAYLOAD_BAD_JSON = Status(401, "Jwt payload is an invalid JSON", "malformed")
SIG_BAD_B64 = Status(401, "Jwt signature is an invalid Base64url encoded", "malformed")
ALG_MISSING = Status(401, "Jwt header [alg] field is required and must be a string",
                     "unsupported_alg")
ALG_UNSUPPORTED = Status(401, "Jwt header [alg] is not supported", "unsupported_alg")
KID_BAD = Status(401, "Jwt header [kid] field is not a string", "malformed")
FORBIDDEN_HEADER = {k: Status(401, f"Jwt header [{k}] is not allowed", "forbidden_header")
                    for k in ("jku", "x5u", "jwk", "x5c", "crit", "b64")}
CLAIM_TYPE = {
    "exp": Status(401, "Jwt payload [exp] field is not an integer", "malformed"),
    "nbf": Status(401, "Jwt payload [nbf] field is not an integer", "malformed"),
    "iat": Status(401, "Jwt payload [iat] field is not an integer", "malformed"),
    "iss": Status(401, "Jwt payload [iss] field is not a string", "malformed"),
    "sub": Status(401, "Jwt payload [sub] field is not a string", "malformed"),
    "jti": Status(401, "Jwt payload [jti] field is not a string", "malformed"),
    "aud": Status(401, "Jwt payload [aud] field is not a string or string list", "malformed"),
}
UNKNOWN_ISSUER = Status(401, "Jwt issuer is not configured", "wrong_issuer")
EXPIRED = Status(401, "Jwt is expired", "expired")
NOT_YET_VALID = Status(401, "Jwt not yet valid", "not_yet_valid")
EXP_REQUIRED = Status(401, _VERIFY_FAILS, "exp_required")
LIFETIME = Status(401, _VERIFY_FAILS, "lifetime_exceeded")
SUBJECT = Status(401, _VERIFY_FAILS, "subject_mismatch")
AUDIENCE = Status(403, "Audiences in Jwt are not allowed", "audience_mismatch")
JTI_REQUIRED = Status(401, "Jwt payload [jti] field is required", "jti_required")
NO_KEY = Status(401, "Jwks doesn't have key to match kid or alg from Jwt", "unknown_kid")
JWKS_FETCH_FAILED = Status(401, "Jwks remote fetch is failed", "jwks_fetch_failed")
BAD_SIGNATURE = Status(401, _VERIFY_FAILS, "bad_signature")
KEY_MISMATCH = Status(401, _VERIFY_FAILS, "key_alg_mismatch")   # kid found, wrong key type
REPLAYED = Status(401, "Jwt has already been used", "replayed")
REPLAY_FULL = Status(401, "Jwt replay cache is full", "replay_cache_full")

OUTCOMES = ("ok", "missing", "too_large", "malformed", "unsupported_alg", "forbidden_header",
            "wrong_issuer", "expired", "not_yet_valid", "exp_required", "lifetime_exceeded",
            "audience_mismatch", "subject_mismatch", "missing_claim", "jti_required",
            "unknown_kid", "key_alg_mismatch", "jwks_fetch_failed", "bad_signature", "replayed",
            "replay_cache_full")


def _missing_claim(name: str) -> Status:
    return Status(401, f"Jwt payload is missing required claim [{name}]", "missing_claim")


# =============================================================================================
# keys: the algorithm comes from the key
# =============================================================================================


_ALGS = get_default_algorithms()
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
EC_CURVE_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
EC_KEY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
SUPPORTED_ALGS = RSA_ALGS | HMAC_ALGS | frozenset(EC_CURVE_ALG.values()) | {"EdDSA"}
ALGORITHM = {name: _ALGS[name] for name in SUPPORTED_ALGS}
_generation = itertools.count(1)


class VerifyKey:
    """One verification key and the algorithms it may verify (never chosen by the token)."""

    __slots__ = ("kid", "algs", "key", "kty", "explicit_alg")

    def __init__(self, kid: str | None, algs: frozenset, key: Any, kty: str,
                 explicit_alg: bool = False):
        self.kid = kid
        self.algs = algs
        self.key = key
        self.kty = kty
        self.explicit_alg = explicit_alg    # the JWK named its alg (else: its kty family)

    def __repr__(self) -> str:   # never the key material
        return f"VerifyKey(kid={self.kid!r}, kty={self.kty}, algs={sorted(self.algs)})"


class KeySet:
    __slots__ = ("keys", "by_kid", "kidless", "generation", "digest", "skipped")

    def __init__(self, keys: list[VerifyKey], digest: str, skipped: int = 0):
        self.keys = tuple(keys)
        self.by_kid: dict[str, list[VerifyKey]] = {}
        self.kidless = tuple(k for k in keys if k.kid is None)
        for k in keys:
            if k.kid is not None:
                self.by_kid.setdefault(k.kid, []).append(k)
        self.generation = next(_generation)
        self.digest = digest
        self.skipped = skipped

    def candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        if kid is None:
            out = [k for k in self.keys if alg in k.algs]
        else:
            out = [k for k in self.by_kid.get(kid, ()) if alg in k.algs]
            out.extend(k for k in self.kidless if alg in k.algs)
        return out[:MAX_CANDIDATE_KEYS]

    def knows_kid(self, kid: str) -> bool:
        return kid in self.by_kid or bool(self.kidless)

    def alg_mismatch_status(self, kid: str | None) -> "Status":
        """No candidate: as Envoy, a key that matched by kid but has no JWK ``alg`` counts as
        a failed verification; keys excluded by their explicit ``alg`` mean "no key"."""
        keys = self.keys if kid is None else tuple(self.by_kid.get(kid, ())) + self.kidless
        return KEY_MISMATCH if any(not k.explicit_alg for k in keys) else NO_KEY


def _hmac_algs(secret: bytes, alg: str | None) -> frozenset:
    if alg is not None:
        if len(secret) < HMAC_MIN_BYTES[alg]:
            raise ValueError(f"{alg} key must be at least {HMAC_MIN_BYTES[alg]} bytes")
        return frozenset({alg})
    algs = frozenset(a for a, n in HMAC_MIN_BYTES.items() if len(secret) >= n)
    if not algs:
        raise ValueError("HMAC key must be at least 32 bytes (RFC 7518 3.2)")
    return algs


def _jwk_to_key(jwk: Any) -> VerifyKey | None:
    """A JWK -> VerifyKey; ``None`` for keys not meant for signature verification."""
    if not isinstance(jwk, dict):
        raise ValueError("JWK must be an object")
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid must be a string")
    if alg is not None and alg not in SUPPORTED_ALGS:
        raise ValueError(f"unsupported alg {alg!r}")
    if kty == "RSA":
        key = RSAAlgorithm.from_jwk(jwk)
        if isinstance(key, rsa.RSAPrivateKey):
            key = key.public_key()
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
        family = RSA_ALGS
    elif kty == "EC":
        want = EC_CURVE_ALG.get(jwk.get("crv"))
        if want is None:
            raise ValueError(f"unsupported EC curve {jwk.get('crv')!r}")
        key = ECAlgorithm.from_jwk(jwk)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key = key.public_key()
        family = frozenset({want})
    elif kty == "OKP":
        if jwk.get("crv") not in ("Ed25519", "Ed448"):
            raise ValueError(f"unsupported OKP curve {jwk.get('crv')!r}")
        key = OKPAlgorithm.from_jwk(jwk)
        if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            key = key.public_key()
        family = frozenset({"EdDSA"})
    elif kty == "oct":
        key = HMACAlgorithm.from_jwk(jwk)
        if alg is not None and alg not in HMAC_ALGS:
            raise ValueError(f"alg {alg} does not fit kty oct")
        return VerifyKey(kid, _hmac_algs(key, alg), key, "oct", alg is not None)
    else:
        raise ValueError(f"unsupported kty {kty!r}")
    if alg is not None:
        if alg not in family:
            raise ValueError(f"alg {alg} does not fit kty {kty}")
        family = frozenset({alg})
    return VerifyKey(kid, family, key, kty, alg is not None)


def _public_key_to_key(key: Any, kid: str | None = None) -> VerifyKey:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
        return VerifyKey(kid, RSA_ALGS, key, "RSA")
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_KEY_CURVE.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return VerifyKey(kid, frozenset({alg}), key, "EC")
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return VerifyKey(kid, frozenset({"EdDSA"}), key, "OKP")
    raise ValueError(f"unsupported public key type {type(key).__name__}")


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)


def parse_jwks(data: str | bytes | dict) -> KeySet:
    """A JWKS (``{"keys": [...]}``), a single JWK, or PEM public keys/certificates -> KeySet.

    Keys that cannot verify signatures (``use: enc``, unknown ``kty``, short keys) are skipped;
    a set without any usable key is an error (``ValueError`` with a reason, never key bytes).
    """
    if isinstance(data, dict):
        raw = json.dumps(data, sort_keys=True).encode()
        obj: Any = data
    else:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        obj = None
    digest = hashlib.sha256(raw).hexdigest()
    keys: list[VerifyKey] = []
    skipped = 0
    if obj is None and raw.lstrip().startswith(b"-----BEGIN"):
        for m in _PEM_BLOCK.finditer(raw):
            kind = m.group(1)
            try:
                if kind == b"CERTIFICATE":
                    pk = x509.load_pem_x509_certificate(m.group(0)).public_key()
                elif kind == b"PUBLIC KEY" or kind == b"RSA PUBLIC KEY":
                    pk = serialization.load_pem_public_key(m.group(0))
                else:
                    raise ValueError(f"PEM block {kind.decode()} is not a public key")
                keys.append(_public_key_to_key(pk))
            except ValueError as e:
                raise ValueError(f"PEM: {e}") from None
        if not keys:
            raise ValueError("no PEM public key found")
        return KeySet(keys, digest)
    if obj is None:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise ValueError("JWKS is not valid JSON") from None
    if isinstance(obj, dict) and "keys" in obj:
        items = obj["keys"]
        if not isinstance(items, list):
            raise ValueError("JWKS keys must be a list")
    elif isinstance(obj, dict) and "kty" in obj:
        items = [obj]
    else:
        raise ValueError('JWKS must be an object with "keys" (or a single JWK)')
    if len(items) > MAX_JWKS_KEYS:
        raise ValueError(f"JWKS has more than {MAX_JWKS_KEYS} keys")
    reasons = []
    for jwk in items:
        try:
            k = _jwk_to_key(jwk)
        except Exception as e:   # noqa: BLE001 - a bad key is skipped, the reason kept
            skipped += 1
            reasons.append(str(e) if isinstance(e, ValueError) else type(e).__name__)
            continue
        if k is None:
            skipped += 1
            continue
        keys.append(k)
    if not keys:
        why = f" ({'; '.join(reasons[:3])})" if reasons else ""
        raise ValueError(f"JWKS has no usable signature verification key{why}")
    return KeySet(keys, digest, skipped)


def secret_key_set(secret: bytes, kid: str | None = None) -> KeySet:
    """A shared secret (HS256/384/512; which ones depends on its length)."""
    return KeySet([VerifyKey(kid, _hmac_algs(secret, None), secret, "oct")],
                  hashlib.sha256(b"secret:" + secret).hexdigest())


# =============================================================================================
# config model
# =============================================================================================

@dataclass(frozen=True, slots=True)
class TokenLocation:
    kind: str            # header | query | cookie
    name: str            # header names lower-case
    prefix: str = ""     # header value prefix, e.g. "Bearer "


DEFAULT_LOCATIONS = (TokenLocation("header", "authorization", "Bearer "),
                     TokenLocation("query", "access_token"))


@dataclass(frozen=True, slots=True)
class RemoteJwks:
    uri: str
    cluster: str = ""
    timeout_s: float = 1.0
    cache_duration_s: float = 600.0          # Envoy's default: 10 minutes
    fetch_at_start: bool = False             # Envoy async_fetch
    failed_refetch_s: float = 1.0            # after a failed fetch, wait before the next one
    kid_refetch_interval_s: float = 30.0     # unknown kid: at most one fetch per interval
    num_retries: int = 0
    retry_base_s: float = 0.1
    retry_max_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    locations: tuple[TokenLocation, ...] = DEFAULT_LOCATIONS
    local_digest: str = ""                                    # identity of the local keys
    local_keys: KeySet | None = field(default=None, compare=False, hash=False, repr=False)
    remote: RemoteJwks | None = None
    forward: bool = False
    forward_payload_header: str = ""
    pad_forward_payload_header: bool = False
    claim_to_headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    payload_in_metadata: str = ""
    header_in_metadata: str = ""
    failed_status_in_metadata: str = ""
    clock_skew_s: float = 60.0
    max_lifetime_s: float | None = None
    require_expiration: bool = False
    required_claims: tuple[str, ...] = ()
    subjects: StringMatcher | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_max_token_bytes: int = DEFAULT_CACHE_MAX_TOKEN_BYTES
    jti_replay: bool = False
    jti_cache_size: int = DEFAULT_JTI_CACHE_SIZE
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES


# requirements (hashable, validated against the providers at parse time)
@dataclass(frozen=True, slots=True)
class ReqProvider:
    name: str
    audiences: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ReqAny:
    children: tuple


@dataclass(frozen=True, slots=True)
class ReqAll:
    children: tuple


@dataclass(frozen=True, slots=True)
class ReqAllowMissing:
    pass


@dataclass(frozen=True, slots=True)
class ReqAllowMissingOrFailed:
    pass


Requirement = ReqProvider | ReqAny | ReqAll | ReqAllowMissing | ReqAllowMissingOrFailed


@dataclass(frozen=True, slots=True, eq=False)
class RuleMatch:
    kind: str                     # prefix | path | regex | path_separated_prefix
    value: str = ""
    regex: re.Pattern | None = None
    case_sensitive: bool = True
    headers: tuple = ()           # fn(req) -> bool

    def matches(self, req: Request) -> bool:
        p = req.path
        if not self.case_sensitive:
            p = p.lower()
        k = self.kind
        if k == "prefix":
            ok = p.startswith(self.value)
        elif k == "path":
            ok = p == self.value
        elif k == "regex":
            ok = self.regex.fullmatch(p) is not None
        else:
            v = self.value
            ok = p == v or p.startswith(v + "/")
        if ok and self.headers:
            return all(h(req) for h in self.headers)
        return ok


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    match: RuleMatch
    requires: Requirement | None


@dataclass(frozen=True, slots=True, eq=False)
class JwtAuthnConfig:
    providers: tuple[Provider, ...]
    rules: tuple[Rule, ...] = ()
    requirement_map: tuple[tuple[str, Requirement], ...] = ()
    bypass_cors_preflight: bool = False
    strip_failure_response: bool = False
    stat_prefix: str = ""

    def provider(self, name: str) -> Provider | None:
        for p in self.providers:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True, slots=True)
class PerRoute:
    disabled: bool = False
    requirement_name: str = ""
    requires: Requirement | None = None     # native only: an inline requirement


# =============================================================================================
# parsing: Envoy v3
# =============================================================================================

_ENVOY_PROVIDER_KEYS = (
    "issuer", "audiences", "subjects", "require_expiration", "max_lifetime", "remote_jwks",
    "local_jwks", "forward", "from_headers", "from_params", "from_cookies",
    "forward_payload_header", "pad_forward_payload_header", "payload_in_metadata",
    "normalize_payload_in_metadata", "header_in_metadata", "failed_status_in_metadata",
    "clock_skew_seconds", "jwt_cache_config", "claim_to_headers", "clear_route_cache")


def _read_data_source(d: Any, path: str) -> tuple[bytes, str]:
    """``envoy.config.core.v3.DataSource`` -> (bytes, description for errors)."""
    w.check_keys(d, ("filename", "inline_string", "inline_bytes", "environment_variable",
                     "watched_directory"), path)
    if d.get("watched_directory") is not None:
        raise ConfigError(w.join(path, "watched_directory"), "is not supported")
    kind = w.one_of(d, ("filename", "inline_string", "inline_bytes", "environment_variable"), path)
    v = w.string(d, kind, path)
    if kind == "inline_string":
        return v.encode(), "inline_string"
    if kind == "inline_bytes":
        try:
            return base64.b64decode(v, validate=True), "inline_bytes"
        except (binascii.Error, ValueError):
            raise ConfigError(w.join(path, kind), "must be base64") from None
    if kind == "environment_variable":
        val = os.environ.get(v)
        if val is None:
            raise ConfigError(w.join(path, kind), f"environment variable {v} is not set")
        return val.encode(), f"environment variable {v}"
    return _read_file(v, w.join(path, kind)), v


def _read_file(name: str, path: str) -> bytes:
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, f"cannot read {name}: {e.strerror}") from None
    if len(data) > MAX_JWKS_BYTES:
        raise ConfigError(path, f"{name} is larger than {MAX_JWKS_BYTES} bytes")
    return data


def _keys_or_error(data: bytes | dict, path: str) -> KeySet:
    try:
        return parse_jwks(data)
    except ValueError as e:
        raise ConfigError(path, f"invalid JWKS: {e}") from None


def _check_header_name(v: str, path: str) -> str:
    if not v or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", v):
        raise ConfigError(path, f"not a valid header name: {v!r}")
    return v.lower()


def _remote_envoy(d: Any, path: str) -> RemoteJwks:
    w.check_keys(d, ("http_uri", "cache_duration", "async_fetch", "retry_policy"), path)
    hp = w.join(path, "http_uri")
    h = w.check_keys(w.mapping(d, "http_uri", path), ("uri", "cluster", "timeout"), hp)
    uri = _check_uri(w.string(h, "uri", hp, nonempty=True), w.join(hp, "uri"))
    kw: dict = dict(uri=uri, cluster=w.string(h, "cluster", hp, ""),
                    timeout_s=w.duration(h, "timeout", hp, 1.0),
                    cache_duration_s=w.duration(d, "cache_duration", path, 600.0))
    if kw["cache_duration_s"] <= 0:
        raise ConfigError(w.join(path, "cache_duration"), "must be positive")
    if d.get("async_fetch") is not None:
        ap = w.join(path, "async_fetch")
        a = w.check_keys(w.mapping(d, "async_fetch", path), ("fast_listener",
                                                             "failed_refetch_duration"), ap)
        w.boolean(a, "fast_listener", ap, False)   # we never hold the listener: always "fast"
        kw["fetch_at_start"] = True
        kw["failed_refetch_s"] = w.duration(a, "failed_refetch_duration", ap, 1.0)
    if d.get("retry_policy") is not None:
        rp = w.join(path, "retry_policy")
        r = w.check_keys(w.mapping(d, "retry_policy", path), ("num_retries", "retry_back_off"), rp)
        kw["num_retries"] = w.integer(r, "num_retries", rp, 1, lo=0, hi=10)
        if r.get("retry_back_off") is not None:
            bp = w.join(rp, "retry_back_off")
            b = w.check_keys(w.mapping(r, "retry_back_off", rp), ("base_interval", "max_interval"), bp)
            kw["retry_base_s"] = w.duration(b, "base_interval", bp, 1.0)
            kw["retry_max_s"] = w.duration(b, "max_interval", bp, 10 * kw["retry_base_s"])
    return RemoteJwks(**kw)


def _check_uri(uri: str, path: str) -> str:
    if not re.match(r"^https?://[^/\s]+", uri):
        raise ConfigError(path, "must be an http:// or https:// URL")
    return uri


def _claim_path(name: str, path: str) -> tuple[str, ...]:
    parts = tuple(name.split("."))
    if not all(parts):
        raise ConfigError(path, f"not a claim name: {name!r}")
    return parts


def _provider_envoy(name: str, d: Any, path: str) -> Provider:
    w.check_keys(d, _ENVOY_PROVIDER_KEYS, path)
    if w.boolean(d, "clear_route_cache", path, False):
        raise ConfigError(w.join(path, "clear_route_cache"),
                          "re-routing on JWT claims is not supported (routes are chosen before "
                          "filters run)")
    if d.get("normalize_payload_in_metadata"):
        raise ConfigError(w.join(path, "normalize_payload_in_metadata"), "is not supported")
    kw: dict = dict(name=name, issuer=w.string(d, "issuer", path, ""))
    kw["audiences"] = _str_list(d, "audiences", path)
    if d.get("subjects") is not None:
        kw["subjects"] = string_matcher_from_envoy(w.mapping(d, "subjects", path),
                                                   w.join(path, "subjects"))
    kw["require_expiration"] = w.boolean(d, "require_expiration", path, False)
    if d.get("max_lifetime") is not None:
        kw["max_lifetime_s"] = w.duration(d, "max_lifetime", path)
    src = w.one_of(d, ("remote_jwks", "local_jwks"), path)
    if src == "remote_jwks":
        kw["remote"] = _remote_envoy(w.mapping(d, src, path), w.join(path, src))
    else:
        sp = w.join(path, src)
        data, _ = _read_data_source(w.mapping(d, src, path), sp)
        ks = _keys_or_error(data, sp)
        kw["local_keys"], kw["local_digest"] = ks, ks.digest
    kw["forward"] = w.boolean(d, "forward", path, False)
    locs: list[TokenLocation] = []
    fh = w.join(path, "from_headers")
    for i, h in enumerate(w.seq(d, "from_headers", path, [])):
        p = w.join(fh, i)
        w.check_keys(h, ("name", "value_prefix"), p)
        locs.append(TokenLocation("header", _check_header_name(w.string(h, "name", p), w.join(p, "name")),
                                  w.string(h, "value_prefix", p, "")))
    for q in _str_list(d, "from_params", path):
        locs.append(TokenLocation("query", q))
    for c in _str_list(d, "from_cookies", path):
        locs.append(TokenLocation("cookie", c))
    if locs:
        kw["locations"] = tuple(locs)
    fph = w.string(d, "forward_payload_header", path, "")
    kw["forward_payload_header"] = _check_header_name(fph, w.join(path, "forward_payload_header")) if fph else ""
    kw["pad_forward_payload_header"] = w.boolean(d, "pad_forward_payload_header", path, False)
    kw["payload_in_metadata"] = w.string(d, "payload_in_metadata", path, "")
    kw["header_in_metadata"] = w.string(d, "header_in_metadata", path, "")
    kw["failed_status_in_metadata"] = w.string(d, "failed_status_in_metadata", path, "")
    kw["clock_skew_s"] = float(w.integer(d, "clock_skew_seconds", path, 60, lo=0))
    if d.get("jwt_cache_config") is not None:
        cp = w.join(path, "jwt_cache_config")
        c = w.check_keys(w.mapping(d, "jwt_cache_config", path), ("jwt_cache_size",
                                                                  "jwt_max_token_size"), cp)
        kw["cache_size"] = w.integer(c, "jwt_cache_size", cp, 100, lo=0)
        kw["cache_max_token_bytes"] = w.integer(c, "jwt_max_token_size", cp, 4096, lo=0)
    cth = []
    cp = w.join(path, "claim_to_headers")
    for i, c in enumerate(w.seq(d, "claim_to_headers", path, [])):
        p = w.join(cp, i)
        w.check_keys(c, ("header_name", "claim_name"), p)
        cth.append((_check_header_name(w.string(c, "header_name", p), w.join(p, "header_name")),
                    _claim_path(w.string(c, "claim_name", p, nonempty=True), w.join(p, "claim_name"))))
    kw["claim_to_headers"] = tuple(cth)
    return Provider(**kw)


def _str_list(d: dict, key: str, path: str) -> tuple[str, ...]:
    items = w.seq(d, key, path, [])
    for i, x in enumerate(items):
        if not isinstance(x, str) or not x:
            raise ConfigError(w.join(w.join(path, key), i), "must be a non-empty string")
    return tuple(items)


def _requirement_envoy(d: Any, path: str, names: set) -> Requirement:
    keys = ("provider_name", "provider_and_audiences", "requires_any", "requires_all",
            "allow_missing_or_failed", "allow_missing")
    w.check_keys(d, keys, path)
    kind = w.one_of(d, keys, path)
    kp = w.join(path, kind)
    if kind == "provider_name":
        n = w.string(d, kind, path, nonempty=True)
        _known(n, names, kp)
        return ReqProvider(n)
    if kind == "provider_and_audiences":
        x = w.check_keys(w.mapping(d, kind, path), ("provider_name", "audiences"), kp)
        n = w.string(x, "provider_name", kp, nonempty=True)
        _known(n, names, w.join(kp, "provider_name"))
        return ReqProvider(n, _str_list(x, "audiences", kp))
    if kind in ("requires_any", "requires_all"):
        x = w.check_keys(w.mapping(d, kind, path), ("requirements",), kp)
        rp = w.join(kp, "requirements")
        reqs = tuple(_requirement_envoy(r, w.join(rp, i), names)
                     for i, r in enumerate(w.seq(x, "requirements", kp)))
        if len(reqs) < 2:
            raise ConfigError(rp, "needs at least two requirements")
        return ReqAny(reqs) if kind == "requires_any" else ReqAll(reqs)
    w.check_keys(d[kind] if isinstance(d[kind], dict) else {}, (), kp)
    return ReqAllowMissing() if kind == "allow_missing" else ReqAllowMissingOrFailed()


def _known(name: str, names: set, path: str) -> None:
    if name not in names:
        raise ConfigError(path, f"unknown provider {name!r} (known: {', '.join(sorted(names))})")


def _rule_match_envoy(d: Any, path: str) -> RuleMatch:
    w.check_keys(d, ("prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive",
                     "headers", "connect_matcher", "query_parameters", "grpc",
                     "runtime_fraction", "dynamic_metadata", "path_match_policy",
                     "filter_state", "cel_expr"), path)
    for k in ("connect_matcher", "query_parameters", "grpc", "runtime_fraction",
              "dynamic_metadata", "path_match_policy", "filter_state", "cel_expr"):
        if d.get(k) is not None:
            raise ConfigError(w.join(path, k), "is not supported in jwt_authn rules")
    kind = w.one_of(d, ("prefix", "path", "safe_regex", "path_separated_prefix"), path)
    cs = w.boolean(d, "case_sensitive", path, True)
    hp = w.join(path, "headers")
    headers = tuple(header_matcher_from_envoy(h, w.join(hp, i))
                    for i, h in enumerate(w.seq(d, "headers", path, [])))
    if kind == "safe_regex":
        rp = w.join(path, "safe_regex")
        r = w.check_keys(w.mapping(d, kind, path), ("regex", "google_re2"), rp)
        w.google_re2(r, rp)
        rx = w.compile_regex(w.string(r, "regex", rp), w.join(rp, "regex"),
                             0 if cs else re.IGNORECASE)
        return RuleMatch("regex", regex=rx, case_sensitive=True, headers=headers)
    v = w.string(d, kind, path)
    if kind == "path_separated_prefix":
        if not v.startswith("/") or (v.endswith("/") and v != "/"):
            raise ConfigError(w.join(path, kind), "must start with / and not end with /")
    return RuleMatch(kind, v if cs else v.lower(), case_sensitive=cs, headers=headers)


def from_envoy(d: dict, path: str) -> JwtAuthnConfig:
    w.check_keys(d, ("providers", "rules", "filter_state_rules", "bypass_cors_preflight",
                     "requirement_map", "stat_prefix", "strip_failure_response"), path)
    if d.get("filter_state_rules") is not None:
        raise ConfigError(w.join(path, "filter_state_rules"), "is not supported")
    pp = w.join(path, "providers")
    providers = tuple(_provider_envoy(str(n), p, w.join(pp, n))
                      for n, p in w.mapping(d, "providers", path, {}).items())
    names = {p.name for p in providers}
    rules = []
    rp = w.join(path, "rules")
    for i, r in enumerate(w.seq(d, "rules", path, [])):
        p = w.join(rp, i)
        w.check_keys(r, ("match", "requires", "requirement_name"), p)
        if r.get("requires") is not None and r.get("requirement_name") is not None:
            raise ConfigError(p, "only one of requires, requirement_name may be set")
        m = _rule_match_envoy(w.mapping(r, "match", p), w.join(p, "match"))
        req = None
        if r.get("requires") is not None:
            req = _requirement_envoy(w.mapping(r, "requires", p), w.join(p, "requires"), names)
        rules.append(Rule(m, req))
    rmap = []
    mp = w.join(path, "requirement_map")
    for n, r in w.mapping(d, "requirement_map", path, {}).items():
        rmap.append((str(n), _requirement_envoy(r, w.join(mp, n), names)))
    # rules may name a requirement_map entry (Envoy: requirement_name)
    rmap_d = dict(rmap)
    for i, r in enumerate(w.seq(d, "rules", path, [])):
        if r.get("requirement_name") is not None:
            n = w.string(r, "requirement_name", w.join(rp, i))
            if n not in rmap_d:
                raise ConfigError(w.join(w.join(rp, i), "requirement_name"),
                                  f"not in requirement_map: {n!r}")
            rules[i] = Rule(rules[i].match, rmap_d[n])
    return JwtAuthnConfig(
        providers=providers, rules=tuple(rules), requirement_map=tuple(rmap),
        bypass_cors_preflight=w.boolean(d, "bypass_cors_preflight", path, False),
        strip_failure_response=w.boolean(d, "strip_failure_response", path, False),
        stat_prefix=w.string(d, "stat_prefix", path, ""))


def per_route_from_envoy(d: dict, path: str) -> PerRoute:
    w.check_keys(d, ("disabled", "requirement_name"), path)
    kind = w.one_of(d, ("disabled", "requirement_name"), path)
    if kind == "disabled":
        if not w.boolean(d, "disabled", path):
            raise ConfigError(w.join(path, "disabled"), "must be true")
        return PerRoute(disabled=True)
    return PerRoute(requirement_name=w.string(d, kind, path, nonempty=True))


# =============================================================================================
# parsing: native
# =============================================================================================

_NATIVE_PROVIDER_KEYS = (
    "issuer", "audiences", "jwks", "jwks_file", "jwks_uri", "secret", "secret_file",
    "secret_env", "kid", "jwks_cache_duration", "jwks_fetch_timeout", "jwks_fetch_at_start",
    "jwks_kid_refetch_interval", "jwks_failed_refetch", "jwks_retries", "from", "forward",
    "payload_header", "pad_payload_header", "claims_to_headers", "payload_key",
    "clock_skew", "max_lifetime", "require_expiration", "required_claims", "subject",
    "cache_size", "replay_protection", "max_token_size")
_RESERVED = ("allow_missing", "allow_missing_or_failed")


def _secret_bytes(d: dict, path: str) -> tuple[bytes, str]:
    kind = w.one_of(d, ("secret", "secret_file", "secret_env"), path)
    v = w.string(d, kind, path, nonempty=True)
    if kind == "secret":
        return v.encode(), kind
    if kind == "secret_env":
        val = os.environ.get(v)
        if val is None:
            raise ConfigError(w.join(path, kind), f"environment variable {v} is not set")
        return val.encode(), kind
    return _read_file(v, w.join(path, kind)).strip(), kind


def _provider_native(name: str, d: Any, path: str) -> Provider:
    if name in _RESERVED:
        raise ConfigError(path, f"{name!r} is reserved for requirements; pick another name")
    w.check_keys(d, _NATIVE_PROVIDER_KEYS, path)
    kw: dict = dict(name=name, issuer=w.string(d, "issuer", path, ""),
                    audiences=_str_list(d, "audiences", path))
    src = w.one_of(d, ("jwks", "jwks_file", "jwks_uri", "secret", "secret_file", "secret_env"),
                   path)
    sp = w.join(path, src)
    remote_only = ("jwks_cache_duration", "jwks_fetch_timeout", "jwks_fetch_at_start",
                   "jwks_kid_refetch_interval", "jwks_failed_refetch", "jwks_retries")
    if src != "jwks_uri":
        for k in remote_only:
            if k in d:
                raise ConfigError(w.join(path, k), "only applies with jwks_uri")
    if "kid" in d and not src.startswith("secret"):
        raise ConfigError(w.join(path, "kid"), "only applies with a secret")
    if src == "jwks":
        v = d[src]
        if isinstance(v, dict):
            ks = _keys_or_error(v, sp)
        elif isinstance(v, str):
            ks = _keys_or_error(v.encode(), sp)
        else:
            raise ConfigError(sp, "must be a JWKS mapping or a JWKS/PEM string")
    elif src == "jwks_file":
        ks = _keys_or_error(_read_file(w.string(d, src, path, nonempty=True), sp), sp)
    elif src == "jwks_uri":
        ks = None
        kw["remote"] = RemoteJwks(
            uri=_check_uri(w.string(d, src, path), sp),
            timeout_s=w.duration(d, "jwks_fetch_timeout", path, 1.0),
            cache_duration_s=w.duration(d, "jwks_cache_duration", path, 600.0),
            fetch_at_start=w.boolean(d, "jwks_fetch_at_start", path, True),
            kid_refetch_interval_s=w.duration(d, "jwks_kid_refetch_interval", path, 30.0),
            failed_refetch_s=w.duration(d, "jwks_failed_refetch", path, 1.0),
            num_retries=w.integer(d, "jwks_retries", path, 0, lo=0, hi=10))
        if kw["remote"].cache_duration_s <= 0:
            raise ConfigError(w.join(path, "jwks_cache_duration"), "must be positive")
    else:
        secret, _ = _secret_bytes(d, path)
        try:
            ks = secret_key_set(secret, w.string(d, "kid", path, None))
        except ValueError as e:
            raise ConfigError(sp, str(e)) from None
    if ks is not None:
        kw["local_keys"], kw["local_digest"] = ks, ks.digest
    if "from" in d:
        locs = []
        fp = w.join(path, "from")
        items = w.seq(d, "from", path)
        if not items:
            raise ConfigError(fp, "needs at least one location")
        for i, x in enumerate(items):
            p = w.join(fp, i)
            w.check_keys(x, ("header", "prefix", "query", "cookie"), p)
            kind = w.one_of(x, ("header", "query", "cookie"), p)
            if kind != "header" and "prefix" in x:
                raise ConfigError(w.join(p, "prefix"), "only applies to header")
            nm = w.string(x, kind, p, nonempty=True)
            if kind == "header":
                locs.append(TokenLocation("header", _check_header_name(nm, w.join(p, kind)),
                                          w.string(x, "prefix", p, "")))
            else:
                locs.append(TokenLocation(kind, nm))
        kw["locations"] = tuple(locs)
    kw["forward"] = w.boolean(d, "forward", path, False)
    ph = w.string(d, "payload_header", path, "")
    kw["forward_payload_header"] = _check_header_name(ph, w.join(path, "payload_header")) if ph else ""
    kw["pad_forward_payload_header"] = w.boolean(d, "pad_payload_header", path, False)
    cth = []
    cp = w.join(path, "claims_to_headers")
    for h, c in w.mapping(d, "claims_to_headers", path, {}).items():
        p = w.join(cp, h)
        if not isinstance(c, str) or not c:
            raise ConfigError(p, "must be a claim name")
        cth.append((_check_header_name(str(h), p), _claim_path(c, p)))
    kw["claim_to_headers"] = tuple(cth)
    kw["payload_in_metadata"] = w.string(d, "payload_key", path, "")
    kw["clock_skew_s"] = w.duration(d, "clock_skew", path, 60.0)
    if "max_lifetime" in d:
        kw["max_lifetime_s"] = w.duration(d, "max_lifetime", path)
    kw["require_expiration"] = w.boolean(d, "require_expiration", path, True)
    kw["required_claims"] = _str_list(d, "required_claims", path)
    if "subject" in d:
        kw["subjects"] = string_matcher_from_native(d["subject"], w.join(path, "subject"))
    kw["cache_size"] = w.integer(d, "cache_size", path, DEFAULT_CACHE_SIZE, lo=0)
    kw["max_token_bytes"] = w.integer(d, "max_token_size", path, DEFAULT_MAX_TOKEN_BYTES,
                                      lo=64, hi=65536)
    kw["cache_max_token_bytes"] = kw["max_token_bytes"]
    rp = d.get("replay_protection")
    if isinstance(rp, bool):
        kw["jti_replay"] = rp
    elif isinstance(rp, dict):
        p = w.join(path, "replay_protection")
        w.check_keys(rp, ("enabled", "max_entries"), p)
        kw["jti_replay"] = w.boolean(rp, "enabled", p, True)
        kw["jti_cache_size"] = w.integer(rp, "max_entries", p, DEFAULT_JTI_CACHE_SIZE, lo=1)
    elif rp is not None:
        raise ConfigError(w.join(path, "replay_protection"), "must be true/false or a mapping")
    return Provider(**kw)


def _requirement_native(v: Any, path: str, names: set) -> Requirement:
    """``name`` | ``allow_missing`` | ``allow_missing_or_failed`` | ``{any: [...]}`` |
    ``{all: [...]}`` | ``{provider: name, audiences: [...]}``."""
    if isinstance(v, str):
        if v == "allow_missing":
            return ReqAllowMissing()
        if v == "allow_missing_or_failed":
            return ReqAllowMissingOrFailed()
        _known(v, names, path)
        return ReqProvider(v)
    if not isinstance(v, dict):
        raise ConfigError(path, "must be a provider name, allow_missing, allow_missing_or_failed, "
                                "or a mapping with any/all/provider")
    w.check_keys(v, ("any", "all", "provider", "audiences"), path)
    kind = w.one_of(v, ("any", "all", "provider"), path)
    if kind == "provider":
        n = w.string(v, "provider", path, nonempty=True)
        _known(n, names, w.join(path, "provider"))
        return ReqProvider(n, _str_list(v, "audiences", path) if "audiences" in v else None)
    if "audiences" in v:
        raise ConfigError(w.join(path, "audiences"), "only applies with provider")
    kp = w.join(path, kind)
    reqs = tuple(_requirement_native(x, w.join(kp, i), names)
                 for i, x in enumerate(w.seq(v, kind, path)))
    if not reqs:
        raise ConfigError(kp, "needs at least one requirement")
    if len(reqs) == 1:
        return reqs[0]
    return ReqAny(reqs) if kind == "any" else ReqAll(reqs)


def _rule_match_native(d: Any, path: str) -> RuleMatch:
    w.check_keys(d, ("prefix", "path", "regex", "path_separated_prefix", "case_sensitive",
                     "headers"), path)
    kind = w.one_of(d, ("prefix", "path", "regex", "path_separated_prefix"), path, required=False)
    cs = w.boolean(d, "case_sensitive", path, True)
    hp = w.join(path, "headers")
    headers = tuple(header_matcher_from_native(h, w.join(hp, i))
                    for i, h in enumerate(w.seq(d, "headers", path, [])))
    if kind is None:
        return RuleMatch("prefix", "/", headers=headers)
    if kind == "regex":
        rx = w.compile_regex(d["regex"], w.join(path, "regex"), 0 if cs else re.IGNORECASE)
        return RuleMatch("regex", regex=rx, headers=headers)
    v = w.string(d, kind, path)
    if not v.startswith("/"):
        raise ConfigError(w.join(path, kind), "must start with /")
    return RuleMatch(kind, v if cs else v.lower(), case_sensitive=cs, headers=headers)


def from_native(d: dict, path: str) -> JwtAuthnConfig:
    w.check_keys(d, ("providers", "rules", "requirements", "bypass_cors_preflight",
                     "strip_failure_response"), path)
    pp = w.join(path, "providers")
    pmap = w.mapping(d, "providers", path)
    if not pmap:
        raise ConfigError(pp, "needs at least one provider")
    providers = tuple(_provider_native(str(n), p, w.join(pp, n)) for n, p in pmap.items())
    names = {p.name for p in providers}
    rmap = []
    mp = w.join(path, "requirements")
    for n, r in w.mapping(d, "requirements", path, {}).items():
        rmap.append((str(n), _requirement_native(r, w.join(mp, n), names)))
    rules = []
    rp = w.join(path, "rules")
    for i, r in enumerate(w.seq(d, "rules", path, [])):
        p = w.join(rp, i)
        w.check_keys(r, ("match", "requires", "requirement"), p)
        if r.get("requires") is not None and r.get("requirement") is not None:
            raise ConfigError(p, "only one of requires, requirement may be set")
        m = _rule_match_native(w.mapping(r, "match", p, {}), w.join(p, "match"))
        req = None
        if r.get("requires") is not None:
            req = _requirement_native(r["requires"], w.join(p, "requires"), names)
        elif r.get("requirement") is not None:
            n = w.string(r, "requirement", p)
            if n not in dict(rmap):
                raise ConfigError(w.join(p, "requirement"), f"not in requirements: {n!r}")
            req = dict(rmap)[n]
        rules.append(Rule(m, req))
    return JwtAuthnConfig(
        providers=providers, rules=tuple(rules), requirement_map=tuple(rmap),
        bypass_cors_preflight=w.boolean(d, "bypass_cors_preflight", path, False),
        strip_failure_response=w.boolean(d, "strip_failure_response", path, False))


def per_route_from_native(d: Any, path: str) -> PerRoute:
    """``{disabled: true}`` | ``{requirement: <name in requirements>}`` | ``{requires: <req>}``.

    An inline ``requires`` is checked against the listener's providers when the route is built.
    """
    w.check_keys(d, ("disabled", "requirement", "requires"), path)
    kind = w.one_of(d, ("disabled", "requirement", "requires"), path)
    if kind == "disabled":
        if not w.boolean(d, "disabled", path):
            raise ConfigError(w.join(path, "disabled"), "must be true")
        return PerRoute(disabled=True)
    if kind == "requirement":
        return PerRoute(requirement_name=w.string(d, kind, path, nonempty=True))
    return PerRoute(requires=_requirement_native(d[kind], w.join(path, kind), _AnyName()))


class _AnyName(set):
    """Provider names are unknown when a route is parsed; checked again at build."""

    def __contains__(self, item: object) -> bool:
        return True


# =============================================================================================
# runtime state: JWKS stores, replay cache, verified-token cache
# =============================================================================================

class JwksFetchError(Exception):
    pass


class LocalJwks:
    __slots__ = ("keys",)
    remote = False

    def __init__(self, keys: KeySet):
        self.keys = keys

    def keys_now(self) -> KeySet | None:
        return self.keys


class RemoteJwksStore:
    """A remote JWKS with a TTL cache, background refresh before expiry, last-good-keys on
    failure, and bounded refetches (one in flight; unknown kid at most once per interval)."""

    remote = True

    def __init__(self, cfg: RemoteJwks, name: str, metrics: Any):
        self.cfg = cfg
        self.name = name
        self.keys: KeySet | None = None
        self.fetched_at = -math.inf        # monotonic time of the last good fetch
        self.refresh_at = -math.inf
        self.last_attempt = -math.inf
        self.last_failure = -math.inf
        self.fetches = 0                   # attempts (tests and the admin page read this)
        self._task: asyncio.Task | None = None
        fam = metrics.counter("sidecar_jwt_authn_jwks_fetches_total",
                              "Remote JWKS fetch attempts by provider and result",
                              ("provider", "result"))
        self._ok = fam.labels(name, "success")
        self._fail = fam.labels(name, "failure")
        self._nkeys = metrics.gauge("sidecar_jwt_authn_jwks_keys",
                                    "Verification keys held per provider", ("provider",)).labels(name)

    # -- reading ---------------------------------------------------------------------------
    def keys_now(self) -> KeySet | None:
        ks = self.keys
        if ks is not None and self._task is None:
            now = time.monotonic()
            if now >= self.refresh_at and now - self.last_failure >= self.cfg.failed_refetch_s:
                self.start_fetch()        # background; this request uses the current keys
        return ks

    async def wait_keys(self) -> KeySet | None:
        """No keys yet: join (or start) a fetch, unless the last one failed very recently."""
        if self.keys is not None:
            return self.keys
        if self._task is None:
            if time.monotonic() - self.last_failure < self.cfg.failed_refetch_s:
                return None
            self.start_fetch()
        await self._join()
        return self.keys

    async def refetch_for_unknown_kid(self) -> bool:
        """Fetch again for a kid we do not know, at most once per ``kid_refetch_interval``."""
        if self._task is not None:
            await self._join()
            return True
        if time.monotonic() - self.last_attempt < self.cfg.kid_refetch_interval_s:
            return False
        self.start_fetch()
        await self._join()
        return True

    async def _join(self) -> None:
        t = self._task
        if t is not None:
            try:
                await asyncio.shield(t)
            except asyncio.CancelledError:
                if t.cancelled():
                    return
                raise

    # -- fetching --------------------------------------------------------------------------
    def start_fetch(self) -> asyncio.Task | None:
        if self._task is not None:
            return self._task
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self.last_attempt = time.monotonic()
        self._task = loop.create_task(self._fetch(), name=f"jwks-fetch:{self.name}")
        self._task.add_done_callback(self._done)
        return self._task

    def _done(self, task: asyncio.Task) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover
            log.error("jwks fetch task for %s failed: %r", self.name, task.exception())

    async def _fetch(self) -> None:
        import aiohttp

        cfg = self.cfg
        err: BaseException | None = None
        delay = cfg.retry_base_s
        for attempt in range(cfg.num_retries + 1):
            self.fetches += 1
            try:
                timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
                async with aiohttp.ClientSession(timeout=timeout) as s:
                    async with s.get(cfg.uri, allow_redirects=False,
                                     headers={"accept": "application/json"}) as r:
                        if r.status != 200:
                            raise JwksFetchError(f"HTTP {r.status}")
                        body = await _read_limited(r.content, MAX_JWKS_BYTES)
                ks = parse_jwks(body)
            except asyncio.CancelledError:
                raise
            except Exception as e:   # noqa: BLE001 - any failure keeps the last good keys
                err = e
                self._fail.inc()
                if attempt < cfg.num_retries:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, cfg.retry_max_s)
                continue
            now = time.monotonic()
            if self.keys is None or self.keys.digest != ks.digest:
                self.keys = ks             # a new generation: cached verifications re-run
            self.fetched_at = now
            self.refresh_at = now + cfg.cache_duration_s * REFRESH_FRACTION
            self._ok.inc()
            self._nkeys.set(len(self.keys.keys))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("jwks for provider %s: %d keys", self.name, len(self.keys.keys))
            return
        self.last_failure = time.monotonic()
        if self.keys is not None:
            # keep serving the last good keys; try again after failed_refetch
            self.refresh_at = self.last_failure + cfg.failed_refetch_s
        log.warning("jwks fetch for provider %s failed (%s); %s", self.name,
                    type(err).__name__ if not isinstance(err, (JwksFetchError, ValueError))
                    else err,
                    "keeping the last good keys" if self.keys is not None else "no keys yet")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


async def _read_limited(stream: Any, limit: int) -> bytes:
    parts = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise JwksFetchError("JWKS response too large")
        parts.append(chunk)


class JwtState:
    """Kept across reloads: per-provider runtimes (token caches), JWKS stores, replay caches."""

    __slots__ = ("providers", "jwks", "replay", "metrics")

    def __init__(self, metrics: MetricFactory):
        self.metrics = metrics
        self.providers: dict[Provider, ProviderRuntime] = {}
        self.jwks: dict[tuple[str, RemoteJwks], RemoteJwksStore] = {}
        self.replay: dict[str, ReplayCache] = {}


def new_state(env: FilterEnv) -> JwtState:
    return JwtState(env.metrics)


def close_state(state: JwtState) -> None:
    """Cancel in-flight JWKS fetches (at process shutdown)."""
    for store in state.jwks.values():
        store.close()


class ReplayCache:
    """Seen ``jti`` values until their ``exp`` (+ skew), bounded; full means refuse (fail
    closed) rather than forget a one-time token that is still valid."""

    __slots__ = ("seen", "heap", "max_entries")

    def __init__(self, max_entries: int):
        self.seen: dict[str, float] = {}
        self.heap: list[tuple[float, str]] = []
        self.max_entries = max_entries

    def check_and_add(self, jti: str, until: float, now: float) -> Status | None:
        self._purge(now)
        t = self.seen.get(jti)
        if t is not None and t >= now:
            return REPLAYED
        if len(self.seen) >= self.max_entries:
            return REPLAY_FULL
        self.seen[jti] = until
        heapq.heappush(self.heap, (until, jti))
        return None

    def _purge(self, now: float) -> None:
        h = self.heap
        while h and h[0][0] < now:
            t, j = heapq.heappop(h)
            if self.seen.get(j) == t:
                del self.seen[j]


class CacheEntry:
    __slots__ = ("payload", "header", "exp", "gen", "aud", "jti", "payload_seg", "claim_headers")

    def __init__(self, payload, header, exp, gen, aud, jti, payload_seg, claim_headers):
        self.payload = payload
        self.header = header
        self.exp = exp
        self.gen = gen
        self.aud = aud
        self.jti = jti
        self.payload_seg = payload_seg
        self.claim_headers = claim_headers


class _Parsed:
    __slots__ = ("alg", "kid", "header", "payload", "signing_input", "sig", "exp", "aud",
                 "jti", "payload_seg")


def _b64url(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def _no_dupes(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate member")
    return d


def _json_obj(seg: str, bad_b64: Status, bad_json: Status) -> dict | Status:
    try:
        raw = _b64url(seg)
    except (binascii.Error, ValueError):
        return bad_b64
    try:
        obj = json.loads(raw, object_pairs_hook=_no_dupes)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return bad_json
    return obj if isinstance(obj, dict) else bad_json


_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-.]+")
# after the prefix: optional blanks, then the credential up to a blank or a comma (several
# Authorization values joined by "," keep only the first)
_CREDENTIAL = re.compile(r"[ \t]*([^ \t,]*)")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _claim_header_value(v: Any) -> str | None:
    if isinstance(v, str):
        s = v
    elif isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, int):
        s = str(v)
    elif isinstance(v, float):
        s = repr(v) if not v.is_integer() else str(int(v))
    elif isinstance(v, (list, dict)):    # as Envoy: base64 of the JSON
        return base64.b64encode(json.dumps(v, separators=(",", ":")).encode()).decode()
    else:
        return None
    if any(c in s for c in "\r\n\0"):
        return None
    return s


class ProviderRuntime:
    """Everything one provider needs per request: keys, caches, pre-bound counters."""

    def __init__(self, p: Provider, jwks: LocalJwks | RemoteJwksStore,
                 replay: ReplayCache | None, metrics: Any):
        self.p = p
        self.name = p.name
        self.jwks = jwks
        self.replay = replay
        self.cache: dict[str, CacheEntry] = {}
        fam = metrics.counter("sidecar_jwt_authn_verifications_total",
                              "JWT verifications by provider and outcome", ("provider", "outcome"))
        self.count = {o: fam.labels(p.name, o) for o in OUTCOMES}
        cf = metrics.counter("sidecar_jwt_authn_token_cache_total",
                             "Verified-token cache lookups by provider and result",
                             ("provider", "result"))
        self.hit = cf.labels(p.name, "hit")
        self.miss = cf.labels(p.name, "miss")
        self.missing_claims = {c: _missing_claim(c) for c in p.required_claims}
        self.aud_set = frozenset(p.audiences)
        self.locations = p.locations
        self.output_headers = tuple(
            ([p.forward_payload_header] if p.forward_payload_header else [])
            + [h for h, _ in p.claim_to_headers])

    # -- extraction ------------------------------------------------------------------------
    def extract(self, req: Request) -> list[tuple[str, TokenLocation]]:
        out: list[tuple[str, TokenLocation]] = []
        for loc in self.locations:
            tok = _extract_one(req, loc)
            if tok and not any(t == tok for t, _ in out):
                out.append((tok, loc))
        return out

    # -- verification ----------------------------------------------------------------------
    async def verify(self, token: str, audiences: frozenset | None) -> CacheEntry | Status:
        p = self.p
        if len(token) > p.max_token_bytes:
            return TOO_LARGE
        now = time.time()
        e = self.cache.get(token)
        if e is not None:
            ks = self.jwks.keys_now()       # also starts a background JWKS refresh when due
            if (e.exp is None or now <= e.exp + p.clock_skew_s) and ks is not None \
                    and e.gen == ks.generation:
                aud = self.aud_set if audiences is None else audiences
                if aud and not (e.aud and not aud.isdisjoint(e.aud)):
                    return AUDIENCE
                if self.replay is not None:
                    st = self.replay.check_and_add(e.jti, e.exp + p.clock_skew_s, now)
                    if st is not None:
                        return st
                self.hit.inc()
                return e
            del self.cache[token]
        self.miss.inc()
        parsed = self._precheck(token, now, audiences)
        if isinstance(parsed, Status):
            return parsed
        # keys (the only step that may wait on the network)
        jwks = self.jwks
        ks = jwks.keys_now()
        if ks is None:
            ks = await jwks.wait_keys()
            if ks is None:
                return JWKS_FETCH_FAILED
        cands = ks.candidates(parsed.kid, parsed.alg)
        if not cands and jwks.remote and parsed.kid is not None and not ks.knows_kid(parsed.kid):
            if await jwks.refetch_for_unknown_kid():
                ks = jwks.keys or ks
                cands = ks.candidates(parsed.kid, parsed.alg)
        if not cands:
            return ks.alg_mismatch_status(parsed.kid)
        algo = ALGORITHM[parsed.alg]
        for k in cands:
            try:
                if algo.verify(parsed.signing_input, k.key, parsed.sig):
                    break
            except Exception:   # noqa: BLE001 - malformed signature bytes etc.
                continue
        else:
            return BAD_SIGNATURE
        now = time.time()
        if self.replay is not None:
            st = self.replay.check_and_add(parsed.jti, parsed.exp + p.clock_skew_s, now)
            if st is not None:
                return st
        claim_headers = []
        for hname, cpath in p.claim_to_headers:
            v: Any = parsed.payload
            for key in cpath:
                v = v.get(key) if isinstance(v, dict) else None
            if v is not None:
                hv = _claim_header_value(v)
                if hv is not None:
                    claim_headers.append((hname, hv))
        self.count["ok"].inc()         # full verifications; cache hits count as cache "hit"
        e = CacheEntry(parsed.payload, parsed.header, parsed.exp, ks.generation, parsed.aud,
                       parsed.jti, parsed.payload_seg, tuple(claim_headers))
        if p.cache_size > 0 and len(token) <= p.cache_max_token_bytes:
            cache = self.cache
            if len(cache) >= p.cache_size:
                # evict the oldest entry (dicts keep insertion order)
                try:
                    del cache[next(iter(cache))]
                except (StopIteration, KeyError):  # pragma: no cover
                    pass
            cache[token] = e
        return e

    def _precheck(self, token: str, now: float,
                  audiences: frozenset | None) -> _Parsed | Status:
        """Everything that needs no key: structure, header, claims. Cheapest first."""
        p = self.p
        if _TOKEN_CHARS.fullmatch(token) is None:
            return BAD_FORMAT
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
            return BAD_FORMAT
        hseg, pseg, sseg = parts
        header = _json_obj(hseg, HEADER_BAD_B64, HEADER_BAD_JSON)
        if isinstance(header, Status):
            return header
        alg = header.get("alg")
        if not isinstance(alg, str):
            return ALG_MISSING
        if alg not in SUPPORTED_ALGS:
            return ALG_UNSUPPORTED         # includes "none"
        for k, st in FORBIDDEN_HEADER.items():
            if k in header:
                return st
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return KID_BAD
        payload = _json_obj(pseg, PAYLOAD_BAD_B64, PAYLOAD_BAD_JSON)
        if isinstance(payload, Status):
            return payload
        try:
            sig = _b64url(sseg)
        except (binascii.Error, ValueError):
            return SIG_BAD_B64
        # claim types
        exp = payload.get("exp")
        nbf = payload.get("nbf")
        iat = payload.get("iat")
        for n, v in (("exp", exp), ("nbf", nbf), ("iat", iat)):
            if v is not None and not _is_num(v):
                return CLAIM_TYPE[n]
        iss = payload.get("iss")
        for n in ("iss", "sub", "jti"):
            v = payload.get(n)
            if v is not None and not isinstance(v, str):
                return CLAIM_TYPE[n]
        aud = payload.get("aud")
        if aud is None:
            aud_t: tuple = ()
        elif isinstance(aud, str):
            aud_t = (aud,)
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            aud_t = tuple(aud)
        else:
            return CLAIM_TYPE["aud"]
        # issuer, time, audiences (Envoy's order), then our extra claim checks
        if p.issuer and iss != p.issuer:
            return UNKNOWN_ISSUER
        skew = p.clock_skew_s
        if exp is None:
            if p.require_expiration or p.max_lifetime_s is not None or self.replay is not None:
                return EXP_REQUIRED
        elif now > exp + skew:
            return EXPIRED
        if nbf is not None and nbf > now + skew:
            return NOT_YET_VALID
        if p.max_lifetime_s is not None and exp - now > p.max_lifetime_s + skew:
            return LIFETIME
        want = self.aud_set if audiences is None else audiences
        if want and want.isdisjoint(aud_t):
            return AUDIENCE
        if p.subjects is not None:
            sub = payload.get("sub")
            if sub is None or not p.subjects.matches(sub):
                return SUBJECT
        for c, st in self.missing_claims.items():
            if c not in payload:
                return st
        jti = payload.get("jti")
        if self.replay is not None and not jti:
            return JTI_REQUIRED
        r = _Parsed()
        r.alg, r.kid, r.header, r.payload = alg, kid, header, payload
        r.signing_input = (hseg + "." + pseg).encode("ascii")
        r.sig, r.exp, r.aud, r.jti, r.payload_seg = sig, exp, aud_t, jti, pseg
        return r

    # -- outputs ---------------------------------------------------------------------------
    def apply(self, req: Request, e: CacheEntry, loc: TokenLocation) -> None:
        p = self.p
        ctx = req.ctx
        ctx.jwt_payloads[self.name] = e.payload
        if p.payload_in_metadata:
            ctx.jwt_payloads[p.payload_in_metadata] = e.payload
        if p.header_in_metadata:
            ctx.metadata.setdefault(METADATA_NAMESPACE, {})[p.header_in_metadata] = e.header
        h = req.headers
        if p.forward_payload_header:
            seg = e.payload_seg
            if p.pad_forward_payload_header:
                seg += "=" * (-len(seg) % 4)
            h[p.forward_payload_header] = seg
        for name, value in e.claim_headers:
            h[name] = value
        if not p.forward:
            if loc.kind == "header":
                h.popall(loc.name, None)
            elif loc.kind == "query":
                req.query = _drop_query_param(req.query, loc.name)


def _extract_one(req: Request, loc: TokenLocation) -> str | None:
    if loc.kind == "header":
        v = req.headers.get(loc.name)
        if v is None:
            return None
        if loc.prefix:
            if not v.startswith(loc.prefix):
                return None
            start = len(loc.prefix)
        else:
            start = 0
        tok = v[start:] if start else v
        if " " in tok or "," in tok or "\t" in tok:
            m = _CREDENTIAL.match(v, start)
            tok = m.group(1) if m is not None else ""
        return tok or None
    if loc.kind == "query":
        q = req.query
        if not q or loc.name not in q:
            return None
        for part in q.split("&"):
            k, sep, val = part.partition("=")
            if sep and unquote(k) == loc.name:
                val = unquote(val)
                return val if _TOKEN_CHARS.fullmatch(val) else (val or None)
        return None
    cookie = req.headers.get("cookie")
    if not cookie or loc.name not in cookie:
        return None
    for part in cookie.split(";"):
        k, sep, val = part.strip().partition("=")
        if sep and k == loc.name:
            val = val.strip().strip('"')
            return val or None
    return None


def _drop_query_param(q: str, name: str) -> str:
    return "&".join(p for p in q.split("&")
                    if not (p.partition("=")[1] and unquote(p.partition("=")[0]) == name))


# =============================================================================================
# requirement evaluation
# =============================================================================================

class _Memo:
    """Per-request results, so one token verified by one provider is verified once."""

    __slots__ = ("results",)

    def __init__(self) -> None:
        self.results: dict = {}


async def _verify_and_apply(prt: ProviderRuntime, req: Request, tok: str, loc: TokenLocation,
                            aud: frozenset | None, memo: _Memo | None) -> Status | None:
    """Verify one token and apply its outputs. ``memo`` (composite requirements only) makes
    a token checked by several branches cost one verification."""
    if memo is not None:
        key = (id(prt), tok, aud)
        r = memo.results.get(key, memo)
        if r is not memo:
            return r
    res = await prt.verify(tok, aud)
    if res.__class__ is Status:
        prt.count[res.outcome].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("jwt provider %s: %s", prt.name, res.outcome)   # never the token
        if memo is not None:
            memo.results[key] = res
        return res
    prt.apply(req, res, loc)
    if memo is not None:
        memo.results[key] = None
    return None


class ProviderCheck:
    __slots__ = ("prt", "aud")

    def __init__(self, prt: ProviderRuntime, aud: frozenset | None):
        self.prt = prt
        self.aud = aud

    async def check(self, req: Request, memo: _Memo | None) -> Status | None:
        prt = self.prt
        toks = prt.extract(req)
        if not toks:
            prt.count["missing"].inc()
            return MISSING
        for tok, loc in toks:
            st = await _verify_and_apply(prt, req, tok, loc, self.aud, memo)
            if st is not None:
                return st
        return None


def _rank(st: Status) -> int:
    return 2 if st is MISSING else 1 if st is UNKNOWN_ISSUER else 0


class AnyCheck:
    __slots__ = ("children",)

    def __init__(self, children):
        self.children = children

    async def check(self, req: Request, memo: _Memo | None) -> Status | None:
        best: Status | None = None
        for c in self.children:
            st = await c.check(req, memo)
            if st is None:
                return None
            if best is None or _rank(st) < _rank(best):
                best = st
        return best


class AllCheck:
    __slots__ = ("children",)

    def __init__(self, children):
        self.children = children

    async def check(self, req: Request, memo: _Memo | None) -> Status | None:
        for c in self.children:
            st = await c.check(req, memo)
            if st is not None:
                return st
        return None


class AllowCheck:
    """allow_missing (a present token must verify with some provider) and
    allow_missing_or_failed (anything passes; valid tokens still produce outputs)."""

    __slots__ = ("prts", "failed_ok")

    def __init__(self, prts: list[ProviderRuntime], failed_ok: bool):
        self.prts = prts
        self.failed_ok = failed_ok

    async def check(self, req: Request, memo: _Memo | None) -> Status | None:
        found: dict[str, list] = {}
        for prt in self.prts:
            for tok, loc in prt.extract(req):
                found.setdefault(tok, []).append((prt, loc))
        for tok, cands in found.items():
            best: Status | None = None
            for prt, loc in cands:
                st = await _verify_and_apply(prt, req, tok, loc, None, memo)
                if st is None:
                    best = None
                    break
                if best is None or _rank(st) < _rank(best):
                    best = st
            if best is not None and not self.failed_ok:
                return best
        return None


# =============================================================================================
# the filter
# =============================================================================================

class JwtAuthnFilter(Filter):
    def __init__(self, cfg: JwtAuthnConfig, rules: list | None, fixed: Any,
                 strip: tuple[str, ...], metrics: Any):
        self.rules = rules            # [(RuleMatch, check-or-None)] when no per-route requirement
        self.fixed = fixed            # the per-route requirement's check
        self.strip = strip
        self.bypass_cors = cfg.bypass_cors_preflight
        self.strip_failure = cfg.strip_failure_response
        self.failed_status_key = {p.name: p.failed_status_in_metadata for p in cfg.providers
                                  if p.failed_status_in_metadata}
        fam = metrics.counter("sidecar_jwt_authn_requests_total",
                              "Requests seen by jwt_authn by outcome", ("stat_prefix", "outcome"))
        sp = cfg.stat_prefix
        self._allowed = fam.labels(sp, "allowed")
        self._denied = fam.labels(sp, "denied")
        self._cors = fam.labels(sp, "cors_preflight_bypassed")

    async def __call__(self, req: Request, next) -> Response:
        h = req.headers
        for name in self.strip:          # a client never gets to set our output headers
            if name in h:
                h.popall(name)
        if self.bypass_cors and req.method == "OPTIONS" and "origin" in h \
                and "access-control-request-method" in h:
            self._cors.inc()
            return await next(req)
        check = self.fixed
        if check is None:
            for m, c in self.rules:
                if m.matches(req):
                    check = c
                    break
            if check is None:
                return await next(req)
        st = await check.check(req, None if check.__class__ is ProviderCheck else _Memo())
        if st is None:
            self._allowed.inc()
            return await next(req)
        self._denied.inc()
        return self._reject(req, st)

    def _reject(self, req: Request, st: Status) -> Response:
        ctx = req.ctx
        ctx.response_code_details = st.details
        if self.failed_status_key:
            for key in self.failed_status_key.values():
                ctx.metadata.setdefault(METADATA_NAMESPACE, {})[key] = {
                    "code": st.code, "message": st.message}
        if self.strip_failure:
            resp = local_reply(ctx, st.code, "", FLAG, MultiDict())
            resp.headers.popall("content-type", None)
            return resp
        host = req.headers.get("host", "")
        scheme = "https" if ctx.tls else "http"
        realm = _quote(f"{scheme}://{host}{req.path[:2048]}")
        www = f'Bearer realm="{realm}"'
        if st is not MISSING:
            www += ', error="invalid_token"'
        return local_reply(ctx, st.code, st.message, FLAG, MultiDict({"www-authenticate": www}))

    def close(self) -> None:
        pass


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


# ---- building --------------------------------------------------------------------------------

_MAX_PROVIDER_STATES = 256


def provider_runtime(p: Provider, st: JwtState) -> ProviderRuntime:
    """Shared by every route and kept across reloads while the provider config is unchanged
    (so its token cache and JWKS survive); a changed provider gets fresh caches."""
    prts = st.providers
    prt = prts.get(p)
    if prt is not None:
        prts[p] = prts.pop(p)            # LRU touch
        return prt
    if p.remote is not None:
        jkey = (p.name, p.remote)
        jwks = st.jwks.get(jkey)
        if jwks is None:
            jwks = st.jwks[jkey] = RemoteJwksStore(p.remote, p.name, st.metrics)
        if p.remote.fetch_at_start and jwks.keys is None:
            jwks.start_fetch()
    else:
        jwks = LocalJwks(p.local_keys)
    replay = None
    if p.jti_replay:
        rkey = p.issuer or p.name        # survives reloads: a reload must not allow replays
        replay = st.replay.get(rkey)
        if replay is None or replay.max_entries != p.jti_cache_size:
            old = replay
            replay = st.replay[rkey] = ReplayCache(p.jti_cache_size)
            if old is not None:
                replay.seen, replay.heap = old.seen, old.heap
    prt = ProviderRuntime(p, jwks, replay, st.metrics)
    prts[p] = prt
    while len(prts) > _MAX_PROVIDER_STATES:
        del prts[next(iter(prts))]
    return prt


def _compile(req: Requirement, prts: dict[str, ProviderRuntime], path: str) -> Any:
    if isinstance(req, ReqProvider):
        prt = prts.get(req.name)
        if prt is None:
            raise ConfigError(path, f"unknown jwt_authn provider {req.name!r}")
        return ProviderCheck(prt, frozenset(req.audiences) if req.audiences is not None else None)
    if isinstance(req, ReqAny):
        return AnyCheck(tuple(_compile(c, prts, path) for c in req.children))
    if isinstance(req, ReqAll):
        return AllCheck(tuple(_compile(c, prts, path) for c in req.children))
    return AllowCheck(list(prts.values()), isinstance(req, ReqAllowMissingOrFailed))


def build(config: JwtAuthnConfig, per_route: PerRoute | None, state: JwtState,
          env: FilterEnv, route: RouteInfo) -> JwtAuthnFilter | None:
    if per_route is not None and per_route.disabled:
        return None
    prts = {p.name: provider_runtime(p, state) for p in config.providers}
    strip = tuple(dict.fromkeys(h for prt in prts.values() for h in prt.output_headers))
    rname = getattr(route, "name", "") or "?"
    fixed = None
    rules = None
    if per_route is not None:
        req = per_route.requires
        if per_route.requirement_name:
            req = dict(config.requirement_map).get(per_route.requirement_name)
            if req is None:
                raise ConfigError(f"route {rname}: jwt_authn.requirement_name",
                                  f"not in requirement_map: {per_route.requirement_name!r}")
        fixed = _compile(req, prts, f"route {rname}: jwt_authn.requires")
    else:
        rules = [(r.match, _compile(r.requires, prts, "jwt_authn.rules")
                  if r.requires is not None else None) for r in config.rules]
        if not any(c is not None for _, c in rules) and not strip:
            return None                  # nothing to verify or strip on this route
    return JwtAuthnFilter(config, rules, fixed, strip, state.metrics)


SPEC = FilterSpec(
    name="envoy.filters.http.jwt_authn",
    short="jwt_authn",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
    close_state=close_state,
)
