"""examples/filters/json_transform.py with the SDK's test helpers."""

from __future__ import annotations

import json

from examples.filters.json_transform import JsonTransform
from sidecar.testing import RecordingNext, build_user_filter, make_request

JSON = {"content-type": "application/json"}


async def test_sets_request_fields_from_a_streamed_body():
    f = build_user_filter(JsonTransform, {"set": {"source": "edge"}})
    upstream = RecordingNext()
    await f(make_request("POST", headers=JSON, body=[b'{"a": ', b'1}']), upstream)
    assert json.loads(upstream.last.body) == {"a": 1, "source": "edge"}


async def test_too_large_request_is_413_and_never_sent():
    f = build_user_filter(JsonTransform, {"set": {"x": 1}, "max_bytes": 8})
    upstream = RecordingNext()
    resp = await f(make_request("POST", headers=JSON, body=[b'{"a": "0123456789"}']), upstream)
    assert resp.status == 413 and not upstream.called


async def test_redacts_response_fields_at_any_depth():
    doc = {"user": {"name": "a", "password": "p"}, "items": [{"ssn": 1, "id": 2}]}
    body = json.dumps(doc).encode()
    f = build_user_filter(JsonTransform, {"redact": ["password", "ssn"]})
    resp = await f(make_request(), RecordingNext(headers={**JSON, "content-length": str(len(body))},
                                                 body=body))
    assert json.loads(resp.body) == {"user": {"name": "a"}, "items": [{"id": 2}]}


async def test_streamed_or_non_json_bodies_pass_untouched():
    f = build_user_filter(JsonTransform, {"redact": ["password"]})
    resp = await f(make_request(), RecordingNext(headers=JSON, body=[b'{"password": 1}']))
    assert not isinstance(resp.body, bytes)          # unknown length: streamed through
    resp = await f(make_request(), RecordingNext(headers={"content-type": "text/plain",
                                                          "content-length": "15"},
                                                 body=b'{"password": 1}'))
    assert resp.body == b'{"password": 1}'
