"""Mint demo JWTs and make key pairs for the jwt_authn filter (PyJWT + cryptography).

    python -m sidecar.jwt_tool keygen --out examples/jwt --kind ec --kid demo-1
    python -m sidecar.jwt_tool mint --key examples/jwt/demo-key.pem --kid demo-1 \\
        --iss https://demo.sidecar.local --aud demo-api --sub alice --claim groups=admin,dev

For local development and tests only: a real deployment gets its tokens from its identity
provider. The algorithm follows the key (RSA: RS256, EC P-256/384/521: ES256/384/512,
Ed25519: EdDSA, ``--secret``: HS256), as the filter does when verifying.

``add_parser(subparsers)`` lets the ``sidecar`` CLI expose this as ``sidecar token ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

_EC_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def _parse_ttl(s: str) -> int:
    s = s.strip()
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def load_private_key(path: str) -> Any:
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def algorithm_for(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _EC_ALG[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def public_jwk(key: Any, kid: str) -> dict:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        d = json.loads(RSAAlgorithm.to_jwk(pub))
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        d = json.loads(ECAlgorithm.to_jwk(pub))
    else:
        d = json.loads(OKPAlgorithm.to_jwk(pub))
    d.update(kid=kid, use="sig", alg=algorithm_for(key))
    return d


def generate_keys(out_dir: str, kind: str = "ec", kid: str = "demo-1") -> tuple[str, str]:
    """Write ``demo-key.pem`` (private, mode 0600) and ``jwks.json`` (public) to ``out_dir``."""
    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError("kind must be rsa, ec or ed25519")
    os.makedirs(out_dir, exist_ok=True)
    key_path = os.path.join(out_dir, "demo-key.pem")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    jwks_path = os.path.join(out_dir, "jwks.json")
    with open(jwks_path, "w") as f:
        json.dump({"keys": [public_jwk(key, kid)]}, f, indent=2)
        f.write("\n")
    return key_path, jwks_path


def _claim_value(v: str) -> Any:
    if "," in v:
        return [x for x in v.split(",") if x]
    if v in ("true", "false"):
        return v == "true"
    try:
        return int(v)
    except ValueError:
        return v


def mint(*, key: Any = None, secret: str | None = None, kid: str | None = None,
         iss: str = "", aud: str | None = None, sub: str | None = None, ttl: int = 3600,
         claims: dict | None = None, jti: bool = False, nbf: int | None = None) -> str:
    """A signed token. ``key`` is a private key object (asymmetric) or ``secret`` (HS256)."""
    now = int(time.time())
    payload: dict = {"iat": now, "exp": now + ttl}
    if iss:
        payload["iss"] = iss
    if aud:
        payload["aud"] = aud
    if sub:
        payload["sub"] = sub
    if nbf is not None:
        payload["nbf"] = nbf
    if jti:
        payload["jti"] = uuid.uuid4().hex
    payload.update(claims or {})
    headers = {"kid": kid} if kid else None
    if secret is not None:
        return jwt.encode(payload, secret, algorithm="HS256", headers=headers)
    return jwt.encode(payload, key, algorithm=algorithm_for(key), headers=headers)


def add_parser(sub: Any, name: str = "token") -> argparse.ArgumentParser:
    """Register ``<name> mint`` and ``<name> keygen`` on an argparse subparsers object; the
    chosen command's handler is ``args.func(args) -> exit code``."""
    p = sub.add_parser(name, help="mint demo JWTs and key pairs (local development only)")
    add_commands(p.add_subparsers(dest="token_cmd", required=True))
    return p


def add_commands(tsub: Any) -> None:
    m = tsub.add_parser("mint", help="print a signed JWT")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--key", help="PEM private key (RSA, EC or Ed25519)")
    src.add_argument("--secret", help="shared secret for HS256 (>= 32 bytes)")
    m.add_argument("--kid", help="key id header (match the JWKS kid)")
    m.add_argument("--iss", default="", help="issuer")
    m.add_argument("--aud", help="audience")
    m.add_argument("--sub", help="subject")
    m.add_argument("--ttl", default="1h", help="lifetime, e.g. 300, 15m, 1h (default 1h)")
    m.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE",
                   help="extra claim; a,b makes a list; repeatable")
    m.add_argument("--jti", action="store_true", help="add a random jti (one-time tokens)")
    m.set_defaults(func=_cmd_mint)
    k = tsub.add_parser("keygen", help="write demo-key.pem and jwks.json")
    k.add_argument("--out", required=True, help="directory")
    k.add_argument("--kind", default="ec", choices=("ec", "rsa", "ed25519"))
    k.add_argument("--kid", default="demo-1")
    k.set_defaults(func=_cmd_keygen)


def _cmd_mint(args: argparse.Namespace) -> int:
    claims = {}
    for c in args.claim:
        name, sep, value = c.partition("=")
        if not sep or not name:
            print(f"--claim {c!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        claims[name] = _claim_value(value)
    key = load_private_key(args.key) if args.key else None
    print(mint(key=key, secret=args.secret, kid=args.kid, iss=args.iss, aud=args.aud, sub=args.sub,
               ttl=_parse_ttl(args.ttl), claims=claims, jti=args.jti))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    key_path, jwks_path = generate_keys(args.out, args.kind, args.kid)
    print(f"wrote {key_path} (private, keep it secret) and {jwks_path} (public JWKS)")
    return 0


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.jwt_tool")
    add_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
