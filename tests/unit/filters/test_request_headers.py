"""The one header-matching adapter the filters share (RBAC, JWT rules, rate-limit
header_value_match): a ``sidecar.config.matchers.HeaderMatcher`` applied to a request as
Envoy's filters see it, pseudo-headers included."""

from __future__ import annotations

import pytest

from filters.request_headers import request_header_test
from sidecar.config.matchers import header_matcher_from_envoy, header_matcher_from_native
from tests.jwt_helpers import make_request

CASES = [
    # (Envoy HeaderMatcher, request kwargs, matches)
    ({"name": ":method", "string_match": {"exact": "POST"}}, dict(method="POST"), True),
    ({"name": ":method", "string_match": {"exact": "POST"}}, dict(method="GET"), False),
    ({"name": ":authority", "exact_match": "api.test"}, dict(host="api.test"), True),
    ({"name": "host", "exact_match": "api.test"}, dict(host="api.test"), True),
    ({"name": ":path", "string_match": {"exact": "/a?x=1"}}, dict(path="/a", query="x=1"), True),
    ({"name": ":path", "string_match": {"exact": "/a"}}, dict(path="/a", query="x=1"), False),
    ({"name": ":scheme", "exact_match": "http"}, {}, True),
    ({"name": "x-v", "exact_match": "1,2"}, dict(headers=[("x-v", "1"), ("x-v", "2")]), True),
    ({"name": "x-v", "present_match": False}, {}, True),
    ({"name": "x-v", "present_match": True}, dict(headers={"x-v": ""}), True),
    ({"name": "X-V", "string_match": {"prefix": "ab", "ignore_case": True}},
     dict(headers={"x-v": "ABc"}), True),
    ({"name": "x-v", "safe_regex_match": {"regex": "a+"}, "invert_match": True},
     dict(headers={"x-v": "aaa"}), False),
]


@pytest.mark.parametrize("hm,rq,want", CASES)
def test_envoy_header_matchers_on_requests(hm, rq, want):
    assert request_header_test(header_matcher_from_envoy(hm, "h"))(make_request(**rq)) is want


def test_native_header_matcher_on_a_pseudo_header():
    test = request_header_test(header_matcher_from_native({"name": ":method", "exact": "GET"}, "h"))
    assert test(make_request(method="GET")) and not test(make_request(method="PUT"))
