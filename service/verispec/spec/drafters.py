"""Drafters: a small draft model with its own cache, or n-gram lookup in the context (no model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from verispec.backends.base import Backend, SequenceCache
from verispec.sampling import STREAM_DRAFT, Sampler
from verispec.spec.verify import Proposal


class Drafter(Protocol):
    """Proposes up to k tokens that continue a request's context."""

    name: str
    # Whether its rejected probes in one request predict rejections in the next: true for a draft model
    # (how well it fits the target is a property of the pair), false for n-gram lookup (whose matches
    # depend on each request's own text). AUTO carries the probe back-off across requests only if true.
    misses_carry_over: bool

    def start(self) -> object:
        """Per-request drafting state (a cache, or nothing)."""
        ...

    def propose(self, state: object, context: Sequence[int], k: int, sampler: Sampler) -> Proposal:
        """Up to k drafts after `context` (prompt plus accepted output); fewer when none are worth it."""
        ...

    def accept(self, state: object, valid_length: int) -> None:
        """The context's first `valid_length` tokens are what was drafted; forget anything past them."""
        ...

    def free(self, state: object) -> None:
        """Releases the request's drafting state."""
        ...


class NgramDrafter:
    """Prompt lookup: find the latest earlier match of the context's last n tokens, propose what followed."""

    name = "ngram"
    misses_carry_over = False

    def __init__(self, ngram_min: int = 1, ngram_max: int = 3) -> None:
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def start(self) -> object:
        return None

    def propose(self, state: object, context: Sequence[int], k: int, sampler: Sampler) -> Proposal:
        return Proposal(lookup(context, k, self.ngram_min, self.ngram_max))

    def accept(self, state: object, valid_length: int) -> None:
        return None

    def free(self, state: object) -> None:
        return None


def lookup(context: Sequence[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """The k tokens after the most recent earlier occurrence of the longest matching suffix n-gram."""
    if k <= 0:
        return []
    tokens = list(context)
    length = len(tokens)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


class _DraftState:
    """A draft model's cache for one request."""

    def __init__(self, cache: SequenceCache) -> None:
        self.cache = cache


class ModelDrafter:
    """Drafts autoregressively with a small model sharing the target's tokenizer."""

    name = "draft_model"
    misses_carry_over = True

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def start(self) -> object:
        return _DraftState(self.backend.new_cache())

    def propose(self, state: object, context: Sequence[int], k: int, sampler: Sampler) -> Proposal:
        assert isinstance(state, _DraftState)
        if k <= 0:
            return Proposal([])
        cache = state.cache
        # Feed what the draft has not seen yet (at least the last accepted token), then k-1 drafts.
        pending = list(context[cache.length :]) or [context[-1]]
        if cache.length >= len(context):
            self.backend.rollback(cache, len(context) - 1)
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        for i in range(k):
            logits = self.backend.forward(cache, pending, 1)
            scores = sampler.scores(logits, ())
            if sampler.greedy:
                token = int(scores[0].argmax())
            else:
                q = sampler.probs(scores)[0]
                token = sampler.sample(q, sampler.num_generated + i, STREAM_DRAFT)
                q_rows.append(q)
            drafts.append(token)
            pending = [token]
        return Proposal(drafts, torch.stack(q_rows) if q_rows else None)

    def accept(self, state: object, valid_length: int) -> None:
        assert isinstance(state, _DraftState)
        self.backend.rollback(state.cache, min(state.cache.length, valid_length))

    def free(self, state: object) -> None:
        assert isinstance(state, _DraftState)
        self.backend.free(state.cache)
