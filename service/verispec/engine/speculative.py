"""The speculative step over a batch: price k per request, propose, verify, accept, and account for it.

For every decoding request of a step: (1) its drafter proposes up to k tokens d_1..d_k (all requests of
one drafter in one batched call); (2) the engine's single target pass scores its last token plus the
drafts (k+1 positions); (3) verification keeps a prefix of the drafts and adds one token of the
target's own, recovered on a rejection or bonus when all k pass; (4) the rejected drafts are forgotten
by moving the request's length, and pages past it return to the pool.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from verispec.backends.base import BackendInfo
from verispec.engine.scheduler import ScheduledSequence
from verispec.engine.sequence import Sequence
from verispec.kv.pages import PagePool
from verispec.request import SpeculationMode, SpeculationParams, StepRecord
from verispec.spec.adaptive import PROBE_CARRY_MAX, PROBE_EVERY, CostModel, KController
from verispec.spec.drafters import Drafter, DraftTask
from verispec.spec.verify import Proposal, Verdict, greedy_argmax, verify


class StepObserver(Protocol):
    """Told about every step (metrics, benchmarks); called on the engine thread, must be quick."""

    def on_step(self, drafter: str, num_draft_tokens: int, num_accepted: int, draft_s: float, verify_s: float) -> None:
        """One speculative step of one request."""
        ...

    def on_batch(self, batch_size: int, batch_tokens: int, seconds: float) -> None:
        """One forward pass over batch_size sequences and batch_tokens tokens."""
        ...


@dataclass
class StepTiming:
    """Timings and sizes of one engine step, shared by the records of every request in it."""

    t0: int = 0  # drafting starts (time.time_ns())
    t1: int = 0  # drafting done, target pass starts
    t2: int = 0  # target pass and verification done
    batch_size: int = 0
    batch_tokens: int = 0


class SpeculativeStep:
    """Drafters, the cost model and the acceptance history that AUTO prices k from (engine thread)."""

    def __init__(
        self,
        drafters: Mapping[SpeculationMode, Drafter],
        costs: CostModel,
        info: BackendInfo,
        pool: PagePool,
        observer: StepObserver | None = None,
    ) -> None:
        self.drafters = dict(drafters)
        self.costs = costs
        self.info = info
        self.pool = pool
        self.observer = observer
        self.recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=256)  # (drafted, accepted)
        self.probe_every: dict[str, int] = {}  # per drafter: the probe interval last reached

    @property
    def recent_acceptance(self) -> float | None:
        drafted = sum(d for d, _ in self.recent)
        return sum(a for _, a in self.recent) / drafted if drafted else None

    def close(self) -> None:
        """Closes every drafter once (AUTO and DRAFT_MODEL may share one)."""
        for drafter in {id(d): d for d in self.drafters.values()}.values():
            drafter.close()

    def drafter_for(self, mode: SpeculationMode) -> Drafter | None:
        if mode is SpeculationMode.OFF:
            return None
        if mode is SpeculationMode.AUTO:
            return self.drafters.get(SpeculationMode.DRAFT_MODEL) or self.drafters.get(SpeculationMode.NGRAM)
        return self.drafters.get(mode)

    def controller(self, drafter: Drafter | None, params: SpeculationParams, recent: float | None) -> KController:
        """A new request's k controller, starting from what AUTO has learnt of its drafter."""
        probe_every = self.probe_every.get(drafter.name, PROBE_EVERY) if drafter is not None else PROBE_EVERY
        return KController(
            k_max=params.num_draft_tokens if drafter is not None else 0,
            adapt=params.mode is SpeculationMode.AUTO,
            prior=0.5 if recent is None else recent,
            probe_every=probe_every,
        )

    def price(self, seq: Sequence, batch_tokens: int, batch_size: int) -> int:
        """k for a decoding sequence, priced against the batch it joins (AUTO), capped by what is left."""
        if seq.drafter is None:
            return 0
        remaining = seq.request.stopping.max_new_tokens - len(seq.output_ids)
        room = self.info.max_context_length - len(seq.context)
        k = seq.controller.choose(self.costs, seq.drafter.name, batch_tokens, batch_size)
        return max(0, min(k, remaining - 1, room - 1))

    def propose(self, scheduled: list[ScheduledSequence]) -> list[Proposal]:
        """(1) Drafts for every scheduled sequence (none for prefill chunks), batched per drafter."""
        proposals = [Proposal([]) for _ in scheduled]
        by_drafter: dict[str, list[int]] = {}
        for i, s in enumerate(scheduled):
            if s.num_draft_tokens and s.seq.drafter is not None:
                by_drafter.setdefault(s.seq.drafter.name, []).append(i)
        for indices in by_drafter.values():
            drafter = scheduled[indices[0]].seq.drafter
            assert drafter is not None
            tasks = [_task(scheduled[i]) for i in indices]
            start = time.perf_counter()
            for i, proposal in zip(indices, drafter.propose(tasks), strict=True):
                proposals[i] = proposal
            self.costs.record_draft(drafter.name, max(t.k for t in tasks), time.perf_counter() - start)
        return proposals

    def greedy_targets(self, scheduled: list[ScheduledSequence], logits: list[torch.Tensor]) -> list[list[int] | None]:
        """(3, batched) The target's argmaxes for every greedy sequence without penalties that emits this
        step, taken together (one reduction, one wait for the device); None for the others (verified alone)."""
        chosen = [i for i, s in enumerate(scheduled) if s.final and s.seq.sampler.batch_greedy]
        targets: list[list[int] | None] = [None] * len(scheduled)
        if chosen:
            samplers = [scheduled[i].seq.sampler for i in chosen]
            rows = [logits[i] for i in chosen]
            suppressed = [
                (sampler.suppressed_rows(len(r)), sampler.suppress_token_ids)
                for sampler, r in zip(samplers, rows, strict=True)
            ]
            for i, ids in zip(chosen, greedy_argmax(rows, samplers[0].vocab_size, suppressed), strict=True):
                targets[i] = ids
        return targets

    def verify(
        self, s: ScheduledSequence, proposal: Proposal, logits: torch.Tensor, target_ids: list[int] | None = None
    ) -> Verdict | None:
        """(3)+(4) Accepts a prefix of the drafts and moves the sequence's length; None for a chunk
        that does not reach the end of the context (nothing to emit yet). `target_ids`: the rows' argmaxes
        from greedy_targets, for a greedy sequence without penalties."""
        seq = s.seq
        if not s.final:
            seq.num_computed += s.num_new_tokens
            return None
        verdict = verify(seq.sampler, logits, proposal, position=len(seq.output_ids), target_ids=target_ids)
        # The cache now holds the context and the accepted drafts; the emitted token is fed next step.
        valid = seq.num_computed + s.num_new_tokens + verdict.num_accepted
        seq.num_computed = valid
        self.pool.truncate(seq.pages, valid + 1)
        if seq.drafter is not None and proposal.token_ids:
            seq.drafter.accept(seq.draft_state, valid)
        return verdict

    def account(self, s: ScheduledSequence, proposal: Proposal, verdict: Verdict, step: StepTiming) -> None:
        """Counters, AUTO's evidence and the step records of one request after its step."""
        seq = s.seq
        if not s.decode:
            _record_prefill(seq, step)
            return
        stats, num_draft = seq.stats, len(proposal.token_ids)
        draft_s, verify_s = (step.t1 - step.t0) / 1e9, (step.t2 - step.t1) / 1e9
        stats.num_steps += 1
        stats.num_draft_tokens += num_draft
        stats.num_accepted_tokens += verdict.num_accepted
        stats.num_emitted_tokens += len(verdict.token_ids)
        stats.draft_seconds += draft_s if num_draft else 0.0
        stats.verify_seconds += verify_s
        if self.observer is not None:
            self.observer.on_step(stats.drafter, num_draft, verdict.num_accepted, draft_s, verify_s)
        if num_draft:
            assert seq.drafter is not None
            seq.controller.update(num_draft, verdict.num_accepted)
            if seq.controller.adapt and seq.drafter.misses_carry_over:
                # A draft model failing its probes is probed rarely from the next request's start too.
                self.probe_every[seq.drafter.name] = min(seq.controller.probe_every, PROBE_CARRY_MAX)
            self.recent.append((num_draft, verdict.num_accepted))
        if seq.request.record_steps:
            draft = StepRecord(
                "draft",
                step.t0,
                step.t1,
                step=stats.num_steps,
                drafter=stats.drafter,
                num_draft_tokens=num_draft,
                position=len(seq.output_ids),
                batch_size=step.batch_size,
                batch_tokens=step.batch_tokens,
            )
            verified = dataclasses.replace(
                draft,
                kind="verify",
                start_ns=step.t1,
                end_ns=step.t2,
                num_accepted=verdict.num_accepted,
                num_emitted=len(verdict.token_ids),
                bonus=verdict.bonus,
            )
            seq.records.extend((draft, verified))


def _task(s: ScheduledSequence) -> DraftTask:
    seq = s.seq
    return DraftTask(seq.draft_state, seq.context, s.num_draft_tokens, seq.sampler)


def _record_prefill(seq: Sequence, step: StepTiming) -> None:
    """The queue and prefill records of a prefill that just emitted its first token (or recomputed)."""
    if seq.request.record_steps:
        if not seq.records:
            seq.records.append(StepRecord("queue", seq.submitted_ns, seq.prefill_start_ns))
        prefill = StepRecord(
            "prefill",
            seq.prefill_start_ns,
            step.t2,
            num_emitted=1,
            batch_size=step.batch_size,
            batch_tokens=step.batch_tokens,
        )
        seq.records.append(prefill)
    seq.prefill_start_ns = 0
