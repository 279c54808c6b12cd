"""Drafters: a small draft model batched over requests in its own paged cache, or n-gram lookup (no model)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from verispec.kv.pages import PageTable
from verispec.runner.base import BatchEntry, ModelRunner
from verispec.sampling import STREAM_DRAFT, Sampler
from verispec.spec.verify import Proposal


@dataclass(frozen=True)
class DraftTask:
    """One request's drafting job in a step: up to k tokens after `context`."""

    state: object
    context: Sequence[int]  # prompt plus accepted output
    k: int
    sampler: Sampler


class Drafter(Protocol):
    """Proposes up to k tokens that continue each request's context, for a whole batch at once."""

    name: str
    # Whether its rejected probes in one request predict rejections in the next: true for a draft model
    # (how well it fits the target is a property of the pair), false for n-gram lookup (whose matches
    # depend on each request's own text). AUTO carries the probe back-off across requests only if true.
    misses_carry_over: bool

    def start(self) -> object:
        """Per-request drafting state (a cache, or nothing)."""
        ...

    def propose(self, tasks: Sequence[DraftTask]) -> list[Proposal]:
        """One proposal per task, in order; fewer than k drafts when none are worth it."""
        ...

    def accept(self, state: object, valid_length: int) -> None:
        """The context's first `valid_length` tokens are what was drafted; forget anything past them."""
        ...

    def free(self, state: object) -> None:
        """Releases the request's drafting state."""
        ...

    def close(self) -> None:
        """Lets go of what the drafter holds for every request (a draft model's KV pages and graphs)."""
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

    def propose(self, tasks: Sequence[DraftTask]) -> list[Proposal]:
        return [Proposal(lookup(t.context, t.k, self.ngram_min, self.ngram_max)) for t in tasks]

    def accept(self, state: object, valid_length: int) -> None:
        return None

    def free(self, state: object) -> None:
        return None

    def close(self) -> None:
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


@dataclass
class _DraftState:
    """A draft model's view of one request: its pages and how many context positions they hold."""

    seq_id: int
    pages: PageTable = field(default_factory=PageTable)
    num_computed: int = 0


@dataclass
class _Drafting:
    """One task while its drafts are being produced."""

    task: DraftTask
    state: _DraftState
    pending: list[int]  # tokens the draft model has not seen yet
    token_ids: list[int] = field(default_factory=list)
    q_rows: list[torch.Tensor] = field(default_factory=list)


class ModelDrafter:
    """Drafts autoregressively with a small model sharing the target's tokenizer, every request of the
    step in one batched draft forward per draft position, in a paged cache of its own."""

    name = "draft_model"
    misses_carry_over = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.pool = runner.kv.new_pool()
        self._ids = itertools.count()

    def start(self) -> object:
        return _DraftState(next(self._ids))

    def propose(self, tasks: Sequence[DraftTask]) -> list[Proposal]:
        jobs: list[_Drafting | None] = []
        for task in tasks:
            state = task.state
            assert isinstance(state, _DraftState)
            # Feed what the draft has not seen yet: at least the last accepted token.
            state.num_computed = min(state.num_computed, len(task.context) - 1)
            jobs.append(_Drafting(task, state, list(task.context[state.num_computed :])) if task.k > 0 else None)
        for _ in range(max((t.k for t in tasks), default=0)):
            live = [j for j in jobs if j is not None and len(j.token_ids) < j.task.k and self._reserve(j)]
            if not live:
                break
            entries = [
                BatchEntry(j.state.seq_id, j.pending, j.state.num_computed, j.state.pages.pages, 1) for j in live
            ]
            for job, logits in zip(live, self.runner.forward(entries), strict=True):
                job.state.num_computed += len(job.pending)
                job.pending = [self._draw(job, logits)]
                job.token_ids.append(job.pending[0])
        return [_proposal(j) for j in jobs]

    def _reserve(self, job: _Drafting) -> bool:
        """Pages for this draft position; a request the pool cannot serve stops drafting this step."""
        want = job.state.num_computed + len(job.pending)
        if not self.pool.can_reserve(job.state.pages, want):
            return False
        self.pool.reserve(job.state.pages, want)
        return True

    def _draw(self, job: _Drafting, logits: torch.Tensor) -> int:
        sampler = job.task.sampler
        scores = sampler.scores(logits, ())
        if sampler.greedy:
            return int(scores[0].argmax())
        q = sampler.probs(scores)[0]
        job.q_rows.append(q)
        return sampler.sample(q, sampler.num_generated + len(job.token_ids), STREAM_DRAFT)

    def accept(self, state: object, valid_length: int) -> None:
        assert isinstance(state, _DraftState)
        state.num_computed = min(state.num_computed, valid_length)
        self.pool.truncate(state.pages, state.num_computed)

    def free(self, state: object) -> None:
        assert isinstance(state, _DraftState)
        self.pool.release(state.pages)
        self.runner.free(state.seq_id)

    def close(self) -> None:
        self.runner.close()


def _proposal(job: _Drafting | None) -> Proposal:
    if job is None:
        return Proposal([])
    return Proposal(job.token_ids, torch.stack(job.q_rows) if job.q_rows else None)
