"""The codec's fast paths give exactly what protobuf's json_format gives."""

from __future__ import annotations

import random

import pytest
from google.protobuf import timestamp_pb2

from agentplane.agent.v1 import agent_service_pb2
from services.common import codec
from services.common.errors import ServiceError


def test_timestamps_are_written_as_protobuf_writes_them() -> None:
    rng = random.Random(7)
    cases = [(0, 0), (-62_135_596_800, 0), (253_402_300_799, 999_999_999), (-1, 5)]
    for _ in range(5000):
        nanos = rng.choice([0, rng.randrange(1000) * 10**6, rng.randrange(10**6) * 1000,
                            rng.randrange(10**9)])  # fmt: skip
        cases.append((rng.randint(-62_135_596_800, 253_402_300_799), nanos))
    for seconds, nanos in cases:
        stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
        assert codec.timestamp_json(seconds, nanos) == stamp.ToJsonString()


def test_plain_string_requests_fill_like_json_format_and_others_still_get_checked() -> None:
    fast = codec.from_json({"project_id": "demo"}, agent_service_pb2.GetProjectRequest())
    assert fast == agent_service_pb2.GetProjectRequest(project_id="demo")
    with pytest.raises(ServiceError) as refused:  # not a string: json_format's checks apply
        codec.from_json({"project_id": 7}, agent_service_pb2.GetProjectRequest())
    assert "project_id" in refused.value.message
    with pytest.raises(ServiceError):  # no such field
        codec.from_json({"nope": "x"}, agent_service_pb2.GetProjectRequest())
