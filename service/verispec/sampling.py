"""Logits -> target distribution for one request: penalties, temperature, top-k/p, min-p, typical, draws."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from verispec.errors import SamplingError
from verispec.request import SamplingParams

_MASK64 = (1 << 64) - 1
STREAM_SAMPLE = 0  # draw of the emitted token at a position
STREAM_ACCEPT = 1  # uniform of the accept test at a position
STREAM_DRAFT = 2  # draw of the draft model's token at a position


def position_seed(seed: int, position: int, stream: int) -> int:
    """A 63-bit seed for (request seed, output position, stream): splitmix64 of their mix.

    Keying draws by position (not by how many draws came before) makes sampled output independent
    of how many tokens each speculative step happened to check.
    """
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def uniform(seed: int, position: int, stream: int) -> float:
    """A float in [0, 1) determined by (seed, position, stream)."""
    generator = torch.Generator().manual_seed(position_seed(seed, position, stream))
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def draw(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from `probs` [vocab] (need not sum to 1) with the uniform `u`.

    Raises SamplingError when `probs` holds NaN or infinity or no mass: such a distribution must
    never turn into a token (the last index is what a NaN cdf would give).
    """
    cdf = torch.cumsum(probs.double(), dim=0)
    total = float(cdf[-1])
    if not math.isfinite(total) or total <= 0.0:
        raise SamplingError(f"cannot sample: the distribution sums to {total}")
    target = torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
    index = int(torch.searchsorted(cdf, target, right=True)[0])
    index = min(index, probs.shape[0] - 1)
    while probs[index] <= 0 and index > 0:  # u landed on the right edge of a zero-mass run
        index -= 1
    return index


class Sampler:
    """The target distribution of one request, given what it has generated so far."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt_token_ids: Sequence[int],
        suppress_token_ids: Iterable[int] = (),
        min_new_tokens: int = 0,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.min_new_tokens = min_new_tokens
        self.suppress_token_ids = sorted({t for t in suppress_token_ids if 0 <= t < vocab_size})
        self.num_generated = 0
        self._seen = torch.zeros(vocab_size, dtype=torch.bool)
        self._seen[[t for t in prompt_token_ids if 0 <= t < vocab_size]] = True
        self._counts = torch.zeros(vocab_size, dtype=torch.float32)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    @property
    def batch_greedy(self) -> bool:
        """Greedy with no penalty: the scores are the logits but for suppressed tokens, so many requests'
        argmaxes can be taken in one reduction (verify.greedy_argmax)."""
        return self.params.greedy and not self.params.uses_penalties

    def suppressed_rows(self, n: int) -> int:
        """How many of the next n positions must not emit suppress_token_ids (min_new_tokens not reached)."""
        if not self.suppress_token_ids or self.num_generated >= self.min_new_tokens:
            return 0
        return min(n, self.min_new_tokens - self.num_generated)

    def observe(self, token_ids: Sequence[int]) -> None:
        """Records emitted tokens (for penalties and min_new_tokens); the per-token tables only where a
        penalty reads them (an indexed write costs a few microseconds a token)."""
        if self.params.uses_penalties:
            for token_id in token_ids:
                if 0 <= token_id < self.vocab_size:
                    self._seen[token_id] = True
                    self._counts[token_id] += 1
        self.num_generated += len(token_ids)

    def scores(self, logits: torch.Tensor, draft_token_ids: Sequence[int] = ()) -> torch.Tensor:
        """Penalised, masked logits [n, vocab]; row i is the position after draft_token_ids[:i]."""
        scores = logits[:, : self.vocab_size].float()  # the logits themselves when fp32: copied before a write
        n = scores.shape[0]
        if self.params.uses_penalties:
            seen = self._seen.to(scores.device).expand(n, -1).clone()
            counts = self._counts.to(scores.device).expand(n, -1).clone()
            for i, token_id in enumerate(draft_token_ids[: n - 1]):
                seen[i + 1 :, token_id] = True
                counts[i + 1 :, token_id] += 1
            scores = _apply_penalties(scores, seen, counts, self.params)
        rows = self.suppressed_rows(n)
        if rows:
            scores = scores.clone()
            scores[:rows, self.suppress_token_ids] = float("-inf")
        check_scores(scores)
        return scores

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [n, vocab] from `scores` (temperature > 0)."""
        return warp(scores, self.params)

    def sample(self, probs: torch.Tensor, position: int, stream: int = STREAM_SAMPLE) -> int:
        return draw(probs, uniform(self.params.seed, position, stream))

    def uniform(self, position: int, stream: int = STREAM_ACCEPT) -> float:
        return uniform(self.params.seed, position, stream)


def finite_rows(scores: torch.Tensor) -> torch.Tensor:
    """[n] bool: the rows of `scores` [n, vocab] that can be sampled from, in one reduction. A row's max is
    NaN where the row holds a NaN (max propagates it), +inf where it holds +inf, -inf where every value is
    masked, and finite otherwise."""
    return scores.amax(-1).isfinite()


def check_scores(scores: torch.Tensor) -> None:
    """Raises SamplingError when `scores` [n, vocab] hold NaN or +inf, or a row is all -inf (masked): one
    reduction (finite_rows) and one wait for the device."""
    if not bool(finite_rows(scores).all()):
        raise SamplingError("cannot sample: the scores hold NaN or infinite values")


def _apply_penalties(
    scores: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    # Repetition (CTRL paper): over prompt and output, divide positive logits, multiply negative ones.
    if params.repetition_penalty != 1.0:
        penalised = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    # Presence and frequency (OpenAI): over the output only, subtract once / per occurrence.
    scores = scores - params.frequency_penalty * counts
    return scores - params.presence_penalty * (counts > 0).float()


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p and typical-p, in that order; returns probabilities."""
    scores = scores / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        sorted_probs = sorted_scores.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = scores.softmax(-1)
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(probs < floor, float("-inf"))
    if params.typical_p < 1.0:
        scores = _typical(scores, params.typical_p)
    return scores.softmax(-1)


def _typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    # Keep the tokens whose surprise is closest to the entropy until they hold `mass` (Meister et al.).
    log_probs = scores.log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    _, order = torch.sort(distance, dim=-1)
    sorted_probs = probs.gather(-1, order)
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= mass
    return scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def logprobs(logits: torch.Tensor, token_ids: Sequence[int], top_n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Log-probabilities of `token_ids` under raw `logits` [n, vocab], with the top_n alternatives."""
    log_probs = logits.float().log_softmax(-1)
    chosen = log_probs[torch.arange(len(token_ids)), torch.tensor(token_ids)].tolist()
    result: list[tuple[float, list[tuple[int, float]]]] = []
    if top_n:
        top = torch.topk(log_probs[: len(token_ids)], top_n, dim=-1)
        ids, values = top.indices.tolist(), top.values.tolist()
    for i, value in enumerate(chosen):
        alternatives = list(zip(ids[i], values[i], strict=True)) if top_n else []
        result.append((value, alternatives))
    return result
