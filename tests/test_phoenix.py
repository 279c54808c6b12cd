"""A real tracing backend: Arize Phoenix receives verispec's OTLP export, and its own REST API shows a
request's trace with the draft and verify spans under the caller's trace id.

Opt-in (Phoenix is large and lives in its own environment): `make test-tracing`, which sets
TEST_PHOENIX_EXECUTABLE to that environment's `phoenix` executable.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, spawn_serve, wait_http_ok
from tests.test_telemetry import spec_request, traced_generate

pytestmark = pytest.mark.tracing_backend

ROOT_NAME = "verispec.v1.GenerationService/Generate"


class Phoenix:
    """`phoenix serve` on loopback ports, with no outside resources and no telemetry of its own."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        env = dict(
            os.environ,
            PHOENIX_WORKING_DIR=str(directory),
            PHOENIX_HOST="127.0.0.1",
            PHOENIX_PORT=str(self.http_port),
            PHOENIX_GRPC_PORT=str(self.grpc_port),
            PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",
            PHOENIX_TELEMETRY_ENABLED="false",
        )
        self.log_path = directory / "phoenix.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([executable, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.api = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 120) -> None:
        wait_http_ok(f"{self.api}/healthz", self.process, self.log_path, timeout)

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        """The trace's spans, read through Phoenix's REST API (GET /v1/projects/{project}/spans)."""
        query = urllib.parse.urlencode({"trace_id": trace_id, "limit": 1000})
        with urllib.request.urlopen(f"{self.api}/v1/projects/default/spans?{query}", timeout=10) as answer:
            data: list[dict[str, Any]] = json.load(answer)["data"]
        return data

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    executable = os.environ.get("TEST_PHOENIX_EXECUTABLE")
    if not executable:
        pytest.skip("set TEST_PHOENIX_EXECUTABLE to a phoenix executable (make test-tracing does)")
    backend = Phoenix(executable, tmp_path_factory.mktemp("phoenix"))
    try:
        backend.wait_ready()
        yield backend
    finally:
        backend.stop()


def attribute(span: dict[str, Any], dotted: str) -> Any:
    """A span attribute, whether the backend kept the dotted key or nested it by its dots."""
    attributes = span["attributes"]
    if dotted in attributes:
        return attributes[dotted]
    value: Any = attributes
    for part in dotted.split("."):
        value = value[part]
    return value


def test_phoenix_shows_draft_and_verify_spans_under_the_callers_trace(phoenix: Phoenix, tmp_path: Path) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{phoenix.grpc_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    serve = spawn_serve(tmp_path / "serve.log", env=env)
    try:
        response, trace_id, parent_id = traced_generate(serve.address, spec_request())
    finally:
        serve.stop()  # flushes the exporter
    stats = response.speculation
    deadline, spans = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        spans = phoenix.spans(trace_id)
        if [s["name"] for s in spans].count("spec.verify") == stats.num_steps:
            break
        time.sleep(1)
    [root] = [s for s in spans if s["name"] == ROOT_NAME]
    assert root["context"]["trace_id"] == trace_id
    assert root["parent_id"] == parent_id, "the server span continues the caller's traceparent"
    children = [s for s in spans if s["parent_id"] == root["context"]["span_id"]]
    drafts = sorted((s for s in children if s["name"] == "spec.draft"), key=lambda s: s["start_time"])
    verifies = sorted((s for s in children if s["name"] == "spec.verify"), key=lambda s: s["start_time"])
    assert len(drafts) == len(verifies) == stats.num_steps > 0
    assert sum(attribute(s, "verispec.spec.num_accepted") for s in verifies) == stats.num_accepted_tokens
    assert sum(attribute(s, "verispec.spec.num_draft_tokens") for s in verifies) == stats.num_draft_tokens
    assert attribute(root, "gen_ai.usage.output_tokens") == response.usage.completion_tokens
    names = [s["name"] for s in children]
    assert names.count("queue") == names.count("prefill") == 1
    print(f"\nPhoenix trace {trace_id}: {len(spans)} spans; root {ROOT_NAME} (parent {parent_id})")
    print(f"  children: queue, prefill, {len(drafts)} x spec.draft, {len(verifies)} x spec.verify")
    for verify in verifies[:4]:
        drafted, accepted = (attribute(verify, f"verispec.spec.{n}") for n in ("num_draft_tokens", "num_accepted"))
        print(f"  spec.verify step {attribute(verify, 'verispec.step')}: {accepted}/{drafted} accepted")
    print(f"  response: {stats.num_accepted_tokens}/{stats.num_draft_tokens} accepted in {stats.num_steps} steps")
