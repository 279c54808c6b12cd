"""Logging (structlog JSON), tracing (OpenTelemetry) and the names both use, set up once."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from verispec import __version__
from verispec.config import TelemetryConfig, step_span_ratio
from verispec.request import StepRecord

SERVICE_NAME = "verispec"
TRACER_NAME = "verispec"

# Span names.
SPAN_QUEUE = "queue"
SPAN_PREFILL = "prefill"
SPAN_DRAFT = "spec.draft"
SPAN_VERIFY = "spec.verify"

# Request span attributes (OpenTelemetry gen_ai semantic conventions, then verispec's own).
ATTR_OPERATION = "gen_ai.operation.name"
ATTR_SYSTEM = "gen_ai.system"
ATTR_REQUEST_MODEL = "gen_ai.request.model"
ATTR_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
ATTR_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
ATTR_REQUEST_TOP_P = "gen_ai.request.top_p"
ATTR_REQUEST_TOP_K = "gen_ai.request.top_k"
ATTR_REQUEST_SEED = "gen_ai.request.seed"
ATTR_RESPONSE_ID = "gen_ai.response.id"
ATTR_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
ATTR_USAGE_INPUT = "gen_ai.usage.input_tokens"
ATTR_USAGE_OUTPUT = "gen_ai.usage.output_tokens"
ATTR_SPEC_DRAFTER = "verispec.spec.drafter"
ATTR_SPEC_STEPS = "verispec.spec.num_steps"
ATTR_SPEC_DRAFT_TOKENS = "verispec.spec.num_draft_tokens"
ATTR_SPEC_ACCEPTED = "verispec.spec.num_accepted_tokens"
ATTR_SPEC_MEAN_ACCEPTED = "verispec.spec.mean_accepted_length"
ATTR_SPEC_DRAFT_SECONDS = "verispec.spec.draft_seconds"
ATTR_SPEC_VERIFY_SECONDS = "verispec.spec.verify_seconds"
ATTR_REQUEST_ID = "verispec.request_id"
# Step span attributes.
ATTR_STEP = "verispec.step"
ATTR_STEP_DRAFTER = "verispec.spec.drafter"
ATTR_STEP_NUM_DRAFT = "verispec.spec.num_draft_tokens"
ATTR_STEP_NUM_ACCEPTED = "verispec.spec.num_accepted"
ATTR_STEP_NUM_EMITTED = "verispec.spec.num_emitted"
ATTR_STEP_BONUS = "verispec.spec.bonus"
ATTR_STEP_RECOVERED = "verispec.spec.recovered"
ATTR_STEP_POSITION = "verispec.spec.position"
ATTR_BATCH_SIZE = "verispec.batch.size"  # sequences in the forward pass the step ended in
ATTR_BATCH_TOKENS = "verispec.batch.tokens"  # tokens in that forward pass

_SPAN_NAMES = {"queue": SPAN_QUEUE, "prefill": SPAN_PREFILL, "draft": SPAN_DRAFT, "verify": SPAN_VERIFY}


def configure_logging(config: TelemetryConfig, stream: Any = None) -> None:
    """structlog to stderr: JSON lines (or console) carrying trace_id, span_id and request_id."""
    level = getattr(logging, config.log_level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if config.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


def configure_tracing(exporter_names: Iterable[str], protocol: str) -> TracerProvider:
    """A tracer provider exporting to each named exporter: otlp, console (none: no export)."""
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME, "service.version": __version__}))
    for name in exporter_names:
        exporter = _exporter(name.strip(), protocol)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter(name: str, protocol: str) -> SpanExporter | None:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

            return Http()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        return Grpc()
    return None


class StepSpans:
    """Turns an engine's StepRecords into child spans with the engine's own timestamps."""

    def __init__(self, setting: str, tracer: trace.Tracer | None = None) -> None:
        self.ratio = step_span_ratio(setting) or 0.0
        self._tracer = tracer

    @property
    def tracer(self) -> trace.Tracer:
        return self._tracer or trace.get_tracer(TRACER_NAME, __version__)

    def wanted(self) -> bool:
        """Whether this request records its steps (decided once per request)."""
        return self.ratio >= 1.0 or (self.ratio > 0.0 and random.random() < self.ratio)

    def emit(self, parent: trace.Span, records: Iterable[StepRecord]) -> None:
        context = trace.set_span_in_context(parent)
        for record in records:
            span = self.tracer.start_span(
                _SPAN_NAMES[record.kind],
                context=context,
                start_time=record.start_ns,
                attributes=_step_attributes(record),
            )
            span.end(end_time=record.end_ns)


def _step_attributes(record: StepRecord) -> Mapping[str, Any]:
    if record.kind == "queue":
        return {}
    attributes: dict[str, Any] = {ATTR_BATCH_SIZE: record.batch_size, ATTR_BATCH_TOKENS: record.batch_tokens}
    if record.kind == "prefill":
        attributes[ATTR_STEP_NUM_EMITTED] = record.num_emitted
        return attributes
    attributes.update(
        {
            ATTR_STEP: record.step,
            ATTR_STEP_DRAFTER: record.drafter,
            ATTR_STEP_NUM_DRAFT: record.num_draft_tokens,
            ATTR_STEP_POSITION: record.position,
        }
    )
    if record.kind == "verify":
        attributes[ATTR_STEP_NUM_ACCEPTED] = record.num_accepted
        attributes[ATTR_STEP_NUM_EMITTED] = record.num_emitted
        attributes[ATTR_STEP_BONUS] = record.bonus
        attributes[ATTR_STEP_RECOVERED] = record.num_accepted < record.num_draft_tokens
    return attributes
