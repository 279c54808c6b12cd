"""Deadlines, cancellation, time limits and backpressure against the real server and model."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import RunningServer, ServerFactory
from verispec.v1 import generation_pb2 as pb

LONG = pb.GenerateRequest(prompt="Write a very long story about the sea.", max_new_tokens=400, min_new_tokens=400)


def _stream(request: pb.GenerateRequest) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest.FromString(request.SerializeToString())


def _wait_idle(server: RunningServer, timeout: float = 10) -> float:
    """Seconds until Health shows no active or queued request."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = server.stub.Health(pb.HealthRequest())
        if health.active_requests == 0 and health.queue_depth == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError("requests still active")


def test_deadline_stops_generation_and_frees_the_slot(server: RunningServer) -> None:
    """A caller's gRPC deadline ends the request in the engine within about one step."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(LONG, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2
    assert _wait_idle(server) < 1.0, "the engine dropped the request at its next step"


def test_cancel_mid_stream_frees_the_slot(server: RunningServer) -> None:
    call = server.stub.StreamGenerate(_stream(LONG))
    received = 0
    for message in call:
        received += len(message.token_ids)
        if received >= 5:
            call.cancel()
            break
    assert _wait_idle(server) < 1.0


def test_time_limit_returns_partial_text(server: RunningServer) -> None:
    request = pb.GenerateRequest(
        prompt="Write a very long story about the sea.", max_new_tokens=400, min_new_tokens=400, time_limit_ms=400
    )
    response = server.stub.Generate(request, timeout=30)
    assert response.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert 0 < response.usage.completion_tokens < 400
    assert response.text


def test_full_queue_answers_resource_exhausted_with_retry_info(make_server: ServerFactory) -> None:
    """Beyond max active + max queued, a call fails at once; those admitted still finish."""
    small = make_server("--max-active-requests", "1", "--max-queued-requests", "1")
    request = pb.GenerateRequest(prompt="Count slowly.", max_new_tokens=40, min_new_tokens=40)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(small.stub.Generate(request, timeout=60))
        except grpc.RpcError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = small.stub.Health(pb.HealthRequest())
        if health.active_requests + health.queue_depth == 2:
            break
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        small.stub.Generate(request, timeout=60)
    assert time.monotonic() - start < 1.0, "refused at once, not after waiting"
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(info.value)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToMilliseconds() > 0
    for thread in threads:
        thread.join(120)
    assert all(isinstance(r, pb.GenerateResponse) and r.usage.completion_tokens == 40 for r in results)


def test_health_answers_fast_while_the_engine_is_busy(server: RunningServer) -> None:
    call = server.stub.StreamGenerate(_stream(LONG))
    next(iter(call))
    latencies = []
    for _ in range(20):
        start = time.monotonic()
        server.stub.Health(pb.HealthRequest())
        latencies.append(time.monotonic() - start)
    call.cancel()
    assert sorted(latencies)[-2] < 0.05, latencies
    _wait_idle(server)
