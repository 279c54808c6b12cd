"""The engine core: one thread owns the models and loops schedule -> draft -> forward -> verify -> emit.

Every step is one forward pass over all scheduled sequences (continuous batching): each running
request contributes its last token plus its drafts, prefill chunks fill the rest of the token budget.
The parts live next door: the scheduler (queues, pages, preemption), the runner (the batched forward),
the speculative step (pricing k, drafting, verification), the output processor (stop rules, text,
logprobs). This module owns the thread, the door other threads use, and the stats snapshot.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from verispec.config import EngineConfig
from verispec.engine.faults import FaultInjector, is_fatal
from verispec.engine.output import OutputProcessor, final
from verispec.engine.scheduler import ScheduledSequence, Scheduler
from verispec.engine.sequence import Sequence, Sink
from verispec.engine.speculative import SpeculativeStep, StepObserver, StepTiming
from verispec.engine.text import TextStream
from verispec.errors import CapacityError, EngineDeadError, NotReadyError, OverloadedError, SamplingError
from verispec.request import FinishReason, Request, SpecStats, SpeculationMode, StepOutput
from verispec.runner.base import BatchEntry, ModelRunner
from verispec.sampling import Sampler
from verispec.spec.adaptive import CostModel
from verispec.spec.drafters import Drafter
from verispec.spec.verify import Proposal, Verdict
from verispec.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

T = TypeVar("T")
_MEMORY_EVERY_S = 1.0  # how often the engine thread re-reads device memory for the stats snapshot


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for Health and metrics, published by the engine thread after every step."""

    queue_depth: int = 0
    active_requests: int = 0
    last_step_age_s: float | None = None
    recent_acceptance: float | None = None
    kv_pages_total: int = 0
    kv_pages_used: int = 0
    kv_page_size: int = 0
    kv_bytes_per_token: int = 0
    batch_size: int = 0  # sequences in the last forward pass
    batch_tokens: int = 0  # tokens in the last forward pass
    num_preemptions: int = 0  # since start
    memory: tuple[tuple[str, int, int], ...] = ()  # (device, used, total), read on the engine thread


class EngineCore:
    """Admits requests through a bounded queue and steps every running request in one batched pass."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        drafters: Mapping[SpeculationMode, Drafter],
        config: EngineConfig,
        costs: CostModel | None = None,
        observer: StepObserver | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.costs = costs or CostModel()
        self.observer = observer
        self.info = runner.info
        self.pool = runner.kv.new_pool()
        self.speculation = SpeculativeStep(drafters, self.costs, self.info, self.pool, observer)
        self.scheduler = Scheduler(
            self.pool,
            config.max_active_requests,
            config.max_batch_tokens,
            config.scheduling,
            step_cost=self.costs.verify_cost,
            decode_step_slack=config.decode_step_slack,
        )
        self.output = OutputProcessor(set(tokenizer.eos_token_ids), self.info.max_context_length)
        self.faults = FaultInjector.parse(config.fault_injection)
        self.on_failure: Callable[[BaseException], None] | None = None  # called on the engine thread
        self._cond = threading.Condition()
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._aborted: set[str] = set()
        self._flow: dict[str, bool] = {}  # request id -> park (True) or resume (False), latest wins
        self._parked: dict[str, Sequence] = {}  # out of the scheduler: their reader fell behind
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._ids = itertools.count()
        self._outbox: list[tuple[Sink, StepOutput]] = []  # outputs of this loop iteration, sent after publishing
        self._request_seconds: float | None = None  # mean time in the engine of completed requests
        self._stats = EngineStats(
            kv_pages_total=self.pool.num_pages,
            kv_page_size=self.pool.page_size,
            kv_bytes_per_token=runner.kv.bytes_per_token,
        )
        self._last_step: float | None = None
        self._last_batch = (0, 0)  # (sequences, tokens) of the last forward pass
        self._memory_read = 0.0
        self._stopping = False
        self._failure: BaseException | None = None
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

    @property
    def stopped(self) -> bool:
        """Whether the step loop has ended (or never ran): no pass is in flight or will be."""
        return not self._started or self._done.is_set()

    def close(self) -> None:
        """After stop(): lets go of the runner's and the drafters' memory (KV pages, CUDA graphs), for an
        engine that owns them, as the loader's does. It goes back now, whoever still refers to the engine."""
        if not self.stopped:
            raise RuntimeError("close() before the engine loop has ended")
        self.runner.close()
        self.speculation.close()

    def submit(self, request: Request, sink: Sink) -> None:
        """Queues `request`; its outputs go to `sink` on the engine thread. Raises at once when full."""
        if self._failure is not None:
            raise EngineDeadError(f"engine stopped: {self._failure}")
        positions = len(request.prompt_token_ids) + request.stopping.max_new_tokens
        if not self.scheduler.fits_ever(min(positions, self.info.max_context_length)):
            raise CapacityError(
                f"the request needs up to {positions} KV positions (prompt {len(request.prompt_token_ids)} + "
                f"max_new_tokens {request.stopping.max_new_tokens}) but the whole KV cache holds "
                f"{self.pool.capacity_tokens} ({self.pool.num_pages} pages of {self.pool.page_size}); "
                "lower max_new_tokens or shorten the prompt, or start the server with more --kv-cache-memory"
            )
        seq = self._new_sequence(request, sink)
        with self._cond:
            if self._stopping:
                raise NotReadyError("the engine is shutting down")
            stats = self._stats
            queued = stats.queue_depth + len(self._inbox)
            free_slots = self.config.max_active_requests - stats.active_requests
            if queued - max(free_slots, 0) >= self.config.max_queued_requests:
                raise OverloadedError(
                    f"{stats.active_requests} requests active and {queued} queued "
                    f"(limits {self.config.max_active_requests} and {self.config.max_queued_requests})",
                    retry_after_s=max(self._request_seconds or 1.0, 0.1),
                )
            wait = self._expected_wait(queued - max(free_slots, 0))
            if request.deadline is not None and time.monotonic() + wait > request.deadline:
                raise OverloadedError(
                    f"the deadline cannot be met: about {wait:.1f}s until a slot frees up "
                    f"({stats.active_requests} active, {queued} queued)",
                    retry_after_s=wait,
                )
            self._inbox.append(seq)
            self._cond.notify()

    def _expected_wait(self, ahead: int) -> float:
        """Seconds until a request submitted now starts: slots free up one mean request length apart."""
        if ahead < 0 or self._request_seconds is None:
            return 0.0
        rounds = ahead // self.config.max_active_requests + 1
        return rounds * self._request_seconds

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Runs `fn` on the engine thread between steps (benchmarks measure the runner there)."""
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

    def park(self, request_id: str) -> None:
        """Stops stepping the request and frees its slot and KV pages (its reader fell behind); its
        output so far is kept, and resume() recomputes its cache and goes on where it stopped."""
        with self._cond:
            self._flow[request_id] = True
            self._cond.notify()

    def resume(self, request_id: str) -> None:
        """Queues a parked request again (a no-op for any other)."""
        with self._cond:
            self._flow[request_id] = False
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The snapshot the engine thread published last (safe from any thread)."""
        with self._cond:
            stats = self._stats
        age = None if self._last_step is None else time.monotonic() - self._last_step
        return dataclasses.replace(stats, last_step_age_s=age)

    def _new_sequence(self, request: Request, sink: Sink) -> Sequence:
        drafter = self.speculation.drafter_for(request.speculation.mode)
        stopping = request.stopping
        return Sequence(
            seq_id=next(self._ids),
            request=request,
            sink=sink,
            submitted_ns=time.time_ns(),
            submitted=time.monotonic(),
            drafter=drafter,
            controller=self.speculation.controller(drafter, request.speculation, self._stats.recent_acceptance),
            text=TextStream(self.tokenizer.decode, stopping.stop_sequences, stopping.include_stop_sequence),
            context=list(request.prompt_token_ids),
            stats=SpecStats(drafter=drafter.name if drafter is not None else "off"),
        )

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
            self._publish()  # memory and pool figures before the first request
            while True:
                with self._cond:
                    while not (
                        self._stopping or self._inbox or self._calls or self._aborted or self._flow or self._busy()
                    ):
                        self._cond.wait()
                    if self._stopping:
                        break
                    arrived, self._inbox = self._inbox, collections.deque()
                    aborted, self._aborted = self._aborted, set()
                    flow, self._flow = self._flow, {}
                    calls, self._calls = self._calls, collections.deque()
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except Exception as exc:
                            future.set_exception(exc)
                for seq in arrived:
                    self.scheduler.add(seq)
                self._apply_flow(flow)
                self._expire(aborted)
                if self._busy():
                    self._step()
                self._publish()
                # After publishing: a caller that sees its final output sees its pages freed. With an
                # asynchronous runner and more to do, the next step hands them out while its pass runs.
                if not (self.runner.asynchronous and self._busy()):
                    self._deliver()
        except BaseException as exc:  # a dead device or a bug in the loop: fail everything, loudly
            self._failure = exc
            log.exception("engine.crashed", fatal=is_fatal(exc))
        finally:
            error = "engine stopped" if self._failure is None else f"engine failed: {self._failure}"
            self._fail_all(FinishReason.CANCELLED if self._failure is None else FinishReason.ERROR, error)
            self._deliver()
            self._done.set()
            if self._failure is not None and self.on_failure is not None:
                self.on_failure(self._failure)

    def _busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def _apply_flow(self, flow: dict[str, bool]) -> None:
        """Parks the requests whose readers fell behind (like a preemption, but out of the queue too)
        and queues the resumed ones again, to be recomputed from prompt and output."""
        if not flow:
            return
        by_id = {seq.request_id: seq for seq in self.scheduler.sequences()}
        for request_id, park in flow.items():
            if park and (seq := by_id.get(request_id)) is not None:
                self.scheduler.remove(seq)
                self._forget_cache(seq)
                seq.num_computed = 0
                self._parked[request_id] = seq
            elif not park and (seq := self._parked.pop(request_id, None)) is not None:
                self.scheduler.add(seq)

    def _expire(self, aborted: set[str]) -> None:
        """Ends cancelled requests and those past their deadline or time limit: running, waiting or parked."""
        now = time.monotonic()
        for seq in [*self.scheduler.sequences(), *self._parked.values()]:
            request = seq.request
            reason: FinishReason | None = None
            if request.request_id in aborted or (request.deadline is not None and now >= request.deadline):
                reason = FinishReason.CANCELLED
            elif request.stopping.time_limit_s is not None and now - seq.submitted >= request.stopping.time_limit_s:
                reason = FinishReason.TIME_LIMIT
            if reason is not None:
                self._finish(seq, final(seq, reason, seq.text.flush()))

    def _step(self) -> None:
        """One engine step: schedule, draft for the decoding sequences, one target pass, verify, emit. The
        outputs of the step before are handed out once this one's pass is launched, or where it ends early."""
        speculation = self.speculation
        plan = self.scheduler.schedule(speculation.price)
        for seq in plan.preempted:
            self._forget_cache(seq)
            log.info("engine.preempted", request_id=seq.request_id, num_preemptions=seq.num_preemptions)
        scheduled = [s for s in plan.scheduled if self._prepare(s)]
        if not scheduled:
            self._hand_over()
            return
        step = StepTiming(time.time_ns())
        # (1) Drafters propose up to k tokens d_1..d_k for every decoding sequence, batched per drafter.
        proposals = speculation.propose(scheduled)
        step.t1 = time.time_ns()
        # (2) The target scores each sequence's new tokens (its last token plus drafts: k+1 positions,
        # or a prefill chunk) in ONE forward pass over the whole batch.
        entries = [self._entry(s, proposals[i]) for i, s in enumerate(scheduled)]
        step.batch_size, step.batch_tokens = len(entries), sum(len(e.token_ids) for e in entries)
        self._last_batch = (step.batch_size, step.batch_tokens)
        try:
            logits = self.runner.forward(entries)
        except Exception as exc:
            if is_fatal(exc):
                raise  # the device is gone: the loop fails every request and stops
            log.exception("engine.step_failed", batch_size=len(scheduled))
            for s in scheduled:
                self._finish(s.seq, final(s.seq, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}"))
            self._hand_over()
            return
        if self.runner.asynchronous:
            self._hand_over()  # the last step's outputs go out (gRPC work, on other threads) while the device runs
        # (3) Verification per request keeps a prefix of its drafts and adds one token of the target's
        # own; (4) the rejected drafts are forgotten by moving the sequence's length.
        targets = speculation.greedy_targets(scheduled, logits)
        verdicts = [self._verify(s, proposals[i], logits[i], targets[i]) for i, s in enumerate(scheduled)]
        step.t2 = time.time_ns()
        self._last_step = time.monotonic()
        self.costs.record_verify(step.batch_tokens, (step.t2 - step.t1) / 1e9, step.batch_size)
        if self.observer is not None:
            self.observer.on_batch(step.batch_size, step.batch_tokens, (step.t2 - step.t0) / 1e9)
        for s, proposal, verdict, rows in zip(scheduled, proposals, verdicts, logits, strict=True):
            if verdict is None:
                continue  # a prefill chunk that does not reach the end of the context emits nothing
            speculation.account(s, proposal, verdict, step)
            out = self.output.emit(s.seq, verdict.token_ids, rows)
            if out.finished:
                self._finish(s.seq, out)
            else:
                self._outbox.append((s.seq.sink, out))

    def _verify(
        self, s: ScheduledSequence, proposal: Proposal, logits: Any, target_ids: list[int] | None
    ) -> Verdict | None:
        """speculation.verify; a distribution with NaN or infinity fails that request alone."""
        try:
            return self.speculation.verify(s, proposal, logits, target_ids)
        except SamplingError as exc:
            log.error("engine.sampling_failed", request_id=s.seq.request_id, error=str(exc))
            self._finish(s.seq, final(s.seq, FinishReason.ERROR, error=str(exc)))
            return None

    def _prepare(self, s: ScheduledSequence) -> bool:
        """First-schedule set-up and the test-only fault hook; False drops the sequence from the step."""
        seq = s.seq
        if seq.sampler_state is None:
            stopping = seq.request.stopping
            # Made here, not in submit(): every torch op belongs on the engine thread.
            seq.sampler_state = Sampler(
                seq.request.sampling,
                self.info.vocab_size,
                seq.request.prompt_token_ids,
                suppress_token_ids=set(self.tokenizer.eos_token_ids) | set(stopping.stop_token_ids),
                min_new_tokens=stopping.min_new_tokens,
            )
            seq.admitted = time.monotonic()
        if seq.drafter is not None and seq.draft_state is None:
            seq.draft_state = seq.drafter.start()
        if not seq.decoding and not seq.prefill_start_ns:
            seq.prefill_start_ns = time.time_ns()
        if self.faults is None:
            return True
        try:
            self.faults.before_step()
        except Exception as exc:
            if is_fatal(exc):
                raise
            log.error("engine.step_failed", request_id=seq.request_id, error=str(exc))
            self._finish(seq, final(seq, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}"))
            return False
        return True

    def _entry(self, s: ScheduledSequence, proposal: Proposal) -> BatchEntry:
        seq = s.seq
        start = seq.num_computed
        tokens = [*seq.context[start : start + s.num_new_tokens], *proposal.token_ids]
        return BatchEntry(seq.seq_id, tokens, start, seq.pages.pages, len(proposal.token_ids) + 1 if s.final else 0)

    def _finish(self, seq: Sequence, out: StepOutput) -> None:
        self.scheduler.remove(seq)
        self._parked.pop(seq.request_id, None)
        self._forget_cache(seq)
        if out.finish_reason in (
            FinishReason.LENGTH,
            FinishReason.EOS,
            FinishReason.STOP_SEQUENCE,
            FinishReason.STOP_TOKEN,
        ):
            seconds = time.monotonic() - seq.admitted
            old = self._request_seconds
            self._request_seconds = seconds if old is None else old + 0.2 * (seconds - old)
        self._outbox.append((seq.sink, out))

    def _hand_over(self) -> None:
        """Delivers inside a step: the stats first where an output ends a request (or where the step ended
        requests), so that a caller who sees its final output sees its pages freed."""
        if any(out.finished for _, out in self._outbox):
            self._publish()
        self._deliver()

    def _deliver(self) -> None:
        """Hands this iteration's outputs to their requests' sinks."""
        outbox, self._outbox = self._outbox, []
        for sink, out in outbox:
            sink(out)

    def _forget_cache(self, seq: Sequence) -> None:
        """Drops what runner and drafter keep for a sequence (finished, or preempted for recompute)."""
        self.runner.free(seq.seq_id)
        if seq.drafter is not None and seq.draft_state is not None:
            seq.drafter.free(seq.draft_state)
            seq.draft_state = None

    def _publish(self) -> None:
        """Publishes the stats snapshot other threads read (engine-thread state never leaves otherwise)."""
        now = time.monotonic()
        memory = self._stats.memory
        if now - self._memory_read >= _MEMORY_EVERY_S:
            memory, self._memory_read = tuple(self.runner.memory()), now
        scheduler = self.scheduler
        stats = EngineStats(
            queue_depth=len(scheduler.waiting),
            active_requests=len(scheduler.running),
            recent_acceptance=self.speculation.recent_acceptance,
            kv_pages_total=self.pool.num_pages,
            kv_pages_used=self.pool.num_used,
            kv_page_size=self.pool.page_size,
            kv_bytes_per_token=self.runner.kv.bytes_per_token,
            batch_size=self._last_batch[0],
            batch_tokens=self._last_batch[1],
            num_preemptions=scheduler.num_preemptions,
            memory=memory,
        )
        with self._cond:
            self._stats = stats

    def _fail_all(self, reason: FinishReason, error: str) -> None:
        with self._cond:
            arrived, self._inbox = list(self._inbox), collections.deque()
        for seq in [*self.scheduler.sequences(), *self._parked.values(), *arrived]:
            self._finish(seq, final(seq, reason, error=error))


def run_to_completion(
    core: EngineCore,
    request: Request,
    timeout: float = 600,
    observe: Callable[[StepOutput], None] | None = None,
) -> list[StepOutput]:
    """Submits `request` and blocks until its final output (benchmarks and tests; not for the API);
    `observe` sees each output as it arrives, on the engine thread (a benchmark's clock)."""
    outputs: list[StepOutput] = []
    done = threading.Event()

    def sink(out: StepOutput) -> None:
        if observe is not None:
            observe(out)
        outputs.append(out)
        if out.finished:
            done.set()

    core.submit(request, sink)
    if not done.wait(timeout):
        core.abort(request.request_id)
        raise TimeoutError(f"request {request.request_id} did not finish within {timeout}s")
    return outputs
