"""served_by: parsing and the header on the response."""

from __future__ import annotations

import pytest

from filters import CATALOG
from filters.served_by import SPEC
from sidecar.config.errors import ConfigError
from sidecar.testing import build_filter
from tests.jwt_helpers import Next, make_request


async def test_adds_the_header():
    f = build_filter(SPEC, SPEC.from_native({"value": "pod-1"}, "f"))
    resp = await f(make_request(), Next())
    assert resp.headers["x-served-by"] == "pod-1"
    assert CATALOG.lookup("served_by") is SPEC


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        SPEC.from_native({"value": "", "x": 1}, "f")
    assert e.value.path == "f.x"
