"""Token checks for one provider, cheapest first (docs/security.md, "What a request goes
through"):

1. size limit; verified-token cache (same token, same key-set generation, not expired: no
   parsing, no crypto);
2. structure (three base64url segments), header JSON (``alg`` supported and never ``none``;
   ``jku``/``x5u``/``jwk``/``x5c``/``crit``/``b64`` refused), payload JSON, claim types;
3. issuer, time (``exp``/``nbf`` with clock skew, ``max_lifetime``), audiences (403),
   subjects, required claims, ``jti`` present under replay protection - before any key is
   fetched;
4. keys (local, or the remote JWKS: the only step that may wait on the network), then the
   signature (PyJWT's algorithm objects over ``cryptography``);
5. ``jti`` replay check, then the cache entry and its outputs.

No token or secret is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass

from filters.jwt_authn.config import METADATA_NAMESPACE, Provider, TokenLocation
from filters.jwt_authn.extract import TOKEN_CHARS, extract, remove
from filters.jwt_authn.jwks import KeyStore
from filters.jwt_authn.keys import ALGORITHM, SUPPORTED_ALGS
from filters.jwt_authn.replay import ReplayCheck
from filters.jwt_authn.status import (
    ALG_MISSING,
    ALG_UNSUPPORTED,
    AUDIENCE,
    BAD_FORMAT,
    BAD_SIGNATURE,
    CLAIM_TYPE,
    EXP_REQUIRED,
    EXPIRED,
    FORBIDDEN_HEADER,
    HEADER_BAD_B64,
    HEADER_BAD_JSON,
    JTI_REQUIRED,
    JWKS_FETCH_FAILED,
    KID_BAD,
    LIFETIME,
    NOT_YET_VALID,
    OUTCOMES,
    PAYLOAD_BAD_B64,
    PAYLOAD_BAD_JSON,
    SIG_BAD_B64,
    SUBJECT,
    TOO_LARGE,
    UNKNOWN_ISSUER,
    Status,
    missing_claim,
)
from sidecar.core.context import JsonValue
from sidecar.core.message import Request
from sidecar.core.metrics import MetricFactory

JsonObject = dict[str, JsonValue]


@dataclass(slots=True)
class CacheEntry:
    """A verified token: what its outputs need, and what decides whether it may be reused."""

    payload: JsonObject
    header: JsonObject
    exp: float | None
    gen: int                              # key-set generation it was verified with
    aud: tuple[str, ...]
    jti: str | None
    payload_seg: str
    claim_headers: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Parsed:
    """A token that passed every check that needs no key."""

    alg: str
    kid: str | None
    header: JsonObject
    payload: JsonObject
    signing_input: bytes
    sig: bytes
    exp: float | None
    aud: tuple[str, ...]
    jti: str | None
    payload_seg: str


def _b64url(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def _no_dupes(pairs: list[tuple[str, JsonValue]]) -> JsonObject:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate member")
    return d


def _json_obj(seg: str, bad_b64: Status, bad_json: Status) -> JsonObject | Status:
    try:
        raw = _b64url(seg)
    except (binascii.Error, ValueError):
        return bad_b64
    try:
        obj = json.loads(raw, object_pairs_hook=_no_dupes)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return bad_json
    return obj if isinstance(obj, dict) else bad_json


def _number(v: JsonValue) -> float | None:
    """A finite JSON number (not a boolean), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return v
    return None


def claim_header_value(v: JsonValue) -> str | None:
    """A claim as a header value (lists and objects: base64 of their JSON, as Envoy); None
    when it cannot be one."""
    if isinstance(v, str):
        s = v
    elif isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, int):
        s = str(v)
    elif isinstance(v, float):
        s = repr(v) if not v.is_integer() else str(int(v))
    elif isinstance(v, (list, dict)):
        return base64.b64encode(json.dumps(v, separators=(",", ":")).encode()).decode()
    else:
        return None
    if any(c in s for c in "\r\n\0"):
        return None
    return s


class ProviderRuntime:
    """Everything one provider needs per request: keys, caches, pre-bound counters. Shared by
    every route, kept across reloads while the provider's config is unchanged."""

    def __init__(self, p: Provider, jwks: KeyStore, replay: ReplayCheck | None,
                 metrics: MetricFactory):
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
        self.missing_claims = {c: missing_claim(c) for c in p.required_claims}
        self.aud_set = frozenset(p.audiences)
        self.locations = p.locations
        self.output_headers = tuple(
            ([p.forward_payload_header] if p.forward_payload_header else [])
            + [h for h, _ in p.claim_to_headers])

    def extract(self, req: Request) -> list[tuple[str, TokenLocation]]:
        return extract(req, self.locations)

    async def _replay(self, jti: str | None, exp: float | None, now: float) -> Status | None:
        replay = self.replay
        if replay is None:
            return None
        if jti is None or exp is None:      # precheck refuses these under replay protection
            return JTI_REQUIRED if jti is None else EXP_REQUIRED
        remote = replay.remote
        if remote is None:
            return replay.check(jti, exp + self.p.clock_skew_s, now)
        return await replay.check_remote(remote, jti, exp + self.p.clock_skew_s, now)

    async def verify(self, token: str, audiences: frozenset[str] | None) -> CacheEntry | Status:
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
                    st = await self._replay(e.jti, e.exp, now)
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
        if self.replay is not None:
            st = await self._replay(parsed.jti, parsed.exp, time.time())
            if st is not None:
                return st
        claim_headers = []
        for hname, cpath in p.claim_to_headers:
            v: JsonValue = parsed.payload
            for key in cpath:
                v = v.get(key) if isinstance(v, dict) else None
            if v is not None:
                hv = claim_header_value(v)
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

    def _precheck(self, token: str, now: float, audiences: frozenset[str] | None) -> Parsed | Status:
        """Everything that needs no key: structure, header, claims. Cheapest first."""
        p = self.p
        if TOKEN_CHARS.fullmatch(token) is None:
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
        times: list[float | None] = []
        for n in ("exp", "nbf", "iat"):
            v = payload.get(n)
            t = _number(v)
            if v is not None and t is None:
                return CLAIM_TYPE[n]
            times.append(t)
        exp, nbf, _ = times
        for n in ("iss", "sub", "jti"):
            v = payload.get(n)
            if v is not None and not isinstance(v, str):
                return CLAIM_TYPE[n]
        aud = payload.get("aud")
        aud_t: tuple[str, ...]
        if aud is None:
            aud_t = ()
        elif isinstance(aud, str):
            aud_t = (aud,)
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            aud_t = tuple(str(a) for a in aud)
        else:
            return CLAIM_TYPE["aud"]
        # issuer, time, audiences (Envoy's order), then our extra claim checks
        if p.issuer and payload.get("iss") != p.issuer:
            return UNKNOWN_ISSUER
        skew = p.clock_skew_s
        if exp is None:
            if p.require_expiration or p.max_lifetime_s is not None or self.replay is not None:
                return EXP_REQUIRED
        elif now > exp + skew:
            return EXPIRED
        if nbf is not None and nbf > now + skew:
            return NOT_YET_VALID
        if p.max_lifetime_s is not None and exp is not None \
                and exp - now > p.max_lifetime_s + skew:
            return LIFETIME
        want = self.aud_set if audiences is None else audiences
        if want and want.isdisjoint(aud_t):
            return AUDIENCE
        if p.subjects is not None:
            sub = payload.get("sub")
            if not isinstance(sub, str) or not p.subjects.matches(sub):
                return SUBJECT
        for c, st in self.missing_claims.items():
            if c not in payload:
                return st
        jti = payload.get("jti")
        if self.replay is not None and not jti:
            return JTI_REQUIRED
        return Parsed(alg=alg, kid=kid, header=header, payload=payload,
                      signing_input=(hseg + "." + pseg).encode("ascii"), sig=sig, exp=exp,
                      aud=aud_t, jti=jti if isinstance(jti, str) else None, payload_seg=pseg)

    def apply(self, req: Request, e: CacheEntry, loc: TokenLocation) -> None:
        """A verified token's outputs: payload (and header) metadata, forwarded headers."""
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
            else:
                remove(req, loc)
