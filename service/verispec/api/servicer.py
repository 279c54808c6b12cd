"""The verispec.v1.GenerationService servicer: validate, submit, stream, trace, map errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import structlog
from opentelemetry import propagate, trace

from verispec import __version__, telemetry
from verispec.api import convert
from verispec.api.status import internal, to_status
from verispec.config import Config
from verispec.errors import InvalidRequestError, NotReadyError, VerispecError
from verispec.loader import LoadedModels
from verispec.metrics import Metrics
from verispec.request import FinishReason, Request, ResultAccumulator, SpeculationMode, StepOutput
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass
class ServiceState:
    """What the servicer serves from: the loaded models once ready, and the lifecycle phase."""

    config: Config
    models: LoadedModels | None = None
    phase: pb.ServingStatus.ValueType = pb.SERVING_STATUS_LOADING
    started: float = field(default_factory=time.monotonic)

    def ready(self) -> LoadedModels:
        if self.models is None or self.phase != pb.SERVING_STATUS_SERVING:
            state = pb.ServingStatus.Name(self.phase).removeprefix("SERVING_STATUS_").lower()
            raise NotReadyError(f"the service is not serving requests ({state})")
        return self.models

    def limits(self, models: LoadedModels) -> convert.Limits:
        return convert.Limits(
            engine=self.config.engine,
            spec=self.config.spec,
            vocab_size=models.target.vocab_size,
            max_context_length=models.target.max_context_length,
            has_draft_model=models.draft is not None,
        )


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves the contract; domain errors become statuses here and nowhere else."""

    def __init__(self, state: ServiceState, step_spans: telemetry.StepSpans, metrics: Metrics) -> None:
        self.state = state
        self.step_spans = step_spans
        self.metrics = metrics
        self.tracer = trace.get_tracer(telemetry.TRACER_NAME, __version__)

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        result = ResultAccumulator()
        validated: Request | None = None
        async for domain, out in self._run("Generate", request, context):
            validated = domain
            result.add(out)
        assert validated is not None
        return convert.unary_response(validated, result, self._models().tokenizer)

    async def StreamGenerate(  # noqa: N802
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        first = True
        async for domain, out in self._run("StreamGenerate", request, context):
            yield convert.stream_response(out, domain, self._models().tokenizer, first)
            first = False

    async def _run(
        self, method: str, msg: convert.AnyGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tuple[Request, StepOutput]]:
        """Validates, submits and yields the engine's outputs inside the request's span."""
        arrived = time.monotonic()
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        request_id = uuid.uuid4().hex
        with (
            self.tracer.start_as_current_span(
                f"{SERVICE_NAME}/{method}", context=parent, kind=trace.SpanKind.SERVER
            ) as span,
            structlog.contextvars.bound_contextvars(request_id=request_id),
        ):
            try:
                request = await self._validate(msg, request_id, context)
            except VerispecError as exc:
                await self._reject(context, span, exc)
            self._log_start(method, request, span)
            timing = _Timing(arrived, self.metrics)
            last: StepOutput | None = None
            completion: list[str] = []
            try:
                async for out in self._models().engine.generate(request):
                    last = out
                    timing.observe(out)
                    completion.append(out.text)
                    if out.finish_reason is FinishReason.ERROR:
                        break
                    yield request, out
            except VerispecError as exc:
                await self._reject(context, span, exc)
            finally:
                if last is not None and last.finished:
                    self._finish(span, last, "".join(completion))
            if last is not None and last.finish_reason is FinishReason.ERROR:
                span.set_status(trace.StatusCode.ERROR, last.error)
                await _abort(context, internal(f"generation failed: {last.error}"))
            if last is not None and last.finish_reason is FinishReason.CANCELLED and _past(request.deadline):
                # The engine stopped at the caller's deadline: say so, rather than send a late OK.
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline passed after {last.num_generated_tokens} tokens"
                )

    async def _reject(
        self, context: grpc.aio.ServicerContext[Any, Any], span: trace.Span, exc: VerispecError
    ) -> NoReturn:
        status = to_status(exc)
        log.info("request.rejected", code=status.code.name, error=str(exc))
        span.set_status(trace.StatusCode.ERROR, str(exc))
        self.metrics.rejected.labels(status.code.name).inc()
        await _abort(context, status)

    def _log_start(self, method: str, request: Request, span: trace.Span) -> None:
        _request_attributes(span, request, self.state.config.model.model)
        extra = {}
        if self.state.config.telemetry.log_prompts:
            extra["prompt"] = self._models().tokenizer.decode(request.prompt_token_ids)
        log.info(
            "request.start",
            method=method,
            prompt_tokens=len(request.prompt_token_ids),
            max_new_tokens=request.stopping.max_new_tokens,
            speculation=request.speculation.mode.value,
            **extra,
        )

    async def _validate(
        self, msg: convert.AnyGenerateRequest, request_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Request:
        models = self.state.ready()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        limits = self.state.limits(models)
        record = self.step_spans.wanted()
        # Tokenizing a long prompt takes a while: keep it off the event loop.
        return await asyncio.to_thread(
            convert.request_from_proto, msg, request_id, models.tokenizer, limits, deadline, record
        )

    def _finish(self, span: trace.Span, last: StepOutput, completion: str) -> None:
        """Step spans, final attributes, the finish log line and metrics of one request."""
        assert last.finish_reason is not None
        self.metrics.on_finish(last.finish_reason, last.num_prompt_tokens, last.num_generated_tokens)
        self.step_spans.emit(span, last.records)
        spec = last.spec
        span.set_attributes(
            {
                telemetry.ATTR_RESPONSE_FINISH_REASONS: [last.finish_reason.value],
                telemetry.ATTR_USAGE_INPUT: last.num_prompt_tokens,
                telemetry.ATTR_USAGE_OUTPUT: last.num_generated_tokens,
            }
        )
        if spec is not None:
            span.set_attributes(
                {
                    telemetry.ATTR_SPEC_DRAFTER: spec.drafter,
                    telemetry.ATTR_SPEC_STEPS: spec.num_steps,
                    telemetry.ATTR_SPEC_DRAFT_TOKENS: spec.num_draft_tokens,
                    telemetry.ATTR_SPEC_ACCEPTED: spec.num_accepted_tokens,
                    telemetry.ATTR_SPEC_MEAN_ACCEPTED: spec.mean_accepted_length,
                    telemetry.ATTR_SPEC_DRAFT_SECONDS: spec.draft_seconds,
                    telemetry.ATTR_SPEC_VERIFY_SECONDS: spec.verify_seconds,
                }
            )
        log.info(
            "request.finish",
            finish_reason=last.finish_reason.value,
            prompt_tokens=last.num_prompt_tokens,
            completion_tokens=last.num_generated_tokens,
            steps=spec.num_steps if spec else 0,
            accepted=spec.num_accepted_tokens if spec else 0,
            **({"completion": completion} if self.state.config.telemetry.log_prompts else {}),
        )

    def _models(self) -> LoadedModels:
        """The loaded models, for requests already admitted (they finish even while draining)."""
        assert self.state.models is not None
        return self.state.models

    async def Health(  # noqa: N802
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HealthResponse:
        models = self.state.models
        response = pb.HealthResponse(
            status=self.state.phase,
            version=__version__,
            model_loaded=models is not None,
            draft_loaded=models is not None and models.draft is not None,
            uptime_seconds=time.monotonic() - self.state.started,
            last_step_age_seconds=-1.0,
            recent_acceptance_rate=-1.0,
        )
        if models is not None:
            convert.health_from_stats(response, models.engine.stats())
            requests = response.active_requests + response.queue_depth
            response.load = max(response.kv_utilization, requests / self.state.config.engine.max_active_requests)
        convert.health_from_cost(response, self.metrics.cost.snapshot())
        return response

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        try:
            tokenizer = self.state.ready().tokenizer
            ids = await asyncio.to_thread(_tokenize, tokenizer.encode, tokenizer.encode_chat, request)
        except VerispecError as exc:
            await _abort(context, to_status(exc))
        tokens = [tokenizer.token_text(t) for t in ids] if request.return_tokens else []
        return pb.TokenizeResponse(token_ids=ids, tokens=tokens, count=len(ids))

    async def ModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        try:
            models = self.state.ready()
        except VerispecError as exc:
            await _abort(context, to_status(exc))
        target, draft, spec, engine = models.target, models.draft, self.state.config.spec, self.state.config.engine
        stats = models.engine.stats()
        return pb.ModelInfoResponse(
            model_id=target.model_id,
            backend=target.backend,
            quantization=target.quantization,
            bits_per_weight=target.bits_per_weight,
            max_context_length=target.max_context_length,
            vocab_size=target.vocab_size,
            dtype=target.dtype,
            devices=target.devices,
            gpu_split_gb=target.gpu_split_gb,
            cache_mode=target.cache_mode,
            draft_model_id=draft.model_id if draft else "",
            drafter=models.auto_drafter,
            default_speculation_mode=convert.SPECULATION_MODE_TO_PB[SpeculationMode(spec.default_mode)],
            default_num_draft_tokens=spec.default_num_draft_tokens,
            max_num_draft_tokens=spec.max_num_draft_tokens,
            max_new_tokens=engine.max_new_tokens_limit,
            version=__version__,
            kv_page_size=stats.kv_page_size,
            kv_pages_total=stats.kv_pages_total,
            kv_bytes_per_token=stats.kv_bytes_per_token,
            kv_cache_bytes=stats.kv_pages_total * stats.kv_page_size * stats.kv_bytes_per_token,
            max_batch_tokens=engine.max_batch_tokens,
            scheduling=engine.scheduling,
        )


class _Timing:
    """Time to first token and inter-token latency of one request, as its outputs arrive."""

    def __init__(self, arrived: float, metrics: Metrics) -> None:
        self.previous = arrived
        self.first = True
        self.metrics = metrics

    def observe(self, out: StepOutput) -> None:
        if not out.token_ids:
            return
        self.metrics.on_tokens(len(out.token_ids))
        now = time.monotonic()
        if self.first:
            self.metrics.ttft.observe(now - self.previous)
            self.first = False
        else:
            self.metrics.itl.observe((now - self.previous) / len(out.token_ids))
        self.previous = now


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _tokenize(
    encode: Callable[[str], list[int]],
    encode_chat: Callable[[list[tuple[str, str]]], list[int]],
    request: pb.TokenizeRequest,
) -> list[int]:
    if request.text and request.messages:
        raise InvalidRequestError("text", "set text or messages, not both")
    if request.messages:
        return encode_chat(convert.messages_from_proto(request.messages))
    return encode(request.text)


def _request_attributes(span: trace.Span, request: Request, model: str) -> None:
    sampling = request.sampling
    span.set_attributes(
        {
            telemetry.ATTR_OPERATION: "text_completion",
            telemetry.ATTR_SYSTEM: telemetry.SERVICE_NAME,
            telemetry.ATTR_REQUEST_MODEL: model,
            telemetry.ATTR_REQUEST_MAX_TOKENS: request.stopping.max_new_tokens,
            telemetry.ATTR_REQUEST_TEMPERATURE: sampling.temperature,
            telemetry.ATTR_REQUEST_TOP_P: sampling.top_p,
            telemetry.ATTR_REQUEST_TOP_K: sampling.top_k,
            telemetry.ATTR_REQUEST_SEED: sampling.seed,
            telemetry.ATTR_RESPONSE_ID: request.request_id,
            telemetry.ATTR_REQUEST_ID: request.request_id,
        }
    )
