"""Tokens a step emitted -> the request's StepOutput: stop rules, incremental text, logprobs, final stats."""

from __future__ import annotations

import torch

from verispec.engine.sequence import Sequence
from verispec.request import FinishReason, StepOutput, TokenLogprob
from verispec.sampling import logprobs


class OutputProcessor:
    """Applies every stop rule token by token and builds each request's outputs (engine thread)."""

    def __init__(self, eos_token_ids: set[int], max_context_length: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_context_length = max_context_length

    def emit(self, seq: Sequence, token_ids: list[int], logits: torch.Tensor) -> StepOutput:
        """Appends the step's tokens one by one, stopping at the first stop rule; `logits` [n, vocab]
        are the target's rows the tokens were chosen from (for logprobs)."""
        request, stopping = seq.request, seq.request.stopping
        emitted: list[int] = []
        pieces: list[str] = []
        reason: FinishReason | None = None
        stop = ""
        for token_id in token_ids:
            emitted.append(token_id)
            seq.output_ids.append(token_id)
            seq.context.append(token_id)
            seq.sampler.observe([token_id])
            if token_id in self.eos_token_ids:
                reason = FinishReason.EOS
            elif token_id in stopping.stop_token_ids:
                reason = FinishReason.STOP_TOKEN
            else:
                piece, stop = seq.text.push(token_id, len(seq.output_ids) > stopping.min_new_tokens)
                pieces.append(piece)
                if stop:
                    reason = FinishReason.STOP_SEQUENCE
                elif len(seq.output_ids) >= stopping.max_new_tokens or len(seq.context) >= self.max_context_length:
                    reason = FinishReason.LENGTH
            if reason is not None:
                break
        token_logprobs: tuple[TokenLogprob, ...] = ()
        if request.response.logprobs or request.response.top_logprobs:
            token_logprobs = tuple(
                TokenLogprob(token_id, value, tuple(top))
                for token_id, (value, top) in zip(
                    emitted, logprobs(logits, emitted, request.response.top_logprobs), strict=True
                )
            )
        if reason is not None:
            pieces.append(seq.text.flush() if reason is not FinishReason.STOP_SEQUENCE else "")
            return final(seq, reason, "".join(pieces), tuple(emitted), token_logprobs, stop)
        return StepOutput(
            request_id=request.request_id,
            token_ids=tuple(emitted),
            text="".join(pieces),
            logprobs=token_logprobs,
            seed=request.sampling.seed,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_generated_tokens=len(seq.output_ids),
        )


def final(
    seq: Sequence,
    reason: FinishReason,
    text: str = "",
    token_ids: tuple[int, ...] = (),
    token_logprobs: tuple[TokenLogprob, ...] = (),
    stop: str = "",
    error: str = "",
) -> StepOutput:
    """The last output of a request: its finish reason, usage and speculation stats, its step records."""
    request = seq.request
    return StepOutput(
        request_id=request.request_id,
        token_ids=token_ids,
        text=text,
        logprobs=token_logprobs,
        finish_reason=reason,
        stop_sequence=stop,
        error=error,
        num_prompt_tokens=len(request.prompt_token_ids),
        num_generated_tokens=len(seq.output_ids),
        seed=request.sampling.seed,
        spec=seq.stats,
        records=tuple(seq.records),
    )
