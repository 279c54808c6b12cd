"""Deadlines, cancellation, time limits and backpressure against the real server and model."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tests.conftest import BIN, RunningServer, ServerFactory, free_port, spawn_serve, start_serve
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

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


def test_sigterm_drains_in_flight_refuses_new_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM: health NOT_SERVING (on the probe port too), new calls UNAVAILABLE, the in-flight stream
    completes, exit 0."""
    health_port = free_port()
    serve = spawn_serve(tmp_path / "serve.log", "--grace-period", "60", "--health-port", str(health_port))
    try:
        with (
            grpc.insecure_channel(serve.address) as channel,
            grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe_channel,
        ):
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt="Tell a story.", max_new_tokens=60, min_new_tokens=60)
            stream = stub.StreamGenerate(_stream(request), timeout=120)
            first = next(stream)
            serve.process.send_signal(signal.SIGTERM)
            probe = health_pb2_grpc.HealthStub(probe_channel)
            ready = health_pb2.HealthCheckRequest(service="verispec.v1.GenerationService")
            deadline = time.monotonic() + 10
            while probe.Check(ready, timeout=1).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "readiness never turned NOT_SERVING"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=2), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert probe.Check(ready, timeout=1).status == health_pb2.HealthCheckResponse.NOT_SERVING, (
                "the probe port answers through the drain"
            )
            rest = list(stream)
        tokens = len(first.token_ids) + sum(len(m.token_ids) for m in rest)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and tokens == 60, "in-flight work finished"
        assert serve.process.wait(60) == 0
    finally:
        serve.stop()


def test_step_errors_fail_only_the_affected_request(make_server: ServerFactory) -> None:
    """With every 7th step failing, hit requests get INTERNAL with the reason; the server serves on."""
    faulty = make_server("--fault-injection", "step_error:7")
    request = pb.GenerateRequest(prompt="Tell a story.", max_new_tokens=4)
    codes = []
    for _ in range(6):
        try:
            faulty.stub.Generate(request, timeout=60)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            assert "injected step error" in exc.details()
    assert grpc.StatusCode.INTERNAL in codes and grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INTERNAL}
    assert faulty.stub.Health(pb.HealthRequest()).status == pb.SERVING_STATUS_SERVING


def test_fatal_device_error_turns_health_off_and_exits_nonzero(tmp_path: Path) -> None:
    serve = spawn_serve(tmp_path / "serve.log", "--fault-injection", "fatal:3")
    try:
        with grpc.insecure_channel(serve.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(prompt="Tell a story.", max_new_tokens=20), timeout=60)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "injected fatal device error" in info.value.details()
        assert serve.process.wait(60) == 1, "a supervisor sees the failure and restarts the process"
        assert '"event": "server.engine_failed"' in serve.log_path.read_text()
    finally:
        serve.stop()


def test_unmeetable_deadline_is_refused_early(make_server: ServerFactory) -> None:
    """With the slot busy for about a request length, a deadline shorter than that wait is refused at once."""
    busy = make_server("--max-active-requests", "1", "--max-queued-requests", "4")
    request = pb.GenerateRequest(prompt="Count slowly.", max_new_tokens=30, min_new_tokens=30)
    busy.stub.Generate(request, timeout=60)  # teaches the engine how long a request takes
    blocker = busy.stub.Generate.future(request, timeout=60)
    deadline = time.monotonic() + 10
    while busy.stub.Health(pb.HealthRequest()).active_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        busy.stub.Generate(request, timeout=0.3)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "deadline cannot be met" in info.value.details()
    assert time.monotonic() - start < 0.25, "refused before its deadline, not timed out at it"
    assert blocker.result().usage.completion_tokens == 30
    assert busy.stub.Generate(request, timeout=60).usage.completion_tokens == 30, "a patient caller is served"


def test_soak_command_leaks_nothing(tmp_path: Path) -> None:
    """A short run of the soak benchmark: every status expected, no slot left behind."""
    output = tmp_path / "soak.json"
    result = subprocess.run(
        [str(BIN / "verispec"), "bench", "soak", "--requests", "48", "--concurrency", "8", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["requests"] == 48
    assert report["unexpected_status_codes"] == 0, report["unexpected_examples"]
    assert report["leaked_slots"] == 0
    assert report["status_codes"].get("OK", 0) > 0 and report["status_codes"].get("INVALID_ARGUMENT", 0) > 0


def test_dead_device_turns_both_healths_off(make_server: ServerFactory) -> None:
    failing = make_server("--fault-injection", "fatal:2")
    with pytest.raises(grpc.RpcError) as info:
        failing.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=8), timeout=60)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        status = failing.health.Check(health_pb2.HealthCheckRequest(service="")).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert failing.stub.Health(pb.HealthRequest()).status == pb.SERVING_STATUS_FAILED
    with pytest.raises(grpc.RpcError) as refused:
        failing.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=2), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_calls_arriving_during_the_drain_get_unavailable(tmp_path: Path) -> None:
    """Calls sent at and after the instant of SIGTERM, while a stream is still in flight, are answered
    UNAVAILABLE (which clients retry on another replica), never CANCELLED."""
    serve = spawn_serve(tmp_path / "serve.log", "--grace-period", "60")
    try:
        with grpc.insecure_channel(serve.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt="Tell a story.", max_new_tokens=200, min_new_tokens=200)
            stream = stub.StreamGenerate(_stream(request), timeout=120)
            next(stream)
            codes: list[grpc.StatusCode] = []
            until = time.monotonic() + 1.5

            def hammer() -> None:  # bursts of calls in flight together, through the instant of the signal
                while time.monotonic() < until:
                    calls = [stub.Tokenize.future(pb.TokenizeRequest(text="hi"), timeout=5) for _ in range(16)]
                    for call in calls:
                        try:
                            call.result()
                            codes.append(grpc.StatusCode.OK)
                        except grpc.RpcError as exc:
                            codes.append(exc.code())

            threads = [threading.Thread(target=hammer) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(0.2)
            serve.process.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(30)
            stream.cancel()
        refused = [code for code in codes if code != grpc.StatusCode.OK]
        assert refused and set(refused) == {grpc.StatusCode.UNAVAILABLE}, collections.Counter(codes)
        assert serve.process.wait(60) == 0
    finally:
        serve.stop()


def test_sigterm_during_a_long_prefill_exits_after_the_grace(tmp_path: Path) -> None:
    """SIGTERM with a 1 s grace while an 8k-token prompt is prefilled: the call is cancelled at the end
    of the grace and the engine stops after its current chunk, not after the whole prefill."""
    serve = spawn_serve(tmp_path / "serve.log", "--grace-period", "1")
    try:
        with grpc.insecure_channel(serve.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            prompt = " ".join(f"w{i % 97}" for i in range(4000))  # about 11,500 tokens, the last 8,000 kept
            request = pb.GenerateRequest(prompt=prompt, max_new_tokens=4, truncate_input_tokens=8000)
            call = stub.Generate.future(request, timeout=120)
            deadline = time.monotonic() + 10
            while stub.Health(pb.HealthRequest()).active_requests == 0:
                assert not call.done(), call.exception()
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)  # well inside the prefill
            start = time.monotonic()
            serve.process.send_signal(signal.SIGTERM)
            assert serve.process.wait(60) == 0
            seconds = time.monotonic() - start
            with pytest.raises(grpc.RpcError):
                call.result(10)
        assert seconds < 1 + 3, f"exited {seconds:.1f}s after SIGTERM (grace 1 s, then one chunk's forward pass)"
    finally:
        serve.stop()


def test_sigterm_while_loading_exits_promptly(tmp_path: Path) -> None:
    """A signal during model load (or calibration) ends the process within seconds, exit 0."""
    serve = start_serve(tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 60
        while '"server.listening"' not in serve.log_path.read_text():
            assert serve.process.poll() is None and time.monotonic() < deadline, serve.log_path.read_text()
            time.sleep(0.05)
        assert '"server.serving"' not in serve.log_path.read_text(), "still loading when signalled"
        start = time.monotonic()
        serve.process.send_signal(signal.SIGTERM)
        assert serve.process.wait(30) == 0
        seconds = time.monotonic() - start
        assert '"server.serving"' not in serve.log_path.read_text()
        assert seconds < 3, f"exited {seconds:.1f}s after SIGTERM"
    finally:
        serve.stop()
