"""The client distribution alone: its wheel installs into a fresh virtual environment with nothing of the
server (no torch, no transformers, no verispec package) and calls a live server from there, sync and
asyncio, and through its command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent
CLIENT_PROJECT = ROOT / "clients" / "python"
# The runtimes the client wheel depends on, pinned to the versions this environment runs, so pip takes
# the wheels it already has (its cache, the machine's indexes) instead of resolving anew.
RUNTIMES = ("grpcio", "protobuf", "googleapis-common-protos")

SCRIPT = """
import asyncio, importlib.util, json, sys
from importlib import metadata

import grpc
from verispec_client import AsyncVerispecClient, VerispecClient, error_details
from verispec_proto.v1 import generation_pb2 as pb

target = sys.argv[1]
with VerispecClient(target, timeout=60) as client:
    reply = client.generate(messages=[("user", "What is the capital of France?")], max_new_tokens=12)
    streamed = "".join(m.text for m in client.stream(messages=[("user", "What is the capital of France?")],
                                                     max_new_tokens=12))
    count = client.tokenize("Hello there").count
    health = client.health().status == pb.SERVING_STATUS_SERVING
    try:
        client.generate("hi", temperature=-0.5)
    except grpc.RpcError as exc:  # google.rpc details, decoded with googleapis-common-protos
        bad_field = [v.field for d in error_details(exc) for v in d.field_violations]


async def main():
    async with AsyncVerispecClient(target, timeout=60) as client:
        return (await client.tokenize("Hello there")).count, (await client.info()).vocab_size

async_count, vocab = asyncio.run(main())
print(json.dumps({
    "text": reply.text, "streamed": streamed, "count": count, "async_count": async_count, "vocab": vocab,
    "health": health, "bad_field": bad_field, "prefix": sys.prefix,
    "missing": [m for m in ("torch", "transformers", "verispec", "gguf", "numpy")
                if importlib.util.find_spec(m) is None],
    "distributions": sorted(d.metadata["Name"].lower() for d in metadata.distributions()),
}))
"""


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    """Runs a command (from `cwd`: away from the checkout, whose folders are no part of the fresh venv)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # nothing leaks in
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=240, check=False, cwd=cwd, env=env
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client wheel `make wheels` built (VERISPEC_WHEELS), or one built here from clients/python."""
    built = os.environ.get("VERISPEC_WHEELS")
    if built:
        [wheel] = Path(built).glob("verispec_client-*.whl")
        return wheel
    out = tmp_path_factory.mktemp("wheels")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, CLIENT_PROJECT)
    [wheel] = out.glob("verispec_client-*.whl")
    return wheel


def test_client_wheel_in_a_fresh_venv_calls_a_live_server(
    server: RunningServer, client_wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)  # pip below runs from this environment
    python = venv / "bin" / "python"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{name}=={metadata.version(name)}\n" for name in RUNTIMES))
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-input",
        "--constraint", constraints, client_wheel,
    )  # fmt: skip
    report = json.loads(_run(python, "-c", SCRIPT, server.address, cwd=tmp_path))
    assert Path(report["prefix"]) == venv
    assert "Paris" in report["text"] and report["streamed"] == report["text"]
    assert report["count"] == report["async_count"] > 0 and report["vocab"] == 49152 and report["health"]
    assert report["bad_field"] == ["sampling.temperature"]
    assert report["missing"] == ["torch", "transformers", "verispec", "gguf", "numpy"], "nothing of the server"
    assert {"verispec-client", *RUNTIMES} <= set(report["distributions"])
    assert not {"torch", "transformers", "verispec"} & set(report["distributions"])
    # The command the wheel installs, from the fresh environment.
    out = _run(venv / "bin" / "verispec-client", "--target", server.address, "tokenize", "Hello there", cwd=tmp_path)
    assert json.loads(out)["count"] == report["count"]
