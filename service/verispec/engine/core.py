"""The engine core: one thread owns the models and steps every active request in turn."""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog
import torch

from verispec.backends.base import Backend, SequenceCache
from verispec.config import EngineConfig
from verispec.engine.faults import FaultInjector, is_fatal
from verispec.engine.text import TextStream
from verispec.errors import EngineDeadError, NotReadyError, OverloadedError
from verispec.request import (
    FinishReason,
    Request,
    SpecStats,
    SpeculationMode,
    StepOutput,
    StepRecord,
    TokenLogprob,
)
from verispec.sampling import Sampler, logprobs
from verispec.spec.adaptive import PROBE_CARRY_MAX, PROBE_EVERY, CostModel, KController
from verispec.spec.drafters import Drafter
from verispec.spec.verify import Proposal, Verdict, verify
from verispec.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

Sink = Callable[[StepOutput], None]
T = TypeVar("T")


class StepObserver(Protocol):
    """Told about every speculative step (metrics); called on the engine thread, must be quick."""

    def on_step(
        self, drafter: str, num_draft_tokens: int, num_accepted: int, draft_s: float, verify_s: float
    ) -> None: ...


@dataclass
class _Sequence:
    """Engine-side state of one admitted request."""

    request: Request
    sink: Sink
    submitted_ns: int
    submitted: float
    drafter: Drafter | None
    controller: KController
    text: TextStream
    context: list[int]
    cache: SequenceCache | None = None
    draft_state: object = None
    output_ids: list[int] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    records: list[StepRecord] = field(default_factory=list)
    started: bool = False
    admitted: float = 0.0
    sampler_state: Sampler | None = None

    @property
    def sampler(self) -> Sampler:
        assert self.sampler_state is not None, "the sampler is made at prefill"
        return self.sampler_state


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for Health and metrics."""

    queue_depth: int
    active_requests: int
    last_step_age_s: float | None
    recent_acceptance: float | None


class EngineCore:
    """Admits requests through a bounded queue and runs prefill / speculative steps round-robin."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        drafters: Mapping[SpeculationMode, Drafter],
        config: EngineConfig,
        costs: CostModel | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.drafters = dict(drafters)
        self.config = config
        self.costs = costs or CostModel()
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: dict[str, _Sequence] = {}
        self._aborted: set[str] = set()
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=256)
        self._probe_every: dict[str, int] = {}  # per drafter: the probe interval last reached
        self._last_step: float | None = None
        self._request_seconds: float | None = None  # mean time in the engine of completed requests
        self._stopping = False
        self._failure: BaseException | None = None
        self.observer: StepObserver | None = None
        self.on_failure: Callable[[BaseException], None] | None = None  # called on the engine thread
        self.faults = FaultInjector.parse(config.fault_injection)
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    # -- called from other threads -------------------------------------------------------------

    def start(self) -> None:
        """Runs the step loop on a new daemon thread."""
        self._started = True
        threading.Thread(target=self.run, name="verispec-engine", daemon=True).start()

    def stop(self, timeout: float | None = None) -> None:
        """Cancels everything still queued or active and joins the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._started:
            self._done.wait(timeout)
        # Join the thread itself: a process that exits while it is still unwinding torch's thread
        # state can abort ("terminate called without an active exception").
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def submit(self, request: Request, sink: Sink) -> None:
        """Queues `request`; its outputs go to `sink` on the engine thread. Raises at once when full."""
        if self._failure is not None:
            raise EngineDeadError(f"engine stopped: {self._failure}")
        seq = self._new_sequence(request, sink)
        with self._cond:
            if self._stopping:
                raise NotReadyError("the engine is shutting down")
            free_slots = self.config.max_active_requests - len(self._active)
            if len(self._waiting) - max(free_slots, 0) >= self.config.max_queued_requests:
                raise OverloadedError(
                    f"{len(self._active)} requests active and {len(self._waiting)} queued "
                    f"(limits {self.config.max_active_requests} and {self.config.max_queued_requests})",
                    retry_after_s=max(self._request_seconds or 1.0, 0.1),
                )
            wait = self._expected_wait_locked(free_slots)
            if request.deadline is not None and time.monotonic() + wait > request.deadline:
                raise OverloadedError(
                    f"the deadline cannot be met: about {wait:.1f}s until a slot frees up "
                    f"({len(self._active)} active, {len(self._waiting)} queued)",
                    retry_after_s=wait,
                )
            self._waiting.append(seq)
            self._cond.notify()

    def _expected_wait_locked(self, free_slots: int) -> float:
        """Seconds until a request submitted now starts: slots free up one mean request length apart."""
        ahead = len(self._waiting) - max(free_slots, 0)
        if ahead < 0 or self._request_seconds is None:
            return 0.0
        rounds = ahead // self.config.max_active_requests + 1
        return rounds * self._request_seconds

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Runs `fn` on the engine thread between steps (benchmarks measure the backend there)."""
        future: Future[T] = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def abort(self, request_id: str) -> None:
        """Ends the request at its next step with FINISH_REASON_CANCELLED (no-op when finished)."""
        with self._cond:
            self._aborted.add(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        drafted = sum(d for d, _ in self._recent)
        accepted = sum(a for _, a in self._recent)
        return EngineStats(
            queue_depth=len(self._waiting),
            active_requests=len(self._active),
            last_step_age_s=None if self._last_step is None else time.monotonic() - self._last_step,
            recent_acceptance=accepted / drafted if drafted else None,
        )

    def _new_sequence(self, request: Request, sink: Sink) -> _Sequence:
        spec = request.speculation
        drafter = self._drafter_for(spec.mode)
        k_max = spec.num_draft_tokens if drafter is not None else 0
        stopping = request.stopping
        recent = self.stats().recent_acceptance
        return _Sequence(
            request=request,
            sink=sink,
            submitted_ns=time.time_ns(),
            submitted=time.monotonic(),
            drafter=drafter,
            controller=KController(
                k_max=k_max,
                adapt=spec.mode is SpeculationMode.AUTO,
                prior=0.5 if recent is None else recent,
                probe_every=self._probe_every.get(drafter.name, PROBE_EVERY) if drafter is not None else PROBE_EVERY,
            ),
            text=TextStream(self.tokenizer.decode, stopping.stop_sequences, stopping.include_stop_sequence),
            context=list(request.prompt_token_ids),
            stats=SpecStats(drafter=drafter.name if drafter is not None else "off"),
        )

    def _drafter_for(self, mode: SpeculationMode) -> Drafter | None:
        if mode is SpeculationMode.OFF:
            return None
        if mode is SpeculationMode.AUTO:
            return self.drafters.get(SpeculationMode.DRAFT_MODEL) or self.drafters.get(SpeculationMode.NGRAM)
        return self.drafters.get(mode)

    # -- the engine thread ---------------------------------------------------------------------

    def run(self) -> None:
        """The step loop, on the calling thread, until stop().

        Call it on the thread that loaded the models (see loader.load): torch's CPU thread pool
        belongs to the calling thread, and a second live thread that has run torch work halves
        decode speed on a 2-core machine.
        """
        self._started = True
        self._thread = threading.current_thread()
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._active or self._calls):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._admit_locked()
                    aborted, self._aborted = self._aborted, set()
                    calls, self._calls = self._calls, collections.deque()
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except Exception as exc:
                            future.set_exception(exc)
                for seq in list(self._active.values()):
                    self._advance(seq, aborted)
        except BaseException as exc:  # a dead device or a bug in the loop: fail everything, loudly
            self._failure = exc
            log.exception("engine.crashed", fatal=is_fatal(exc))
        finally:
            error = "engine stopped" if self._failure is None else f"engine failed: {self._failure}"
            self._fail_all(FinishReason.CANCELLED if self._failure is None else FinishReason.ERROR, error)
            self._done.set()
            if self._failure is not None and self.on_failure is not None:
                self.on_failure(self._failure)

    def _admit_locked(self) -> None:
        while self._waiting and len(self._active) < self.config.max_active_requests:
            seq = self._waiting.popleft()
            seq.admitted = time.monotonic()
            self._active[seq.request.request_id] = seq
        for seq in [s for s in self._waiting if s.request.request_id in self._aborted]:
            self._waiting.remove(seq)
            seq.sink(self._final(seq, FinishReason.CANCELLED))

    def _advance(self, seq: _Sequence, aborted: set[str]) -> None:
        request = seq.request
        now = time.monotonic()
        reason: FinishReason | None = None
        if request.request_id in aborted or (request.deadline is not None and now >= request.deadline):
            reason = FinishReason.CANCELLED
        elif request.stopping.time_limit_s is not None and now - seq.submitted >= request.stopping.time_limit_s:
            reason = FinishReason.TIME_LIMIT
        if reason is not None:
            self._finish(seq, self._final(seq, reason, seq.text.flush()))
            return
        try:
            if self.faults is not None:
                self.faults.before_step()
            out = self._step(seq) if seq.started else self._prefill(seq)
        except Exception as exc:
            if is_fatal(exc):
                raise  # the device is gone: the loop fails every request and stops
            log.exception("engine.step_failed", request_id=request.request_id)
            self._finish(seq, self._final(seq, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}"))
            return
        self._last_step = time.monotonic()
        if out.finished:
            self._finish(seq, out)
        else:
            seq.sink(out)

    def _prefill(self, seq: _Sequence) -> StepOutput:
        """Scores the prompt and emits the first token."""
        seq.started = True
        start = time.time_ns()
        stopping = seq.request.stopping
        # Made here, not in submit(): every torch op belongs on the engine thread.
        seq.sampler_state = Sampler(
            seq.request.sampling,
            self.backend.info.vocab_size,
            seq.request.prompt_token_ids,
            suppress_token_ids=set(self.tokenizer.eos_token_ids) | set(stopping.stop_token_ids),
            min_new_tokens=stopping.min_new_tokens,
        )
        seq.cache = self.backend.new_cache()
        if seq.drafter is not None:
            seq.draft_state = seq.drafter.start()
        prompt = list(seq.request.prompt_token_ids)
        logits = self.backend.forward(seq.cache, prompt, 1)
        verdict = verify(seq.sampler, logits, Proposal([]), position=0)
        if seq.request.record_steps:
            seq.records.append(StepRecord("queue", seq.submitted_ns, start))
            seq.records.append(StepRecord("prefill", start, time.time_ns(), num_emitted=1))
        return self._emit(seq, verdict, logits)

    def _step(self, seq: _Sequence) -> StepOutput:
        """One speculative step: draft k, verify k+1 positions in one pass, roll back the rest."""
        assert seq.cache is not None
        remaining = seq.request.stopping.max_new_tokens - len(seq.output_ids)
        room = self.backend.info.max_context_length - len(seq.context)
        k = 0
        if seq.drafter is not None:
            k = min(seq.controller.choose(self.costs, seq.drafter.name), remaining - 1, room - 1)
        context_length = len(seq.context)
        t0 = time.time_ns()
        # (1) The drafter proposes up to k tokens d_1..d_k.
        proposal = Proposal([])
        if k > 0 and seq.drafter is not None:
            proposal = seq.drafter.propose(seq.draft_state, seq.context, k, seq.sampler)
        t1 = time.time_ns()
        # (2) The target scores the last accepted token plus the drafts in ONE pass: k+1 positions.
        logits = self.backend.forward(seq.cache, [seq.context[-1], *proposal.token_ids], 1 + len(proposal.token_ids))
        # (3) Verification keeps a prefix of the drafts and adds one token of the target's own.
        verdict = verify(seq.sampler, logits, proposal, position=len(seq.output_ids))
        t2 = time.time_ns()
        # (4) Both caches forget the rejected drafts: they now hold the context minus its last token.
        valid = context_length + verdict.num_accepted
        self.backend.rollback(seq.cache, valid)
        if seq.drafter is not None and proposal.token_ids:
            seq.drafter.accept(seq.draft_state, valid)
        self._account(seq, proposal, verdict, t0, t1, t2)
        return self._emit(seq, verdict, logits)

    def _account(self, seq: _Sequence, proposal: Proposal, verdict: Verdict, t0: int, t1: int, t2: int) -> None:
        stats, num_draft = seq.stats, len(proposal.token_ids)
        stats.num_steps += 1
        stats.num_draft_tokens += num_draft
        stats.num_accepted_tokens += verdict.num_accepted
        stats.num_emitted_tokens += len(verdict.token_ids)
        stats.draft_seconds += (t1 - t0) / 1e9
        stats.verify_seconds += (t2 - t1) / 1e9
        self.costs.record_verify(1 + num_draft, (t2 - t1) / 1e9)
        if self.observer is not None:
            self.observer.on_step(stats.drafter, num_draft, verdict.num_accepted, (t1 - t0) / 1e9, (t2 - t1) / 1e9)
        if num_draft:
            assert seq.drafter is not None
            self.costs.record_draft(seq.drafter.name, num_draft, (t1 - t0) / 1e9)
            seq.controller.update(num_draft, verdict.num_accepted)
            if seq.controller.adapt and seq.drafter.misses_carry_over:
                # A draft model failing its probes is probed rarely from the next request's start too.
                self._probe_every[seq.drafter.name] = min(seq.controller.probe_every, PROBE_CARRY_MAX)
            self._recent.append((num_draft, verdict.num_accepted))
        if seq.request.record_steps:
            draft = StepRecord(
                "draft",
                t0,
                t1,
                step=stats.num_steps,
                drafter=stats.drafter,
                num_draft_tokens=num_draft,
                position=len(seq.output_ids),
            )
            seq.records.append(draft)
            seq.records.append(
                dataclasses.replace(
                    draft,
                    kind="verify",
                    start_ns=t1,
                    end_ns=t2,
                    num_accepted=verdict.num_accepted,
                    num_emitted=len(verdict.token_ids),
                    bonus=verdict.bonus,
                )
            )

    def _emit(self, seq: _Sequence, verdict: Verdict, logits: torch.Tensor) -> StepOutput:
        """Appends the step's tokens one by one, applying every stop rule, and builds the output."""
        request, stopping = seq.request, seq.request.stopping
        emitted: list[int] = []
        pieces: list[str] = []
        reason: FinishReason | None = None
        stop = ""
        for token_id in verdict.token_ids:
            emitted.append(token_id)
            seq.output_ids.append(token_id)
            seq.context.append(token_id)
            seq.sampler.observe([token_id])
            if token_id in self.tokenizer.eos_token_ids:
                reason = FinishReason.EOS
            elif token_id in stopping.stop_token_ids:
                reason = FinishReason.STOP_TOKEN
            else:
                piece, stop = seq.text.push(token_id, len(seq.output_ids) > stopping.min_new_tokens)
                pieces.append(piece)
                if stop:
                    reason = FinishReason.STOP_SEQUENCE
                elif (
                    len(seq.output_ids) >= stopping.max_new_tokens
                    or len(seq.context) >= self.backend.info.max_context_length
                ):
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
            return self._final(seq, reason, "".join(pieces), tuple(emitted), token_logprobs, stop)
        return StepOutput(
            request_id=request.request_id,
            token_ids=tuple(emitted),
            text="".join(pieces),
            logprobs=token_logprobs,
            seed=request.sampling.seed,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_generated_tokens=len(seq.output_ids),
        )

    def _final(
        self,
        seq: _Sequence,
        reason: FinishReason,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        token_logprobs: tuple[TokenLogprob, ...] = (),
        stop: str = "",
        error: str = "",
    ) -> StepOutput:
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

    def _finish(self, seq: _Sequence, out: StepOutput) -> None:
        self._release(seq)
        if out.finish_reason in (
            FinishReason.LENGTH,
            FinishReason.EOS,
            FinishReason.STOP_SEQUENCE,
            FinishReason.STOP_TOKEN,
        ):
            seconds = time.monotonic() - seq.admitted
            old = self._request_seconds
            self._request_seconds = seconds if old is None else old + 0.2 * (seconds - old)
        seq.sink(out)

    def _release(self, seq: _Sequence) -> None:
        self._active.pop(seq.request.request_id, None)
        if seq.cache is not None:
            self.backend.free(seq.cache)
            seq.cache = None
        if seq.drafter is not None and seq.draft_state is not None:
            seq.drafter.free(seq.draft_state)
            seq.draft_state = None

    def _fail_all(self, reason: FinishReason, error: str) -> None:
        with self._cond:
            pending = list(self._waiting) + list(self._active.values())
            self._waiting.clear()
        for seq in pending:
            self._finish(seq, self._final(seq, reason, error=error))


def run_to_completion(core: EngineCore, request: Request, timeout: float = 600) -> list[StepOutput]:
    """Submits `request` and blocks until its final output (benchmarks and tests; not for the API)."""
    outputs: list[StepOutput] = []
    done = threading.Event()

    def sink(out: StepOutput) -> None:
        outputs.append(out)
        if out.finished:
            done.set()

    core.submit(request, sink)
    if not done.wait(timeout):
        core.abort(request.request_id)
        raise TimeoutError(f"request {request.request_id} did not finish within {timeout}s")
    return outputs
