"""The two grpc.health.v1 messages the health checker writes and reads, checked against the
protobuf classes grpcio-health-checking generates from the official health.proto."""

from __future__ import annotations

import struct

import pytest
from grpc_health.v1 import health_pb2
from hypothesis import given
from hypothesis import strategies as st

from sidecar.cluster.health import GRPC_SERVING, health_check_request, serving_status


@given(st.text(max_size=300))
def test_request_matches_protobuf(service):
    frame = health_check_request(service)
    assert frame[0] == 0 and struct.unpack(">I", frame[1:5])[0] == len(frame) - 5
    msg = health_pb2.HealthCheckRequest()
    msg.ParseFromString(frame[5:])
    assert msg.service == service
    assert frame[5:] == health_pb2.HealthCheckRequest(service=service).SerializeToString()


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_response_status_read(status):
    body = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    assert serving_status(b"\x00" + struct.pack(">I", len(body)) + body) == status
    assert (status == GRPC_SERVING) == (status == health_pb2.HealthCheckResponse.SERVING)


def test_unreadable_responses():
    assert serving_status(b"") is None
    assert serving_status(b"\x01\x00\x00\x00\x00") is None     # compressed: not asked for
    assert serving_status(b"\x00\x00\x00\x00\x01\x10") is None  # an unknown varint field
