"""The installed commands as users run them: `verispec serve` in its own process, `verispec-client`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RunningServer, wait_serving

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`verispec serve` on the embedded default model, exactly as the README starts it."""
    port = _free_port()
    env = dict(os.environ, VERISPEC_PORT=str(port), VERISPEC_HOST="127.0.0.1")
    process = subprocess.Popen(
        [str(BIN / "verispec"), "serve", "--log-format", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    yield process, address
    if process.poll() is None:
        process.kill()
        process.wait()


def test_serve_reports_not_serving_then_serving_and_exits_cleanly(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    """Health is SERVING once loaded; SIGTERM drains and the process exits 0."""
    process, address = served
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        wait_serving(channel, "verispec.v1.GenerationService")
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        client = subprocess.run(
            [
                str(BIN / "verispec-client"),
                "--target",
                address,
                "generate",
                "What is the capital of France?",
                "--chat",
                "--max-new-tokens",
                "16",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert "Paris" in client.stdout
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert '"event": "server.draining"' in output
    assert '"event": "server.stopped"' in output
    assert "What is the capital" not in output, "prompts are not logged by default"


def test_bad_setting_is_refused_with_its_name() -> None:
    result = subprocess.run([str(BIN / "verispec"), "serve", "--top", "x"], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    result = subprocess.run(
        [str(BIN / "verispec"), "serve", "--num-draft-tokens", "99"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--num-draft-tokens" in result.stderr


def test_client_streams_tokens_as_they_arrive(server: RunningServer) -> None:
    """`verispec-client generate --stream` prints text before the request has finished."""
    process = subprocess.Popen(
        [
            str(BIN / "verispec-client"),
            "--target",
            server.address,
            "generate",
            "Write a long story about a dragon.",
            "--stream",
            "--max-new-tokens",
            "60",
            "--min-new-tokens",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    start = time.monotonic()
    first_chunk = process.stdout.read(1)
    first_at = time.monotonic() - start
    rest, errors = process.communicate(timeout=120)
    total = time.monotonic() - start
    assert process.returncode == 0, errors
    assert first_chunk and rest
    assert first_at < total * 0.8, "text arrived while generation was still running"
    assert "60 completion tokens" in errors


def test_client_health_info_tokenize(server: RunningServer) -> None:
    for command, expected in (
        ("health", "SERVING_STATUS_SERVING"),
        ("info", "smollm2-135m-instruct"),
        ("tokenize", "token_ids"),
    ):
        args = [command, "Hello world"] if command == "tokenize" else [command]
        result = subprocess.run(
            [str(BIN / "verispec-client"), "--target", server.address, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout


def test_client_reports_errors(server: RunningServer) -> None:
    result = subprocess.run(
        [str(BIN / "verispec-client"), "--target", server.address, "generate", "x", "--top-p", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: sampling.top_p" in result.stderr
