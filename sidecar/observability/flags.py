"""Envoy's response flags: the short codes, their long names, and the order Envoy prints them in.

Envoy keeps the flags of a stream as a bit set and prints them in the bit order below (the
``ResponseFlags`` message's field order), each once; ``ctx.flags`` is the list of flags in the
order they occurred, so every printer goes through ``flags_text``.
"""

from __future__ import annotations

# short code -> long name, in Envoy's printing order
RESPONSE_FLAGS: dict[str, str] = {
    "LH": "FailedLocalHealthCheck", "UH": "NoHealthyUpstream", "UT": "UpstreamRequestTimeout",
    "LR": "LocalReset", "UR": "UpstreamRemoteReset", "UF": "UpstreamConnectionFailure",
    "UC": "UpstreamConnectionTermination", "UO": "UpstreamOverflow", "NR": "NoRouteFound",
    "DI": "DelayInjected", "FI": "FaultInjected", "RL": "RateLimited",
    "UAEX": "UnauthorizedExternalService", "RLSE": "RateLimitServiceError",
    "DC": "DownstreamConnectionTermination", "URX": "UpstreamRetryLimitExceeded",
    "SI": "StreamIdleTimeout", "IH": "InvalidEnvoyRequestHeaders",
    "DPE": "DownstreamProtocolError", "UMSDR": "UpstreamMaxStreamDurationReached",
    "RFCF": "ResponseFromCacheFilter", "NFCF": "NoFilterConfigFound", "DT": "DurationTimeout",
    "UPE": "UpstreamProtocolError", "NC": "NoClusterFound", "OM": "OverloadManagerTerminated",
    "DF": "DnsResolutionFailed", "DO": "DropOverload", "DR": "DownstreamRemoteReset",
    "FE": "FilterError",    # not Envoy's: a user filter raised (filters/python.py); printed last
}
# flags that may be a metric label value; anything else is "other", so a bug or a new filter
# cannot create unbounded label values
KNOWN_FLAGS = frozenset(RESPONSE_FLAGS)
_ORDER = {flag: i for i, flag in enumerate(RESPONSE_FLAGS)}


def envoy_order(flags: list[str]) -> list[str]:
    """The flags once each, in Envoy's printing order (unknown ones last, as they occurred)."""
    if len(flags) < 2:
        return flags
    seen: dict[str, None] = dict.fromkeys(flags)
    return sorted(seen, key=lambda f: _ORDER.get(f, len(_ORDER)))


def flags_text(flags: list[str]) -> str:
    """``%RESPONSE_FLAGS%``: ``UF,URX``; ``-`` when there are none (even in JSON, as Envoy)."""
    return ",".join(envoy_order(flags)) or "-"


def flags_long_text(flags: list[str]) -> str:
    """``%RESPONSE_FLAGS_LONG%``."""
    return ",".join(RESPONSE_FLAGS.get(f, f) for f in envoy_order(flags)) or "-"
