"""Proto <-> domain: validates a request field by field and builds the responses."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from verispec.config import EngineConfig, SpecConfig
from verispec.errors import InvalidRequestError
from verispec.request import (
    FinishReason,
    Request,
    ResponseOptions,
    ResultAccumulator,
    SamplingParams,
    SpeculationMode,
    SpeculationParams,
    StepOutput,
    StoppingCriteria,
    TokenLogprob,
)
from verispec.tokenizer import Tokenizer
from verispec_proto.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from verispec.cost import CostSnapshot
    from verispec.engine.core import EngineStats

MAX_TOP_LOGPROBS = 5
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-3  # smaller positive values are degenerate: use 0 for greedy
MIN_REPETITION_PENALTY = 0.01  # dividing logits by less overflows them
MAX_REPETITION_PENALTY = 10.0
VALID_ROLES = ("system", "user", "assistant")

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
SPECULATION_MODES = {
    pb.SPECULATION_MODE_AUTO: SpeculationMode.AUTO,
    pb.SPECULATION_MODE_OFF: SpeculationMode.OFF,
    pb.SPECULATION_MODE_DRAFT_MODEL: SpeculationMode.DRAFT_MODEL,
    pb.SPECULATION_MODE_NGRAM: SpeculationMode.NGRAM,
}
SPECULATION_MODE_TO_PB = {mode: value for value, mode in SPECULATION_MODES.items()}


class AnyGenerateRequest(Protocol):
    """The fields GenerateRequest and StreamGenerateRequest share."""

    prompt: str
    max_new_tokens: int
    min_new_tokens: int
    time_limit_ms: int
    truncate_input_tokens: int

    @property
    def messages(self) -> Sequence[pb.ChatMessage]: ...
    @property
    def stop(self) -> Sequence[str]: ...
    @property
    def stop_token_ids(self) -> Sequence[int]: ...
    @property
    def sampling(self) -> pb.SamplingParams: ...
    @property
    def response(self) -> pb.ResponseOptions: ...
    @property
    def speculation(self) -> pb.SpeculationParams: ...


@dataclass(frozen=True)
class Limits:
    """What the server allows, from its config and the loaded model."""

    engine: EngineConfig
    spec: SpecConfig
    vocab_size: int
    max_context_length: int
    has_draft_model: bool


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(field, message)


def _check_range(value: float, field: str, low: float, high: float, low_open: bool = False) -> None:
    _check(math.isfinite(value), field, f"must be a finite number, got {value}")
    inside = (low < value if low_open else low <= value) and value <= high
    bracket = "(" if low_open else "["
    _check(inside, field, f"must be in {bracket}{low}, {high}], got {value}")


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Validated sampling settings; an unset seed becomes a fresh random one (returned to the caller)."""
    _check_range(msg.temperature, "sampling.temperature", 0.0, MAX_TEMPERATURE)
    # Below MIN_TEMPERATURE, logits / temperature overflow float32 into inf and the softmax into NaN.
    _check(
        msg.temperature == 0.0 or msg.temperature >= MIN_TEMPERATURE,
        "sampling.temperature",
        f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {msg.temperature}",
    )
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    _check_range(top_p, "sampling.top_p", 0.0, 1.0, low_open=True)
    _check_range(msg.min_p, "sampling.min_p", 0.0, 1.0)
    typical_p = msg.typical_p if msg.HasField("typical_p") else 1.0
    _check_range(typical_p, "sampling.typical_p", 0.0, 1.0, low_open=True)
    repetition = msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0
    _check_range(repetition, "sampling.repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    _check_range(msg.presence_penalty, "sampling.presence_penalty", -2.0, 2.0)
    _check_range(msg.frequency_penalty, "sampling.frequency_penalty", -2.0, 2.0)
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=top_p,
        min_p=msg.min_p,
        typical_p=typical_p,
        repetition_penalty=repetition,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else secrets.randbits(63),
    )


def messages_from_proto(messages: Sequence[pb.ChatMessage], field: str = "messages") -> list[tuple[str, str]]:
    """(role, content) pairs; a role is exactly one of VALID_ROLES (content is text, never control tokens)."""
    result = []
    for i, message in enumerate(messages):
        _check(bool(message.role), f"{field}[{i}].role", "must not be empty")
        _check(
            message.role in VALID_ROLES,
            f"{field}[{i}].role",
            f"must be one of {', '.join(VALID_ROLES)}, got {message.role[:40]!r}",
        )
        result.append((message.role, message.content))
    return result


def input_chars(msg: AnyGenerateRequest | pb.TokenizeRequest) -> int:
    """Characters a request asks to tokenize (prompt or text, plus every message's content)."""
    text = msg.text if isinstance(msg, pb.TokenizeRequest) else msg.prompt
    return len(text) + sum(len(m.role) + len(m.content) for m in msg.messages)


def chars_to_tokenize(msg: AnyGenerateRequest, tokenizer: Tokenizer, limits: Limits) -> int:
    """Characters a generation request will tokenize (a truncated prompt's tail only). Input that
    cannot fit the context window is refused here, by its size: cheap enough for the event loop."""
    if msg.truncate_input_tokens:
        if msg.messages:
            return input_chars(msg)
        return len(tail(msg.prompt, _tail_bytes(msg.truncate_input_tokens, tokenizer, limits)))
    field, num_bytes = "prompt", len(msg.prompt.encode())
    if msg.messages and not msg.prompt:
        field, num_bytes = "messages", sum(len(m.content.encode()) for m in msg.messages)
    _check_fits(num_bytes, field, tokenizer, limits)
    return input_chars(msg)


def _check_fits(text_bytes: int, field: str, tokenizer: Tokenizer, limits: Limits) -> None:
    """Refuses, before tokenizing, input too long for the context window whatever its tokens: no token
    spans more than tokenizer.max_token_bytes bytes, so the input has at least that many tokens."""
    longest = limits.max_context_length - 1
    fewest = -(-text_bytes // tokenizer.max_token_bytes)
    _check(
        fewest <= longest,
        field,
        f"{text_bytes} bytes are at least {fewest} tokens, more than the context window takes ({longest} input "
        "tokens at most); set truncate_input_tokens to keep the last ones",
    )


def prompt_token_ids(msg: AnyGenerateRequest, tokenizer: Tokenizer, limits: Limits) -> list[int]:
    """Tokenizes the prompt or chat, applies truncation and checks the context window.

    Input that cannot fit is refused by its size before it is tokenized. With truncate_input_tokens
    only the prompt's tail that n tokens can span is tokenized (max_token_bytes per token, with a
    margin), so a long prompt costs no more than a short one.
    """
    has_prompt, has_messages = bool(msg.prompt), bool(msg.messages)
    _check(not (has_prompt and has_messages), "prompt", "set prompt or messages, not both")
    _check(has_prompt or has_messages, "prompt", "empty: set prompt or messages")
    if has_prompt:
        field, text = "prompt", msg.prompt
        if msg.truncate_input_tokens:
            text = tail(text, _tail_bytes(msg.truncate_input_tokens, tokenizer, limits))
        else:
            _check_fits(len(text.encode()), field, tokenizer, limits)
        ids = tokenizer.encode(text)
    else:
        messages = messages_from_proto(msg.messages)
        if not msg.truncate_input_tokens:
            _check_fits(sum(len(c.encode()) for _, c in messages), "messages", tokenizer, limits)
        field, ids = "messages", tokenizer.encode_chat(messages)
    _check(bool(ids), field, "tokenizes to nothing")
    if msg.truncate_input_tokens and len(ids) > msg.truncate_input_tokens:
        ids = ids[-msg.truncate_input_tokens :]
    longest = limits.max_context_length - 1
    _check(
        len(ids) <= longest,
        field,
        f"{len(ids)} tokens exceed the context window ({longest} input tokens at most);"
        " set truncate_input_tokens to keep the last ones",
    )
    return ids


_TAIL_MARGIN_TOKENS = 16  # tokens of slack where a truncated prompt's tail is cut before tokenizing


def _tail_bytes(keep_tokens: int, tokenizer: Tokenizer, limits: Limits) -> int:
    """Bytes of a prompt's end that hold its last keep_tokens tokens (more than the window takes is refused)."""
    keep = min(keep_tokens, limits.max_context_length - 1)
    return (keep + _TAIL_MARGIN_TOKENS) * tokenizer.max_token_bytes


def tail(text: str, max_bytes: int) -> str:
    """The end of `text` holding at most about max_bytes bytes of UTF-8 (all of it when shorter)."""
    if len(text) * 4 <= max_bytes:  # no character takes more than 4 bytes
        return text
    data = text.encode()
    return text if len(data) <= max_bytes else data[-max_bytes:].decode(errors="ignore")


def request_from_proto(
    msg: AnyGenerateRequest,
    request_id: str,
    tokenizer: Tokenizer,
    limits: Limits,
    deadline: float | None = None,
    record_steps: bool = False,
) -> Request:
    """A validated domain Request; raises InvalidRequestError naming the first bad field."""
    engine = limits.engine
    max_new = msg.max_new_tokens or engine.default_max_new_tokens
    _check(
        max_new <= engine.max_new_tokens_limit,
        "max_new_tokens",
        f"{max_new} exceeds the server limit of {engine.max_new_tokens_limit}",
    )
    _check(
        msg.min_new_tokens <= max_new,
        "min_new_tokens",
        f"{msg.min_new_tokens} exceeds max_new_tokens ({max_new})",
    )
    _check(
        len(msg.stop) <= engine.max_stop_sequences,
        "stop",
        f"{len(msg.stop)} stop sequences, at most {engine.max_stop_sequences}",
    )
    for i, stop in enumerate(msg.stop):
        _check(bool(stop), f"stop[{i}]", "must not be empty")
        _check(
            len(stop) <= engine.max_stop_sequence_chars,
            f"stop[{i}]",
            f"{len(stop)} characters, at most {engine.max_stop_sequence_chars}",
        )
    _check(
        len(msg.stop_token_ids) <= engine.max_stop_token_ids,
        "stop_token_ids",
        f"{len(msg.stop_token_ids)} stop token ids, at most {engine.max_stop_token_ids}",
    )
    for i, token_id in enumerate(msg.stop_token_ids):
        _check(
            token_id < limits.vocab_size,
            f"stop_token_ids[{i}]",
            f"{token_id} is outside the vocabulary (size {limits.vocab_size})",
        )
    sampling = sampling_from_proto(msg.sampling)
    response = msg.response
    _check(
        response.top_logprobs <= MAX_TOP_LOGPROBS,
        "response.top_logprobs",
        f"{response.top_logprobs} exceeds {MAX_TOP_LOGPROBS}",
    )
    speculation = speculation_from_proto(msg.speculation, limits)
    ids = prompt_token_ids(msg, tokenizer, limits)
    return Request(
        request_id=request_id,
        prompt_token_ids=tuple(ids),
        sampling=sampling,
        stopping=StoppingCriteria(
            max_new_tokens=max_new,
            min_new_tokens=msg.min_new_tokens,
            stop_sequences=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            include_stop_sequence=response.include_stop_sequence,
            time_limit_s=msg.time_limit_ms / 1000.0 if msg.time_limit_ms else None,
        ),
        response=ResponseOptions(
            logprobs=response.logprobs,
            top_logprobs=response.top_logprobs,
            echo_input_tokens=response.echo_input_tokens,
        ),
        speculation=speculation,
        deadline=deadline,
        record_steps=record_steps,
    )


def speculation_from_proto(msg: pb.SpeculationParams, limits: Limits) -> SpeculationParams:
    spec = limits.spec
    if msg.mode == pb.SPECULATION_MODE_UNSPECIFIED:
        mode = SpeculationMode(spec.default_mode)
    else:
        _check(msg.mode in SPECULATION_MODES, "speculation.mode", f"unknown mode {msg.mode}")
        mode = SPECULATION_MODES[msg.mode]
    _check(
        mode is not SpeculationMode.DRAFT_MODEL or limits.has_draft_model,
        "speculation.mode",
        "SPECULATION_MODE_DRAFT_MODEL needs a draft model, and this server has none",
    )
    k = msg.num_draft_tokens or spec.default_num_draft_tokens
    return SpeculationParams(mode=mode, num_draft_tokens=min(k, spec.max_num_draft_tokens))


def _logprobs_to_proto(items: Sequence[TokenLogprob], tokenizer: Tokenizer) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=item.token_id,
            token=tokenizer.token_text(item.token_id),
            logprob=item.logprob,
            top_logprobs=[
                pb.TopLogprob(token_id=tid, token=tokenizer.token_text(tid), logprob=value) for tid, value in item.top
            ],
        )
        for item in items
    ]


def input_tokens_to_proto(request: Request, tokenizer: Tokenizer) -> list[pb.InputToken]:
    if not request.response.echo_input_tokens:
        return []
    return [pb.InputToken(token_id=t, token=tokenizer.token_text(t)) for t in request.prompt_token_ids]


def _speculation_stats(out: StepOutput) -> pb.SpeculationStats:
    spec = out.spec
    if spec is None:
        return pb.SpeculationStats()
    return pb.SpeculationStats(
        drafter=spec.drafter,
        num_steps=spec.num_steps,
        num_draft_tokens=spec.num_draft_tokens,
        num_accepted_tokens=spec.num_accepted_tokens,
        mean_accepted_length=spec.mean_accepted_length,
        draft_seconds=spec.draft_seconds,
        verify_seconds=spec.verify_seconds,
    )


def _usage(out: StepOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_generated_tokens)


def _finish_reason(out: StepOutput) -> pb.FinishReason.ValueType:
    assert out.finish_reason is not None
    return FINISH_REASONS[out.finish_reason]


def stream_response(out: StepOutput, request: Request, tokenizer: Tokenizer, first: bool) -> pb.StreamGenerateResponse:
    """One streamed message: the step's delta, plus the final fields on the last message."""
    msg = pb.StreamGenerateResponse(
        request_id=out.request_id,
        text=out.text,
        token_ids=out.token_ids,
        logprobs=_logprobs_to_proto(out.logprobs, tokenizer),
    )
    if first:
        msg.input_tokens.extend(input_tokens_to_proto(request, tokenizer))
    if first or out.finished:
        msg.seed = out.seed
    if out.finished:
        msg.finish_reason = _finish_reason(out)
        msg.stop_sequence = out.stop_sequence
        msg.usage.CopyFrom(_usage(out))
        msg.speculation.CopyFrom(_speculation_stats(out))
    return msg


def unary_response(request: Request, result: ResultAccumulator, tokenizer: Tokenizer) -> pb.GenerateResponse:
    """The whole result of a Generate call, from all of its step outputs."""
    last = result.last
    assert last is not None
    return pb.GenerateResponse(
        request_id=request.request_id,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=_finish_reason(last),
        stop_sequence=last.stop_sequence,
        seed=last.seed,
        usage=_usage(last),
        speculation=_speculation_stats(last),
        logprobs=_logprobs_to_proto(result.logprobs, tokenizer),
        input_tokens=input_tokens_to_proto(request, tokenizer),
    )


def health_from_stats(response: pb.HealthResponse, stats: EngineStats) -> None:
    """Fills Health's engine fields from the engine's snapshot (device memory included: it is read
    on the engine thread)."""
    response.queue_depth = stats.queue_depth
    response.active_requests = stats.active_requests
    if stats.last_step_age_s is not None:
        response.last_step_age_seconds = stats.last_step_age_s
    if stats.recent_acceptance is not None:
        response.recent_acceptance_rate = stats.recent_acceptance
    for device, used, total in stats.memory:
        response.devices.add(device=device, used_bytes=used, total_bytes=total)
    response.kv_pages_used = stats.kv_pages_used
    response.kv_pages_total = stats.kv_pages_total
    response.kv_utilization = stats.kv_pages_used / stats.kv_pages_total if stats.kv_pages_total else 0.0
    response.batch_size = stats.batch_size
    response.batch_tokens = stats.batch_tokens
    response.num_preemptions = stats.num_preemptions


def health_from_cost(response: pb.HealthResponse, cost: CostSnapshot | None) -> None:
    """Fills Health's cost fields from the cost meter's window (negative cost: no profile or no token)."""
    response.cost_usd_per_million_tokens = -1.0
    if cost is None:
        return
    response.cost_profile = cost.profile
    response.cost_hourly_usd = cost.hourly_usd
    response.cost_utilization = cost.utilization
    response.cost_tokens_per_second = cost.tokens_per_s
    if cost.usd_per_million_tokens is not None:
        response.cost_usd_per_million_tokens = cost.usd_per_million_tokens
