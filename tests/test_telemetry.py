"""Traces, logs and metrics as their consumers see them: real OTLP receivers, JSON log lines, a scrape."""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServeProcess, free_port, spawn_serve
from tests.receivers import OtlpGrpcReceiver, OtlpHttpReceiver
from verispec.telemetry import StepSpans
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

COPY_PROMPT = (
    "Copy this list exactly: apples, pears, plums, cherries, lemons, limes, grapes, melons.\n"
    "Copy: apples, pears, plums, cherries, lemons, limes, grapes, melons.\nCopy: apples,"
)


class Traced:
    """A server exporting to a receiver, with its metrics port."""

    def __init__(self, serve: ServeProcess, receiver: OtlpGrpcReceiver | OtlpHttpReceiver, metrics_port: int):
        self.serve = serve
        self.receiver = receiver
        self.metrics_port = metrics_port

    def generate(self, request: pb.GenerateRequest) -> tuple[pb.GenerateResponse, str, str]:
        return traced_generate(self.serve.address, request)


def traced_generate(address: str, request: pb.GenerateRequest) -> tuple[pb.GenerateResponse, str, str]:
    """Calls Generate as a traced caller would; returns the response and the caller's trace and span ids."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GenerationServiceStub(channel).Generate(
            request, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")], timeout=120
        )
    return response, trace_id, parent_id


@pytest.fixture(scope="module", params=["grpc", "http/protobuf"])
def traced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    receiver = OtlpGrpcReceiver() if request.param == "grpc" else OtlpHttpReceiver()
    metrics_port = free_port()
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": request.param,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    serve = spawn_serve(tmp_path_factory.mktemp("traced") / "serve.log", "--metrics-port", str(metrics_port), env=env)
    yield Traced(serve, receiver, metrics_port)
    serve.stop()
    receiver.close()


def spec_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=COPY_PROMPT,
        max_new_tokens=24,
        speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_NGRAM, num_draft_tokens=4),
    )


def test_spans_follow_the_callers_trace_one_draft_and_verify_per_step(traced: Traced) -> None:
    response, trace_id, parent_id = traced.generate(spec_request())
    spans = traced.receiver.wait_for(trace_id, "verispec.v1.GenerationService/Generate")
    [root] = [s for s in spans if s.name == "verispec.v1.GenerationService/Generate"]
    assert root.parent_span_id == parent_id, "the server span continues the caller's traceparent"
    children = [s for s in spans if s.parent_span_id == root.span_id]
    names = [s.name for s in children]
    stats = response.speculation
    assert names.count("queue") == 1 and names.count("prefill") == 1
    drafts = sorted((s for s in children if s.name == "spec.draft"), key=lambda s: s.start_ns)
    verifies = sorted((s for s in children if s.name == "spec.verify"), key=lambda s: s.start_ns)
    assert len(drafts) == len(verifies) == stats.num_steps > 0
    assert sum(s.attributes["verispec.spec.num_draft_tokens"] for s in verifies) == stats.num_draft_tokens
    assert sum(s.attributes["verispec.spec.num_accepted"] for s in verifies) == stats.num_accepted_tokens
    assert stats.num_accepted_tokens > 0, "a copy prompt accepts n-gram drafts"
    [prefill] = [s for s in children if s.name == "prefill"]
    # Alone in the engine: every pass held this request only, its prompt, then its last token plus drafts.
    assert prefill.attributes["verispec.batch.size"] == 1
    assert prefill.attributes["verispec.batch.tokens"] == response.usage.prompt_tokens
    for draft, verify in zip(drafts, verifies, strict=True):
        assert draft.attributes["verispec.step"] == verify.attributes["verispec.step"]
        for span in (draft, verify):
            assert span.attributes["verispec.batch.size"] == 1
            assert span.attributes["verispec.batch.tokens"] == 1 + verify.attributes["verispec.spec.num_draft_tokens"]
        assert draft.end_ns <= verify.start_ns <= verify.end_ns, "engine timestamps: draft, then verify"
        assert root.start_ns <= draft.start_ns and verify.end_ns <= root.end_ns
        assert verify.attributes["verispec.spec.drafter"] == "ngram"
        bonus = verify.attributes["verispec.spec.bonus"]
        assert bonus == (
            verify.attributes["verispec.spec.num_accepted"] == verify.attributes["verispec.spec.num_draft_tokens"] > 0
        )
    assert root.attributes["gen_ai.request.model"] == "smollm2-135m-instruct"
    assert root.attributes["gen_ai.usage.input_tokens"] == response.usage.prompt_tokens
    assert root.attributes["gen_ai.usage.output_tokens"] == response.usage.completion_tokens
    assert root.attributes["verispec.spec.num_accepted_tokens"] == stats.num_accepted_tokens
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]


def test_log_lines_carry_trace_span_and_request_ids(traced: Traced) -> None:
    response, trace_id, _ = traced.generate(spec_request())
    traced.receiver.wait_for(trace_id, "verispec.v1.GenerationService/Generate")
    events = [json.loads(line) for line in traced.serve.log_lines() if line.startswith("{")]
    mine = [e for e in events if e.get("request_id") == response.request_id]
    assert {e["event"] for e in mine} >= {"request.start", "request.finish"}
    for event in mine:
        assert event["trace_id"] == trace_id
        assert len(event["span_id"]) == 16
    assert all(COPY_PROMPT[:20] not in json.dumps(e) for e in events), "prompt text is not logged"


def test_metrics_scrape_parses_and_counts_speculation(traced: Traced) -> None:
    traced.generate(spec_request())
    with urllib.request.urlopen(f"http://127.0.0.1:{traced.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("verispec_requests_total", finish_reason="length") >= 1
    drafted = value("verispec_spec_draft_tokens_total", drafter="ngram")
    accepted = value("verispec_spec_accepted_tokens_total", drafter="ngram")
    assert drafted > 0 and 0 < accepted <= drafted
    first = value("verispec_spec_accepted_by_position_total", drafter="ngram", position="1")
    assert first >= value("verispec_spec_accepted_by_position_total", drafter="ngram", position="2")
    assert value("verispec_time_to_first_token_seconds_count") >= 1
    assert value("verispec_generated_tokens_total") >= 24
    assert value("verispec_device_memory_bytes", device="cpu") > 0
    assert ("verispec_queue_depth", ()) in samples and ("verispec_active_requests", ()) in samples
    assert value("verispec_kv_pages_capacity") > 0 and ("verispec_kv_pages_used", ()) in samples
    assert 0 <= value("verispec_kv_cache_utilization") <= 1
    assert ("verispec_preemptions_total", ()) in samples
    assert value("verispec_batch_size_count") >= 1 and value("verispec_batch_tokens_sum") >= 24


def test_step_span_sampling_setting() -> None:
    assert StepSpans("on").wanted() and not StepSpans("off").wanted()
    sampled = sum(StepSpans("0.5").wanted() for _ in range(2000))
    assert 850 < sampled < 1150
