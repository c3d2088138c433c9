"""``dns_lookup_family``: which resolved addresses a DNS cluster uses (Envoy's semantics)."""

import socket

from sidecar.cluster.manager import lookup_family_addresses

V4, V6 = socket.AF_INET, socket.AF_INET6
BOTH = [(V6, "::1"), (V4, "127.0.0.1"), (V4, "127.0.0.2"), (V4, "127.0.0.1")]


def test_families():
    assert lookup_family_addresses("AUTO", BOTH) == ["::1"]
    assert lookup_family_addresses("AUTO", BOTH[1:]) == ["127.0.0.1", "127.0.0.2"]
    assert lookup_family_addresses("V4_PREFERRED", BOTH) == ["127.0.0.1", "127.0.0.2"]
    assert lookup_family_addresses("V4_PREFERRED", BOTH[:1]) == ["::1"]
    assert lookup_family_addresses("V4_ONLY", BOTH[:1]) == []
    assert lookup_family_addresses("V6_ONLY", BOTH) == ["::1"]
    assert lookup_family_addresses("ALL", BOTH) == ["::1", "127.0.0.1", "127.0.0.2"]
