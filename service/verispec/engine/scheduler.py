"""Which sequences run in the next forward pass: queues, admission against free KV pages, a per-step
token budget, chunked prefill, preemption (newest first, recomputed later).

Each step, running sequences that are decoding come first, oldest first: one token each plus the
drafts AUTO prices for them. Prefill chunks fill the rest of the token budget, shortest remaining
prompt first, so a short request arriving behind a long prompt gets its first token within a step
or two instead of waiting for the whole long prefill. While requests decode, prefill may only make a
step `decode_step_slack` times slower than decoding alone would be (by the measured pass costs): on
hardware where a pass costs more with more tokens, that keeps inter-token latency and a new request's
time to first token steady while a long prompt is prefilled in smaller chunks. Where that is cheaper
for everyone by the same costs, new short prompts get a pass of their own ahead of the decodes. With
nothing decoding, prefill takes the whole prompts (or the full budget) that move the most tokens per
measured second: on a GPU with CUDA graphs, a few short prompts go a graph bucket at a time rather than
in a part-filled pass that launches eagerly.

A waiting request is admitted when the pages for its whole context are free (its prefill can then
never stall); a decoding sequence that needs a new page when none is free takes one from the newest
running sequence, which is preempted: its pages return to the pool and it goes back to the head of
the queue to be recomputed.

The round-robin policy (one sequence per forward pass, in turn) is kept as the comparison point of
`verispec bench batch`; it is how every request was stepped before batching.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from verispec.engine.sequence import Sequence
from verispec.kv.pages import PagePool, pages_for

BATCHED = "batched"
ROUND_ROBIN = "round_robin"
POLICIES = (BATCHED, ROUND_ROBIN)

# (sequence, tokens in the batch so far counting its own next one, decoding sequences in the batch)
# -> drafts to verify with its next token
PriceDrafts = Callable[[Sequence, int, int], int]


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of the next forward pass."""

    seq: Sequence
    num_new_tokens: int  # context tokens fed: a prefill chunk, or the last emitted token
    num_draft_tokens: int = 0  # drafts appended after it (decode steps only)
    decode: bool = False  # a decode step (else prefill, first or recomputed after a preemption)

    @property
    def final(self) -> bool:
        """Whether this step reaches the end of the context, so a token is emitted."""
        return self.num_new_tokens == self.seq.num_pending

    @property
    def num_tokens(self) -> int:
        return self.num_new_tokens + self.num_draft_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    """The next batch and the sequences preempted to make room for it."""

    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting queue, the running list and the page pool (engine thread only)."""

    def __init__(
        self,
        pool: PagePool,
        max_running: int,
        max_batch_tokens: int,
        policy: str = BATCHED,
        step_cost: Callable[[int], float] | None = None,
        decode_step_slack: float = 0.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}")
        self.pool = pool
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.policy = policy
        self.step_cost = step_cost  # measured seconds of a pass over n tokens
        self.decode_step_slack = decode_step_slack
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.num_preemptions = 0
        self._turn = 0  # round robin: index of the next sequence to step

    def fits_ever(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens positions fits in the pool when it runs alone."""
        return pages_for(num_tokens, self.pool.page_size) <= self.pool.num_pages

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or cancelled sequence out and returns its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.pages)

    def sequences(self) -> Iterable[Sequence]:
        yield from self.running
        yield from self.waiting

    def schedule(self, price_drafts: PriceDrafts) -> SchedulerOutput:
        preempted: list[Sequence] = []
        if self.policy == ROUND_ROBIN:
            return SchedulerOutput(self._round_robin(price_drafts, preempted), preempted)
        decoding = [s for s in self.running if s.decoding]
        alone = self._new_prompts_alone(decoding)
        if alone:
            return SchedulerOutput(alone, preempted)
        budget = self.max_batch_tokens
        scheduled: list[ScheduledSequence] = []
        for index, seq in enumerate(decoding):
            if seq in preempted or budget < 1:
                continue
            # Price k as if every decoding sequence not yet placed adds its one token.
            batch_tokens = self.max_batch_tokens - budget + len(decoding) - index
            k = min(price_drafts(seq, batch_tokens, len(decoding)), budget - 1)
            if not self._reserve_decode(seq, k, preempted, scheduled):
                continue
            k = max(0, min(k, seq.pages.capacity(self.pool.page_size) - seq.num_computed - 1))
            scheduled.append(ScheduledSequence(seq, 1, k, decode=True))
            budget -= 1 + k
        if not preempted:  # a sequence preempted for room now must not take that room back at once
            self._admit()
        prefilling = sorted((s for s in self.running if not s.decoding), key=lambda s: s.num_pending)
        budget = self._prefill_allowance(self.max_batch_tokens - budget, budget, prefilling)
        for seq in prefilling:
            if budget < 1:
                break
            chunk = min(seq.num_pending, budget)
            scheduled.append(ScheduledSequence(seq, chunk))
            budget -= chunk
        return SchedulerOutput(scheduled, preempted)

    def _new_prompts_alone(self, decoding: list[Sequence]) -> list[ScheduledSequence]:
        """New short prompts in a pass of their own, ahead of the decodes, when that saves them more time
        than it costs the decoding requests (by the measured pass costs); else nothing.

        With p prompt tokens and d decodes, the new requests get their first token T(d + p) - T(p) sooner
        each, and every decoding request waits T(p) + T(d) - T(d + p) longer for its next one. The prompts
        go alone when what each of them saves is at least what each decoding request loses: request for
        request, not summed, so that a new request's time to first token stays within its own pass plus
        the one in flight however many requests decode (summed, 8 decodes outweigh one prompt whenever a
        pass has any fixed cost, and the prompt waits for a pass of 8 + p tokens). Where a pass costs in
        proportion to its tokens (a CPU) the decodes lose little and the prompts go alone; where a pass
        costs about the same for few or many tokens (a GPU at small batches) they ride along with the
        decodes. The pages every decode needs for its next token are kept free.
        """
        if not decoding or self.step_cost is None or self.decode_step_slack <= 0:
            return []
        page = self.pool.page_size
        self._admit(keep_free=sum(max(0, pages_for(s.num_computed + 1, page) - len(s.pages.pages)) for s in decoding))
        num_decoding = len(decoding)
        short = self.max_batch_tokens // 4
        fresh = sorted(
            (s for s in self.running if not s.decoding and s.num_computed == 0 and s.num_pending <= short),
            key=lambda s: s.num_pending,
        )
        # The prompts that would ride with the decodes if the budget allowed: compared as riding or alone.
        chosen = self._whole_prompts(fresh, num_decoding, self.max_batch_tokens)
        if not chosen:
            return []
        tokens = sum(seq.num_pending for seq in chosen)
        cost = self.step_cost
        saved = cost(num_decoding + tokens) - cost(tokens)  # per new request
        lost = max(0.0, cost(tokens) + cost(num_decoding) - cost(num_decoding + tokens))  # per decoding request
        if lost > saved:
            return []
        return [ScheduledSequence(seq, seq.num_pending) for seq in chosen]

    def _whole_prompts(self, prompts: list[Sequence], decode_tokens: int, limit: int) -> list[Sequence]:
        """The first of `prompts` (shortest first) a pass beside `decode_tokens` decode tokens takes whole,
        up to `limit` tokens together. Each joins only while the pass costs less with it than without it
        plus a pass of its own (by the measured costs): past a CUDA graph's bucket, above all the largest, a
        pass costs a step more, and the prompt that would cross a dear step waits for the next pass."""
        cost = self.step_cost
        chosen: list[Sequence] = []
        total = 0
        for seq in prompts:
            tokens = seq.num_pending
            if total + tokens > limit:
                break
            carried = decode_tokens + total
            if cost is not None and carried and cost(carried + tokens) > cost(carried) + cost(tokens):
                break
            chosen.append(seq)
            total += tokens
        return chosen

    def _prefill_allowance(self, decode_tokens: int, budget: int, prefilling: list[Sequence]) -> int:
        """Prefill tokens this step may carry over the prompts `prefilling` (shortest first). While requests
        decode: as many as keep the step within decode_step_slack x the decode-only step (measured), but at
        least a page's worth (long prompts always progress) and the tokens of the short prompts that
        `_whole_prompts` picks within a quarter of the budget (a short request is never split over steps,
        and a burst of them starts in one step rather than one a step). With nothing decoding: the pass that
        moves the most tokens per second (idle_allowance)."""
        if self.step_cost is None or self.decode_step_slack <= 0:
            return budget
        if not decode_tokens:
            return self._idle_allowance(budget, prefilling, self.step_cost)
        short = sum(s.num_pending for s in self._whole_prompts(prefilling, decode_tokens, self.max_batch_tokens // 4))
        limit = self.decode_step_slack * self.step_cost(decode_tokens)
        floor = min(budget, max(self.pool.page_size, short))
        tokens = budget
        while tokens > floor and self.step_cost(decode_tokens + tokens) > limit:
            tokens //= 2
        return max(tokens, floor)

    def _idle_allowance(self, budget: int, prefilling: list[Sequence], cost: Callable[[int], float]) -> int:
        """The prefill pass that moves the most tokens per measured second, of those that take the shortest
        prompts whole (1, 2, 3 ... of them, `prefilling` in ascending order) or fill the budget: the largest
        within 5% of the best. On a GPU a long prompt gets the budget, a large eager pass being cheapest per
        token, but a few short prompts that would part-fill it go a graph bucket at a time: four chat
        prompts of 112 tokens took 139 ms as one eager pass on an H100, two of them 60 ms as a replay. No
        prompt is cut short of the budget, where a pass's cost per token grows with its tokens (a CPU)."""
        sizes: set[int] = set()
        total = 0
        for seq in prefilling:
            total += seq.num_pending
            sizes.add(min(total, budget))
            if total >= budget:
                break
        if not sizes:
            return budget
        rates = {n: n / max(cost(n), 1e-9) for n in sizes}
        best = max(rates.values())
        return max(n for n, rate in rates.items() if rate >= 0.95 * best)

    def _reserve_decode(
        self, seq: Sequence, k: int, preempted: list[Sequence], scheduled: list[ScheduledSequence]
    ) -> bool:
        """Pages for the next token plus k drafts; with fewer drafts, or by preempting the newest."""
        for want in (seq.num_computed + 1 + k, seq.num_computed + 1):
            if self.pool.can_reserve(seq.pages, want):
                self.pool.reserve(seq.pages, want)
                return True
        while not self.pool.can_reserve(seq.pages, seq.num_computed + 1):
            victim = self.running[-1]
            self._preempt(victim, preempted, scheduled)
            if victim is seq:
                return False
        self.pool.reserve(seq.pages, seq.num_computed + 1)
        return True

    def _preempt(self, seq: Sequence, preempted: list[Sequence], scheduled: list[ScheduledSequence]) -> None:
        self.running.remove(seq)
        self.pool.release(seq.pages)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        preempted.append(seq)
        scheduled[:] = [s for s in scheduled if s.seq is not seq]

    def _admit(self, keep_free: int = 0) -> None:
        """Moves waiting sequences to running while a slot and the pages for their whole context are free
        (and `keep_free` pages stay free after)."""
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not self.pool.can_reserve(seq.pages, len(seq.context), keep_free):
                break
            self.pool.reserve(seq.pages, len(seq.context))
            self.running.append(self.waiting.popleft())

    def _round_robin(self, price_drafts: PriceDrafts, preempted: list[Sequence]) -> list[ScheduledSequence]:
        """One sequence per pass, in turn: its whole pending context, or its next token plus drafts."""
        self._admit()
        if not self.running:
            return []
        self._turn %= len(self.running)
        seq = self.running[self._turn]
        self._turn += 1
        if not seq.decoding:
            return [ScheduledSequence(seq, seq.num_pending)]
        k = price_drafts(seq, 1, 1)
        if not self._reserve_decode(seq, k, preempted, []):
            return []
        k = max(0, min(k, seq.pages.capacity(self.pool.page_size) - seq.num_computed - 1))
        return [ScheduledSequence(seq, 1, k, decode=True)]
