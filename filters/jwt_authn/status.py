"""Outcomes of a JWT check: Envoy's status texts (the response body and code details) and our
outcome label (for metrics). A check returns ``None`` (passed) or one of these."""

from __future__ import annotations

from dataclasses import dataclass


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
REPLAY_UNAVAILABLE = Status(401, "Jwt replay check is unavailable", "replay_store_unavailable")

OUTCOMES = ("ok", "missing", "too_large", "malformed", "unsupported_alg", "forbidden_header",
            "wrong_issuer", "expired", "not_yet_valid", "exp_required", "lifetime_exceeded",
            "audience_mismatch", "subject_mismatch", "missing_claim", "jti_required",
            "unknown_kid", "key_alg_mismatch", "jwks_fetch_failed", "bad_signature", "replayed",
            "replay_cache_full", "replay_store_unavailable")


def missing_claim(name: str) -> Status:
    return Status(401, f"Jwt payload is missing required claim [{name}]", "missing_claim")
