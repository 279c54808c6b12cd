"""Hostile input: malformed bytes, absurd values and fuzzed requests never crash or hang the server."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer
from verispec_proto.v1 import generation_pb2 as pb

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _raw_call(server: RunningServer, method: str, payload: bytes) -> grpc.RpcError:
    call = server.channel.unary_unary(
        f"/verispec.v1.GenerationService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=30)
    return info.value


def _field(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return str(bad.field_violations[0].field)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\x0a\x02\xff\xfe", "prompt"),  # field 1 (prompt), 2 bytes that are not UTF-8
        (pb.GenerateRequest(stop=["ok"]).SerializeToString() + b"\x2a\x01\xc3", "stop[1]"),
        (b"\x12\x09\x0a\x04user\x12\x01\x80", "messages[0].content"),
        (b"\x0a\x05hi", "request"),  # truncated: says 5 bytes, has 2
    ],
)
def test_malformed_bytes_name_the_field(server: RunningServer, payload: bytes, field: str) -> None:
    for method in ("Generate", "StreamGenerate"):
        if method == "StreamGenerate":
            call = server.channel.unary_stream(
                f"/verispec.v1.GenerationService/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call(payload, timeout=30))
            error = info.value
        else:
            error = _raw_call(server, method, payload)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert _field(error) == field


def test_oversized_message_is_refused(server: RunningServer) -> None:
    huge = pb.GenerateRequest(prompt="x" * (5 * 1024 * 1024)).SerializeToString()
    error = _raw_call(server, "Generate", huge)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0]))
_text = st.text(max_size=40)
_requests = st.builds(
    pb.GenerateRequest,
    prompt=_text,
    messages=st.lists(
        st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "", "x"]), content=_text), max_size=3
    ),
    max_new_tokens=st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
    min_new_tokens=st.integers(0, 2**32 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    sampling=st.builds(
        pb.SamplingParams,
        temperature=_floats,
        top_k=st.integers(0, 2**32 - 1),
        top_p=_floats,
        min_p=_floats,
        typical_p=_floats,
        repetition_penalty=_floats,
        presence_penalty=_floats,
        frequency_penalty=_floats,
        seed=st.integers(0, 2**64 - 1),
    ),
    response=st.builds(
        pb.ResponseOptions,
        logprobs=st.booleans(),
        top_logprobs=st.integers(0, 2**32 - 1),
        echo_input_tokens=st.booleans(),
        include_stop_sequence=st.booleans(),
    ),
    time_limit_ms=st.integers(0, 2**32 - 1),
    truncate_input_tokens=st.integers(0, 2**32 - 1),
    speculation=st.builds(pb.SpeculationParams, mode=st.integers(0, 6), num_draft_tokens=st.integers(0, 2**32 - 1)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=_requests)
def test_fuzzed_requests_get_only_expected_codes(server: RunningServer, request: pb.GenerateRequest) -> None:
    """Any request built from the contract's field types: OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED only."""
    if request.max_new_tokens > 3 or request.max_new_tokens == 0:  # keep accepted requests short
        request.max_new_tokens = request.max_new_tokens if request.max_new_tokens > 2048 else 3
    try:
        server.stub.Generate(request, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (exc.code(), exc.details(), request)
