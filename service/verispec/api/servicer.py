"""The verispec.v1.GenerationService servicer: validate, submit, stream, trace, map errors."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from opentelemetry import propagate, trace

from verispec import __version__, telemetry
from verispec.api import convert
from verispec.api.status import deadline_exceeded, internal, refuse, to_status
from verispec.api.tokenizing import SMALL_INPUT_CHARS, TokenizerLane
from verispec.config import Config
from verispec.engine.async_engine import OutputStream
from verispec.errors import InvalidRequestError, NotReadyError, VerispecError
from verispec.loader import LoadedModels
from verispec.metrics import Metrics
from verispec.request import FinishReason, Request, ResultAccumulator, SpeculationMode, StepOutput
from verispec.tokenizer import Tokenizer
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


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves the contract; domain errors become statuses here and nowhere else."""

    def __init__(self, state: ServiceState, step_spans: telemetry.StepSpans, metrics: Metrics) -> None:
        self.state = state
        self.step_spans = step_spans
        self.metrics = metrics
        self.tracer = trace.get_tracer(telemetry.TRACER_NAME, __version__)
        # Large inputs are tokenized one at a time; what waits for it is bounded in characters.
        self.tokenizing = TokenizerLane(max_queued_chars=4 * state.config.server.max_message_bytes)

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        result = ResultAccumulator()

        async def collect(_: Request, out: StepOutput) -> None:
            result.add(out)

        validated = await self._run("Generate", request, context, collect)
        if validated is None:  # refused: the status is set on the context, this response discarded
            return pb.GenerateResponse()
        return convert.unary_response(validated, result, self._models().tokenizer)

    async def StreamGenerate(  # type: ignore[override]  # noqa: N802 (grpc.aio's writer API: the stubs type only generators)
        self, request: pb.StreamGenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        # A coroutine that writes, not an async generator: a stream that is reset or cancelled
        # unwinds here, in its own task and context (spans and log context are left where they were
        # entered), and the engine request is aborted at once rather than when a generator is collected.
        first = True

        async def send(domain: Request, out: StepOutput) -> None:
            nonlocal first
            message = convert.stream_response(out, domain, self._models().tokenizer, first)
            first = False
            await context.write(message)

        await self._run("StreamGenerate", request, context, send)

    async def _run(
        self,
        method: str,
        msg: convert.AnyGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        emit: Callable[[Request, StepOutput], Awaitable[None]],
    ) -> Request | None:
        """Validates, submits and hands each engine output to `emit`, inside the request's span; the
        request served, or None when the call was refused (its status set on the context)."""
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
                self._log_start(method, request, span)
                stream = self._models().engine.stream(request, self.state.config.server.stream_stall_timeout_s)
            except VerispecError as exc:
                await self._reject(context, span, exc)
                return None
            timing = _Timing(arrived, self.metrics)
            run = _RunState()
            try:
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        run.observe(out)
                        timing.observe(out)
                        if out.finish_reason is FinishReason.ERROR:
                            break
                        await emit(request, out)
            finally:
                # Every request that started ends with one finish line and one requests_total count,
                # cancelled, timed out and stalled ones included.
                self._finish(span, request, run, _cause(stream, request, context))
            last = run.last
            if last is not None and last.finish_reason is FinishReason.ERROR:
                span.set_status(trace.StatusCode.ERROR, last.error)
                await refuse(context, internal(f"generation failed: {last.error}"))
                return None
            if last is not None and last.finish_reason is FinishReason.CANCELLED and _past(request.deadline):
                # The engine stopped at the caller's deadline: say so, rather than send a late OK.
                await refuse(context, deadline_exceeded(f"deadline passed after {last.num_generated_tokens} tokens"))
                return None
            return request

    async def _reject(self, context: grpc.aio.ServicerContext[Any, Any], span: trace.Span, exc: VerispecError) -> None:
        status = to_status(exc)
        log.info("request.rejected", code=status.code.name, error=str(exc))
        span.set_status(trace.StatusCode.ERROR, str(exc))
        self.metrics.rejected.labels(status.code.name).inc()
        await refuse(context, status)

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
        if convert.input_chars(msg) >= SMALL_INPUT_CHARS:
            self.tokenizing.release_memory_soon()
        # Tokenizing a long prompt takes a while: off the event loop, bounded (see TokenizerLane).
        return await self.tokenizing.run(
            convert.chars_to_tokenize(msg, models.tokenizer, limits),
            convert.request_from_proto,
            msg,
            request_id,
            models.tokenizer,
            limits,
            deadline,
            record,
        )

    def _finish(self, span: trace.Span, request: Request, run: _RunState, cause: str) -> None:
        """Step spans, final attributes, the finish log line and metrics of one request; a request
        whose outputs stopped before the last (caller gone, deadline, stalled) counts as cancelled."""
        last = run.last if run.last is not None and run.last.finished else None
        reason = last.finish_reason if last is not None and last.finish_reason is not None else FinishReason.CANCELLED
        prompt_tokens = len(request.prompt_token_ids)
        self.metrics.on_finish(reason, prompt_tokens, run.num_generated)
        span.set_attributes(
            {
                telemetry.ATTR_RESPONSE_FINISH_REASONS: [reason.value],
                telemetry.ATTR_USAGE_INPUT: prompt_tokens,
                telemetry.ATTR_USAGE_OUTPUT: run.num_generated,
            }
        )
        spec = last.spec if last is not None else None
        if last is not None:
            self.step_spans.emit(span, last.records)
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
        extra: dict[str, Any] = {"cause": cause} if cause else {}
        if self.state.config.telemetry.log_prompts:
            extra["completion"] = "".join(run.completion)
        log.info(
            "request.finish",
            finish_reason=reason.value,
            prompt_tokens=prompt_tokens,
            completion_tokens=run.num_generated,
            steps=spec.num_steps if spec else 0,
            accepted=spec.num_accepted_tokens if spec else 0,
            **extra,
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
            response.weight_bytes = models.target.weight_bytes
            requests = response.active_requests + response.queue_depth
            response.load = max(response.kv_utilization, requests / self.state.config.engine.max_active_requests)
        convert.health_from_cost(response, self.metrics.cost.snapshot())
        return response

    async def Tokenize(  # noqa: N802
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        try:
            tokenizer = self.state.ready().tokenizer
            max_bytes = self.state.config.server.max_message_bytes
            if convert.input_chars(request) >= SMALL_INPUT_CHARS:
                self.tokenizing.release_memory_soon()
            # The whole answer, per-token text included, is built off the event loop.
            return await self.tokenizing.run(convert.input_chars(request), _tokenize, tokenizer, request, max_bytes)
        except VerispecError as exc:
            await refuse(context, to_status(exc))
            return pb.TokenizeResponse()

    async def ModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        try:
            models = self.state.ready()
        except VerispecError as exc:
            await refuse(context, to_status(exc))
            return pb.ModelInfoResponse()
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
            weight_bytes=target.weight_bytes,
        )


@dataclass
class _RunState:
    """What one request has produced so far, for its finish line."""

    last: StepOutput | None = None
    num_generated: int = 0
    completion: list[str] = field(default_factory=list)

    def observe(self, out: StepOutput) -> None:
        self.last = out
        self.num_generated = out.num_generated_tokens
        self.completion.append(out.text)


def _cause(stream: OutputStream, request: Request, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Why a request ended before its last output: the reader stalled, the deadline, or the caller left."""
    if stream.finished:
        return ""
    if stream.stalled:
        return "stalled"
    if _past(request.deadline):
        return "deadline"
    return "caller_cancelled"


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


def _tokenize(tokenizer: Tokenizer, request: pb.TokenizeRequest, max_bytes: int) -> pb.TokenizeResponse:
    """Tokenize's answer, refused (from its size, before it is built) when it would not fit in one
    message of max_bytes. Built in slices: no single call holds the GIL for long."""
    if request.text and request.messages:
        raise InvalidRequestError("text", "set text or messages, not both")
    if request.messages:
        field, ids = "messages", tokenizer.encode_chat(convert.messages_from_proto(request.messages))
    else:
        field, ids = "text", tokenizer.encode(request.text)
    tokens = [tokenizer.token_text(t) for t in ids] if request.return_tokens else []
    size = _answer_bytes(ids, tokens)
    if size > max_bytes:
        num_ids = len(ids)
        del ids, tokens  # nothing large stays referenced from the error
        hint = "; return_tokens=false shortens it" if request.return_tokens else ""
        raise InvalidRequestError(
            field,
            f"{num_ids} tokens: the answer would take {size} bytes, more than the largest message "
            f"({max_bytes} bytes, --max-message-bytes); send less text{hint}",
        )
    response = pb.TokenizeResponse(count=len(ids))
    for start in range(0, len(ids), _SLICE):
        response.token_ids.extend(ids[start : start + _SLICE])
        response.tokens.extend(tokens[start : start + _SLICE])
    return response


_SLICE = 16_384


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _answer_bytes(ids: list[int], tokens: list[str]) -> int:
    """Serialized size of a TokenizeResponse (packed ids, one length-prefixed string per token)."""
    packed = sum(map(_varint_bytes, ids))
    strings = 0
    for text in tokens:
        n = len(text.encode())
        strings += 1 + _varint_bytes(n) + n
    return 1 + _varint_bytes(packed) + packed + strings + 1 + _varint_bytes(len(ids))


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
