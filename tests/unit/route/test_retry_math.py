"""Property tests for the retry arithmetic (backoff, budget) and the retry decisions/config."""

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from control_plane_client.translate.route import retry_policy_from_envoy
from sidecar.cluster.breakers import retry_allowed, retry_limit
from sidecar.config.errors import ConfigError
from sidecar.config.native.route import retry_policy_from_native
from sidecar.core.backoff import backoff_ceiling, backoff_delay
from sidecar.route.retry import RetryPolicy, error_is_retriable, request_overrides, status_is_retriable

durations = st.floats(min_value=0.0001, max_value=60.0, allow_nan=False)
unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


# ---- backoff: exponential with full jitter ----------------------------------------------------

@given(attempt=st.integers(min_value=-3, max_value=200), base=durations, cap=durations, r=unit)
def test_backoff_is_within_zero_and_the_capped_exponential(attempt, base, cap, r):
    d = backoff_delay(attempt, base, cap, r)
    ceiling = min(cap, base * 2 ** min(max(attempt, 0), 30))
    assert 0.0 <= d <= ceiling + 1e-12
    assert d <= cap + 1e-12
    assert backoff_ceiling(attempt, base, cap) == pytest.approx(ceiling)


@given(attempt=st.integers(min_value=0, max_value=100), base=durations, cap=durations)
def test_backoff_ceiling_never_shrinks_as_attempts_grow(attempt, base, cap):
    assert backoff_ceiling(attempt + 1, base, cap) >= backoff_ceiling(attempt, base, cap)


@given(attempt=st.integers(min_value=0, max_value=100), base=durations, cap=durations,
       r1=unit, r2=unit)
def test_backoff_is_monotonic_in_the_random_draw(attempt, base, cap, r1, r2):
    lo, hi = sorted((r1, r2))
    assert backoff_delay(attempt, base, cap, lo) <= backoff_delay(attempt, base, cap, hi)


@given(base=durations, cap=durations)
def test_backoff_full_jitter_reaches_zero_and_the_ceiling(base, cap):
    assert backoff_delay(3, base, cap, 0.0) == 0.0
    assert backoff_delay(3, base, cap, 0.999999) == pytest.approx(backoff_ceiling(3, base, cap), rel=1e-5)


def test_backoff_full_jitter_is_uniform_on_average():
    rng = random.Random(7)
    samples = [backoff_delay(2, 0.025, 0.25, rng.random()) for _ in range(4000)]
    assert statistics.mean(samples) == pytest.approx(0.05, rel=0.05)     # ceiling 0.1 / 2
    assert max(samples) <= 0.1


# ---- budget / max_retries -------------------------------------------------------------------

@given(active=st.integers(min_value=0, max_value=100_000), pct=st.floats(min_value=0, max_value=100),
       mrc=st.integers(min_value=0, max_value=1000), max_retries=st.integers(min_value=0, max_value=1000))
def test_budget_limit_is_the_share_of_active_requests_with_a_floor(active, pct, mrc, max_retries):
    lim = retry_limit(active, max_retries, pct, mrc)
    assert lim >= mrc
    assert lim == max(mrc, int(active * pct / 100.0))
    assert lim <= max(mrc, active * pct / 100.0)         # never above the budgeted share
    # a budget replaces the max_retries threshold entirely (Envoy)
    assert lim == retry_limit(active, max_retries + 5, pct, mrc)


@given(active=st.integers(min_value=0, max_value=10_000), more=st.integers(min_value=0, max_value=10_000),
       pct=st.floats(min_value=0, max_value=100), mrc=st.integers(min_value=0, max_value=100))
def test_budget_limit_grows_with_load(active, more, pct, mrc):
    assert retry_limit(active + more, 3, pct, mrc) >= retry_limit(active, 3, pct, mrc)


@given(active=st.integers(min_value=0, max_value=10_000), max_retries=st.integers(min_value=0, max_value=100))
def test_without_budget_the_threshold_is_max_retries(active, max_retries):
    assert retry_limit(active, max_retries, None, 3) == max_retries


@given(active=st.integers(min_value=0, max_value=5_000), pct=st.floats(min_value=0, max_value=100),
       mrc=st.integers(min_value=0, max_value=50), already=st.integers(min_value=0, max_value=200))
def test_admitting_retries_one_by_one_stops_exactly_at_the_limit(active, pct, mrc, already):
    """A storm: every failing request asks for a retry at once. Admission (check, then hold
    the slot) lets exactly ``limit - outstanding`` through, never more."""
    outstanding = already
    admitted = 0
    for _ in range(active + mrc + 5):
        if retry_allowed(outstanding, active, 3, pct, mrc):
            outstanding += 1
            admitted += 1
    assert admitted == max(0, retry_limit(active, 3, pct, mrc) - already)
    assert outstanding <= max(already, retry_limit(active, 3, pct, mrc))


@given(n_requests=st.integers(min_value=1, max_value=2_000), pct=st.floats(min_value=1, max_value=100),
       mrc=st.integers(min_value=0, max_value=10), num_retries=st.integers(min_value=1, max_value=5))
@settings(max_examples=60)
def test_retry_storm_extra_load_is_bounded_by_the_budget(n_requests, pct, mrc, num_retries):
    """Every host fails; ``n_requests`` are in flight and all want ``num_retries`` retries.
    In any one wave, the retries admitted never exceed the budget of that wave's active load."""
    active = n_requests
    outstanding = 0
    sent_retries = 0
    for _wave in range(num_retries):
        wave = 0
        for _ in range(n_requests):
            if retry_allowed(outstanding, active, 3, pct, mrc):
                outstanding += 1
                wave += 1
        assert wave <= max(mrc, active * pct / 100.0)
        sent_retries += wave
        outstanding = 0         # the wave's retries complete (and fail again)
    assert sent_retries <= num_retries * max(mrc, n_requests * pct / 100.0)


# ---- retry decisions -------------------------------------------------------------------------

def pol(on, codes=()):
    return RetryPolicy(retry_on=frozenset(on.split(",")), retriable_status_codes=frozenset(codes))


@pytest.mark.parametrize("on,status,expected", [
    ("5xx", 500, True), ("5xx", 503, True), ("5xx", 409, False), ("5xx", 200, False),
    ("gateway-error", 502, True), ("gateway-error", 504, True), ("gateway-error", 500, False),
    ("retriable-4xx", 409, True), ("retriable-4xx", 404, False), ("retriable-4xx", 500, False),
    ("connect-failure", 503, False), ("reset", 503, False),
])
def test_status_conditions(on, status, expected):
    assert status_is_retriable(pol(on), status) is expected


def test_retriable_status_codes_need_their_condition():
    assert status_is_retriable(pol("retriable-status-codes", (418,)), 418)
    assert not status_is_retriable(pol("5xx", (418,)), 418)
    assert not status_is_retriable(pol("retriable-status-codes", (418,)), 500)


@pytest.mark.parametrize("on,flag,sent,expected", [
    ("connect-failure", "UF", False, True), ("reset", "UF", False, True), ("5xx", "UF", False, True),
    ("retriable-4xx", "UF", False, False),
    ("reset", "UC", True, True), ("5xx", "UC", True, True), ("connect-failure", "UC", True, False),
    ("refused-stream", "UC", False, True), ("refused-stream", "UC", True, False),
    ("reset-before-request", "UC", False, True),
    ("5xx", "UT", True, True), ("gateway-error", "UT", True, True), ("connect-failure", "UT", True, False),
])
def test_error_conditions(on, flag, sent, expected):
    assert error_is_retriable(pol(on), flag, sent) is expected


@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=20), st.text(max_size=20))
def test_override_headers_never_raise_and_are_consumed(max_retries, retry_on, per_try, codes):
    h = MultiDict({"x-envoy-max-retries": max_retries, "x-envoy-retry-on": retry_on,
                   "x-envoy-upstream-rq-per-try-timeout-ms": per_try,
                   "x-envoy-retriable-status-codes": codes, "x-other": "1"})
    base = pol("5xx")
    n, p, pt = request_overrides(h, base)
    assert set(h) == {"x-other"}
    assert 0 <= n <= 100
    assert base.retry_on <= p.retry_on
    assert pt >= 0


def test_override_headers_values():
    h = MultiDict({"x-envoy-max-retries": "0", "x-envoy-retry-on": "retriable-4xx, bogus",
                   "x-envoy-upstream-rq-per-try-timeout-ms": "250",
                   "x-envoy-retriable-status-codes": "418, 4299,abc,429"})
    n, p, pt = request_overrides(h, pol("5xx"))
    assert (n, pt) == (0, 0.25)
    assert p.retry_on == {"5xx", "retriable-4xx"}
    assert p.retriable_status_codes == {418, 429}


# ---- config, both formats ---------------------------------------------------------------------

def test_native_retry_config():
    p = retry_policy_from_native({"retry_on": "5xx,retriable-status-codes", "retries": 4,
                                  "per_try_timeout": "200ms", "status_codes": [418],
                                  "backoff": "10ms", "max_backoff": "80ms", "max_buffered_body": 1024,
                                  "retry_non_idempotent": True, "allow_override_headers": True}, "r")
    assert (p.num_retries, p.per_try_timeout_s, p.backoff_base_s, p.backoff_max_s) == (4, 0.2, 0.01, 0.08)
    assert p.retriable_status_codes == {418} and p.max_buffered_body == 1024
    assert p.retry_non_idempotent and p.allow_override_headers
    d = retry_policy_from_native({}, "r")
    assert d.retry_on == {"5xx", "reset", "connect-failure"} and not d.retry_non_idempotent
    assert not d.allow_override_headers


def test_envoy_retry_config():
    p = retry_policy_from_envoy({"retry_on": "gateway-error,reset", "num_retries": 3,
                                 "per_try_timeout": "0.5s",
                                 "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"},
                                 "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
                                 "retriable_status_codes": [503]}, "rp")
    assert (p.num_retries, p.per_try_timeout_s, p.backoff_base_s, p.backoff_max_s) == (3, 0.5, 0.1, 1.0)
    assert p.retry_non_idempotent and p.allow_override_headers
    assert retry_policy_from_envoy({"retry_back_off": {"base_interval": "0.1s"}}, "rp").backoff_max_s == pytest.approx(1.0)


@pytest.mark.parametrize("fn,d,where", [
    (retry_policy_from_native, {"status_codes": [700]}, "r.status_codes[0]"),
    (retry_policy_from_native, {"retry_on": "5xx,sometimes"}, "r.retry_on"),
    (retry_policy_from_native, {"backoff": "1s", "max_backoff": "10ms"}, "r.max_backoff"),
    (retry_policy_from_native, {"retries": -1}, "r.retries"),
    (retry_policy_from_native, {"retry_budget": 1}, "r"),
    (retry_policy_from_envoy, {"per_try_idle_timeout": "1s"}, "r.per_try_idle_timeout"),
    (retry_policy_from_envoy, {"retry_back_off": {"base_interval": "0s"}}, "r.retry_back_off.base_interval"),
    (retry_policy_from_envoy, {"retry_host_predicate": [{"name": "x"}]}, "r.retry_host_predicate[0].name"),
    (retry_policy_from_envoy, {"retriable_headers": []}, "r"),
])
def test_bad_retry_config_is_refused_with_its_path(fn, d, where):
    with pytest.raises(ConfigError) as e:
        fn(d, "r")
    assert str(e.value).startswith(where), str(e.value)
