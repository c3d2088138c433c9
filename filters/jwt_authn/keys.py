"""Verification keys: the algorithm comes from the key, never from the token.

A key set is parsed once (local JWKS / PEM / secret at config time, a remote JWKS per fetch)
into ``VerifyKey`` objects that carry the algorithms they may verify, fixed from the key itself
(JWK ``kty``/``crv``/``alg``; PEM key type; secret length). A token's ``alg`` only selects
among those. See docs/security.md, "Keys".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import (
    Algorithm,
    ECAlgorithm,
    HMACAlgorithm,
    OKPAlgorithm,
    RSAAlgorithm,
    get_default_algorithms,
)

from filters.jwt_authn.status import KEY_MISMATCH, NO_KEY, Status

MAX_JWKS_KEYS = 100
MAX_CANDIDATE_KEYS = 8
MIN_RSA_BITS = 2048
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

PublicKey = (rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
             | ed448.Ed448PublicKey)
KeyMaterial = PublicKey | bytes
"""What PyJWT's algorithm objects verify with (bytes: an HMAC secret)."""

_ALGS = get_default_algorithms()
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
EC_CURVE_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
EC_KEY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
SUPPORTED_ALGS = RSA_ALGS | HMAC_ALGS | frozenset(EC_CURVE_ALG.values()) | {"EdDSA"}
ALGORITHM: dict[str, Algorithm] = {name: _ALGS[name] for name in SUPPORTED_ALGS}
_generation = itertools.count(1)


class VerifyKey:
    """One verification key and the algorithms it may verify (never chosen by the token)."""

    __slots__ = ("kid", "algs", "key", "kty", "explicit_alg")

    def __init__(self, kid: str | None, algs: frozenset[str], key: KeyMaterial, kty: str,
                 explicit_alg: bool = False):
        self.kid = kid
        self.algs = algs
        self.key = key
        self.kty = kty
        self.explicit_alg = explicit_alg    # the JWK named its alg (else: its kty family)

    def __repr__(self) -> str:   # never the key material
        return f"VerifyKey(kid={self.kid!r}, kty={self.kty}, algs={sorted(self.algs)})"


class KeySet:
    """Keys by ``kid``; each set gets a new ``generation`` (cached verifications name it)."""

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

    def alg_mismatch_status(self, kid: str | None) -> Status:
        """No candidate: as Envoy, a key that matched by kid but has no JWK ``alg`` counts as
        a failed verification; keys excluded by their explicit ``alg`` mean "no key"."""
        keys = self.keys if kid is None else tuple(self.by_kid.get(kid, ())) + self.kidless
        return KEY_MISMATCH if any(not k.explicit_alg for k in keys) else NO_KEY


def _hmac_algs(secret: bytes, alg: str | None) -> frozenset[str]:
    if alg is not None:
        if len(secret) < HMAC_MIN_BYTES[alg]:
            raise ValueError(f"{alg} key must be at least {HMAC_MIN_BYTES[alg]} bytes")
        return frozenset({alg})
    algs = frozenset(a for a, n in HMAC_MIN_BYTES.items() if len(secret) >= n)
    if not algs:
        raise ValueError("HMAC key must be at least 32 bytes (RFC 7518 3.2)")
    return algs


def _rsa_public(jwk: dict[str, object]) -> rsa.RSAPublicKey:
    key = RSAAlgorithm.from_jwk(jwk)
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    if pub.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key shorter than {MIN_RSA_BITS} bits")
    return pub


def _ec_public(jwk: dict[str, object]) -> ec.EllipticCurvePublicKey:
    key = ECAlgorithm.from_jwk(jwk)
    return key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key


def _okp_public(jwk: dict[str, object]) -> ed25519.Ed25519PublicKey | ed448.Ed448PublicKey:
    key = OKPAlgorithm.from_jwk(jwk)
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key.public_key()
    return key


def _jwk_to_key(jwk: object) -> VerifyKey | None:
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
    key: PublicKey
    if kty == "RSA":
        key = _rsa_public(jwk)
        family = RSA_ALGS
    elif kty == "EC":
        crv = jwk.get("crv")
        want = EC_CURVE_ALG.get(crv) if isinstance(crv, str) else None
        if want is None:
            raise ValueError(f"unsupported EC curve {crv!r}")
        key = _ec_public(jwk)
        family = frozenset({want})
    elif kty == "OKP":
        if jwk.get("crv") not in ("Ed25519", "Ed448"):
            raise ValueError(f"unsupported OKP curve {jwk.get('crv')!r}")
        key = _okp_public(jwk)
        family = frozenset({"EdDSA"})
    elif kty == "oct":
        secret = HMACAlgorithm.from_jwk(jwk)
        if alg is not None and alg not in HMAC_ALGS:
            raise ValueError(f"alg {alg} does not fit kty oct")
        return VerifyKey(kid, _hmac_algs(secret, alg), secret, "oct", alg is not None)
    else:
        raise ValueError(f"unsupported kty {kty!r}")
    if alg is not None:
        if alg not in family:
            raise ValueError(f"alg {alg} does not fit kty {kty}")
        family = frozenset({alg})
    return VerifyKey(kid, family, key, kty, alg is not None)


def _public_key_to_key(key: object, kid: str | None = None) -> VerifyKey:
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


def _pem_keys(raw: bytes) -> list[VerifyKey]:
    keys = []
    for m in _PEM_BLOCK.finditer(raw):
        kind = m.group(1)
        pk: object
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
    return keys


def parse_jwks(data: str | bytes | dict[str, object]) -> KeySet:
    """A JWKS (``{"keys": [...]}``), a single JWK, or PEM public keys/certificates -> KeySet.

    Keys that cannot verify signatures (``use: enc``, unknown ``kty``, short keys) are skipped;
    a set without any usable key is an error (``ValueError`` with a reason, never key bytes).
    """
    obj: object
    if isinstance(data, dict):
        raw = json.dumps(data, sort_keys=True).encode()
        obj = data
    else:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if raw.lstrip().startswith(b"-----BEGIN"):
            return KeySet(_pem_keys(raw), hashlib.sha256(raw).hexdigest())
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise ValueError("JWKS is not valid JSON") from None
    digest = hashlib.sha256(raw).hexdigest()
    items: object
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
    keys: list[VerifyKey] = []
    skipped = 0
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
