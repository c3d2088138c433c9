import pytest

from sidecar.shared.testing import RedisServer


@pytest.fixture
def redis_server():
    """A real redis-server on a free loopback port, in a temp dir; stopped after the test."""
    srv = RedisServer().start()
    try:
        yield srv
    finally:
        srv.stop()
