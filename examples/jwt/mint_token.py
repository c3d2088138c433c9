"""Mint a token that examples/jwt/sidecar.yaml (and envoy.yaml) accept.

    python examples/jwt/mint_token.py --sub alice --groups admin       # prints the JWT
    python examples/jwt/mint_token.py --sub bob --ttl 5m

Signed with the demo key next to this file (ES256, kid demo-1). The same tool for any key:
``python -m sidecar.jwt_tool mint --key KEY.pem --kid KID --iss ... --aud ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # run from a checkout

from sidecar.cli import token as jwt_tool  # noqa: E402

ISSUER = "https://demo.sidecar.local"
AUDIENCE = "demo-api"
KID = "demo-1"
KEY = os.path.join(HERE, "demo-key.pem")


def mint(sub: str = "alice", groups: list[str] | None = None, ttl: int = 3600, **claims) -> str:
    if groups:
        claims["groups"] = groups
    return jwt_tool.mint(key=jwt_tool.load_private_key(KEY), kid=KID, iss=ISSUER, aud=AUDIENCE,
                         sub=sub, ttl=ttl, claims=claims)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sub", default="alice")
    ap.add_argument("--groups", default="", help="comma-separated, e.g. admin,dev")
    ap.add_argument("--ttl", default="1h", help="e.g. 300, 15m, 1h")
    a = ap.parse_args(argv)
    print(mint(a.sub, [g for g in a.groups.split(",") if g], jwt_tool._parse_ttl(a.ttl)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
