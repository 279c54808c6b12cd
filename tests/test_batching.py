"""Continuous batching: scheduling and paging on a fast fake runner, then the real model in batches.

The invariants: a request served inside a batch gets exactly the tokens it gets alone (greedy and
seeded sampling, with or without drafts, across preemptions); every page goes back to the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from tests.conftest import Target
from verispec.backends.base import BackendInfo
from verispec.config import EngineConfig
from verispec.engine.core import EngineCore, run_to_completion
from verispec.engine.scheduler import Scheduler
from verispec.engine.sequence import Sequence as EngineSequence
from verispec.engine.text import TextStream
from verispec.errors import CapacityError
from verispec.kv.pages import OutOfPagesError, PagePool, PageTable
from verispec.loader import calibrate
from verispec.request import (
    FinishReason,
    Request,
    ResponseOptions,
    SamplingParams,
    SpeculationMode,
    SpeculationParams,
    StepOutput,
    StoppingCriteria,
)
from verispec.runner import build_runner
from verispec.runner.attention import AttentionPlan, paged_attention
from verispec.runner.base import BatchEntry, KVLayout
from verispec.runner.sequential import SequentialRunner
from verispec.runner.torch_llama import TorchLlamaRunner
from verispec.spec.adaptive import CostModel, KController
from verispec.spec.drafters import Drafter, ModelDrafter, NgramDrafter
from verispec.tokenizer import Tokenizer

# -- the page pool ---------------------------------------------------------------------------------


def test_pool_reserves_all_or_nothing_and_truncates_whole_pages() -> None:
    pool = PagePool(num_pages=4, page_size=4)
    a, b = PageTable(), PageTable()
    pool.reserve(a, 9)  # 3 pages
    assert len(a.pages) == 3 and pool.num_free == 1
    with pytest.raises(OutOfPagesError):
        pool.reserve(b, 5)  # 2 pages, 1 free: nothing is taken
    assert b.pages == [] and pool.num_free == 1
    pool.truncate(a, 4)  # positions 0..3 stay: one page
    assert len(a.pages) == 1 and pool.num_free == 3
    pool.release(a)
    assert pool.num_free == 4 and set(range(4)) == {*pool._free}


# -- a fake runner whose outputs depend on every cached token ---------------------------------------

VOCAB = 50
EOS = 49


class FakeRunner:
    """A deterministic 'model' over real pages: the next token is a hash of every token the page table
    says the sequence holds, so a page lost, shared or overwritten changes the output."""

    batched = True
    asynchronous = False
    cost_breaks: tuple[int, ...] = ()

    def __init__(self, num_pages: int, page_size: int = 4) -> None:
        self.info = BackendInfo("fake", "fake", VOCAB, 4096, "float32", ("cpu",))
        self.kv = KVLayout(page_size, num_pages, bytes_per_token=1, dtype="int")
        self.slots: dict[int, int] = {}
        self.num_forwards = 0
        self.max_batch = 0

    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        self.num_forwards += 1
        self.max_batch = max(self.max_batch, len(batch))
        ps = self.kv.page_size
        out = []
        for entry in batch:
            n = len(entry.token_ids)
            assert len(entry.pages) * ps >= entry.start + n, "pages must cover every written position"
            for i, token in enumerate(entry.token_ids):
                p = entry.start + i
                self.slots[entry.pages[p // ps] * ps + p % ps] = token
            rows = []
            for p in range(entry.start + n - entry.num_logits, entry.start + n):
                held = [self.slots[entry.pages[q // ps] * ps + q % ps] for q in range(p + 1)]
                logits = torch.zeros(VOCAB)
                logits[(sum(t * (q + 1) for q, t in enumerate(held)) * 7 + 3) % (VOCAB - 1)] = 5.0
                rows.append(logits)
            out.append(torch.stack(rows) if rows else torch.zeros(0, VOCAB))
        return out

    def free(self, seq_id: int) -> None:
        return None

    def memory(self) -> list[tuple[str, int, int]]:
        return [("cpu", 0, 0)]

    def close(self) -> None:
        self.slots.clear()


class FakeTokenizer:
    """Enough of Tokenizer for the engine: one character per token."""

    eos_token_ids = (EOS,)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def _request(
    request_id: str,
    prompt: Sequence[int],
    n: int,
    mode: SpeculationMode = SpeculationMode.OFF,
    k: int = 4,
    sampling: SamplingParams | None = None,
    min_new_tokens: int = 0,
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=tuple(prompt),
        sampling=sampling or SamplingParams(),
        stopping=StoppingCriteria(max_new_tokens=n, min_new_tokens=min_new_tokens),
        response=ResponseOptions(),
        speculation=SpeculationParams(mode, k),
    )


def _fake_core(num_pages: int, asynchronous: bool = False, **engine: object) -> tuple[EngineCore, FakeRunner]:
    runner = FakeRunner(num_pages)
    runner.asynchronous = asynchronous
    config = EngineConfig(**engine)  # type: ignore[arg-type]
    tokenizer: Tokenizer = FakeTokenizer()  # type: ignore[assignment]
    core = EngineCore(runner, tokenizer, {SpeculationMode.NGRAM: NgramDrafter(1, 2)}, config)
    core.start()
    return core, runner


def tokens(outputs: list[StepOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def _run_concurrently(core: EngineCore, requests: list[Request]) -> dict[str, list[StepOutput]]:
    """Every request submitted while the engine thread is held between steps, so that all of them are in
    its queues together however fast a step is; then their outputs once each has its final one."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    core.call(hold)
    assert held.wait(60), "the engine thread never took the call"
    results: dict[str, list[StepOutput]] = {r.request_id: [] for r in requests}
    done = {r.request_id: threading.Event() for r in requests}

    def sink_for(request_id: str) -> Callable[[StepOutput], None]:
        def sink(out: StepOutput) -> None:
            results[request_id].append(out)
            if out.finished:
                done[request_id].set()

        return sink

    try:
        for request in requests:
            core.submit(request, sink_for(request.request_id))
    finally:
        release.set()
    for request_id, event in done.items():
        assert event.wait(300), f"{request_id} never finished"
    return results


FAKE_PROMPTS = [list(range(1, 1 + n)) for n in (3, 9, 17, 5, 30, 2, 12, 7)]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["synchronous", "asynchronous"])
def test_fake_batch_equals_solo_across_preemptions_and_returns_every_page(asynchronous: bool) -> None:
    """A pool of 24 pages of 4 cannot hold 8 growing sequences: the newest are preempted and
    recomputed, yet every request ends with its solo tokens and the pool ends full (whether a step's
    outputs go out at its end or during the next step's pass)."""
    solo_core, _ = _fake_core(num_pages=256, asynchronous=asynchronous)
    modes = [SpeculationMode.OFF, SpeculationMode.NGRAM]
    requests = [_request(f"r{i}", p, 20, modes[i % 2]) for i, p in enumerate(FAKE_PROMPTS)]
    try:
        solo = {r.request_id: tokens(run_to_completion(solo_core, r)) for r in requests}
    finally:
        solo_core.stop(5)
    core, runner = _fake_core(num_pages=24, asynchronous=asynchronous)
    try:
        results = _run_concurrently(core, requests)
        assert core.scheduler.num_preemptions > 0, "the pool was meant to run out"
        assert runner.max_batch > 1
        for request in requests:
            assert tokens(results[request.request_id]) == solo[request.request_id], request.request_id
        assert core.pool.num_used == 0 and core.pool.num_free == 24
        assert core.stats().num_preemptions == core.scheduler.num_preemptions
    finally:
        core.stop(5)


def test_an_asynchronous_runner_overlaps_a_steps_outputs_with_the_next_pass() -> None:
    """With a runner whose forward returns while the device computes, the outputs of step n go out once
    step n + 1's pass is launched (the gRPC work then overlaps the device's), and the last output as the
    engine goes idle: every token arrives, one final output ends the request."""
    core, runner = _fake_core(num_pages=256, asynchronous=True)
    events: list[str] = []
    forward = runner.forward

    def logged_forward(batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        events.append("forward")
        return forward(batch)

    runner.forward = logged_forward  # type: ignore[method-assign]
    try:
        outputs = run_to_completion(core, _request("a", FAKE_PROMPTS[0], 4), observe=lambda out: events.append("out"))
    finally:
        core.stop(5)
    assert events == ["forward", "forward", "out", "forward", "out", "forward", "out", "out"]
    assert len(tokens(outputs)) == 4 and [out.finished for out in outputs] == [False, False, False, True]


def test_an_output_handed_over_during_a_pass_comes_after_the_stats_that_free_its_request() -> None:
    """With an asynchronous runner a cancelled request's final output goes out during the next pass of the
    request still running; by then the stats snapshot no longer counts it (its pages are free)."""
    core, _ = _fake_core(num_pages=256, asynchronous=True)
    seen: dict[str, int] = {}

    def sink(out: StepOutput) -> None:
        if not out.finished:
            core.abort("short")
        else:
            seen[out.request_id] = core.stats().active_requests

    try:
        done = threading.Event()
        core.submit(_request("long", FAKE_PROMPTS[1], 200), lambda out: done.set() if out.finished else None)
        short = run_to_completion(core, _request("short", FAKE_PROMPTS[0], 100), observe=sink)
        core.abort("long")
        assert done.wait(30)
    finally:
        core.stop(5)
    assert short[-1].finish_reason is FinishReason.CANCELLED and seen["short"] == 1, seen


def test_cancelled_requests_return_their_pages() -> None:
    core, _ = _fake_core(num_pages=256)
    try:
        done = threading.Event()
        seen: list[StepOutput] = []

        def sink(out: StepOutput) -> None:
            seen.append(out)
            if len(seen) == 3:
                core.abort("long")
            if out.finished:
                done.set()

        core.submit(_request("long", FAKE_PROMPTS[4], 400), sink)
        assert done.wait(30)
        assert seen[-1].finish_reason is FinishReason.CANCELLED
        assert sum(1 for out in seen if out.finished) == 1
        assert core.pool.num_used == 0
    finally:
        core.stop(5)


def test_a_request_larger_than_the_whole_pool_is_refused() -> None:
    core, _ = _fake_core(num_pages=4)  # 16 positions
    try:
        with pytest.raises(CapacityError, match="KV cache holds 16"):
            core.submit(_request("big", range(1, 10), 10), lambda out: None)
    finally:
        core.stop(5)


# -- the scheduler alone ---------------------------------------------------------------------------


@dataclass
class _Plain:
    """Sequences for scheduler tests (no engine)."""

    pool: PagePool
    made: list[EngineSequence] = field(default_factory=list)

    def sequence(self, prompt_length: int, emitted: int = 0) -> EngineSequence:
        request = _request(f"s{len(self.made)}", range(1, 1 + prompt_length), 64)
        seq = EngineSequence(
            seq_id=len(self.made),
            request=request,
            sink=lambda out: None,
            submitted_ns=0,
            submitted=0.0,
            drafter=None,
            controller=KController(k_max=0, adapt=False),
            text=TextStream(FakeTokenizer().decode),
            context=list(request.prompt_token_ids) + [7] * emitted,
            output_ids=[7] * emitted,
        )
        self.made.append(seq)
        return seq


def _no_drafts(seq: EngineSequence, batch_tokens: int, batch_size: int) -> int:
    return 0


def test_decodes_come_first_and_prefill_is_chunked_shortest_first() -> None:
    pool = PagePool(64, 4)
    scheduler = Scheduler(pool, max_running=8, max_batch_tokens=10)
    make = _Plain(pool)
    decoding = [make.sequence(4, emitted=1) for _ in range(3)]
    for seq in decoding:
        scheduler.add(seq)
    scheduler.schedule(_no_drafts)  # admits them (each still has its context to compute)
    for seq in decoding:
        seq.num_computed = len(seq.context) - 1  # as if prefilled
    long, short = make.sequence(40), make.sequence(3)
    scheduler.add(long)
    scheduler.add(short)
    plan = scheduler.schedule(_no_drafts)
    kinds = [(s.seq.request_id, s.num_new_tokens, s.decode) for s in plan.scheduled]
    assert kinds[:3] == [(seq.request_id, 1, True) for seq in decoding], "running decodes go first"
    assert kinds[3] == (short.request_id, 3, False), "the short prompt is prefilled before the long one"
    assert kinds[4] == (long.request_id, 4, False), "the long prompt gets what is left of the budget"
    assert plan.num_tokens == 10


def test_admission_waits_for_the_pages_of_the_whole_prompt() -> None:
    pool = PagePool(10, 4)  # 40 positions
    scheduler = Scheduler(pool, max_running=8, max_batch_tokens=64)
    make = _Plain(pool)
    first, second = make.sequence(30), make.sequence(12)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule(_no_drafts)
    assert scheduler.running == [first] and list(scheduler.waiting) == [second], "12 more do not fit beside 30"
    scheduler.remove(first)
    scheduler.schedule(_no_drafts)
    assert scheduler.running == [second]


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    pool = PagePool(4, 4)
    scheduler = Scheduler(pool, max_running=8, max_batch_tokens=64)
    make = _Plain(pool)
    old, new = make.sequence(7, emitted=1), make.sequence(7, emitted=1)  # 8 positions each: all 4 pages
    for seq in (old, new):
        scheduler.add(seq)
    scheduler.schedule(_no_drafts)
    for seq in (old, new):
        seq.num_computed = 8
        seq.context.append(7)
        seq.output_ids.append(7)
    plan = scheduler.schedule(_no_drafts)  # old needs a 3rd page for position 8: new gives its pages back
    assert plan.preempted == [new] and new.num_computed == 0
    assert [s.seq for s in plan.scheduled] == [old]
    assert scheduler.waiting[0] is new and scheduler.num_preemptions == 1


# -- the real model --------------------------------------------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
    "Write a haiku about rain.",
    "List the first five prime numbers, separated by commas, and say why each one is prime in one sentence.",
    "Hi",
    "Translate to French: good morning, how are you today?",
    "def fibonacci(n):",
    "Name three colours.",
]


@pytest.fixture(scope="module")
def real_cores(target: Target) -> Iterator[tuple[EngineCore, EngineCore]]:
    """(solo, batched): the same model and drafters; the solo engine is only ever given one request."""
    config = EngineConfig()

    def make() -> EngineCore:
        drafters: dict[SpeculationMode, Drafter] = {
            SpeculationMode.NGRAM: NgramDrafter(1, 3),
            SpeculationMode.DRAFT_MODEL: ModelDrafter(build_runner(target.backend, config)),
        }
        core = EngineCore(build_runner(target.backend, config), target.tokenizer, drafters, config)
        core.start()
        return core

    solo, batched = make(), make()
    yield solo, batched
    solo.stop(10)
    batched.stop(10)


def _mixed_requests(target: Target, sampling: SamplingParams) -> list[Request]:
    # AUTO picks k from measured step times, which differ between a batch and a solo run. Greedy output
    # and deterministic (n-gram) drafts do not depend on k; sampled drafts of a draft model do: with
    # rejection sampling, another k is another (equally exact) draw. Seeded requests use a fixed k.
    auto = SpeculationMode.AUTO if sampling.greedy else SpeculationMode.NGRAM
    modes = [SpeculationMode.OFF, SpeculationMode.NGRAM, SpeculationMode.DRAFT_MODEL, auto]
    return [
        _request(f"m{i}", target.tokenizer.encode_chat([("user", p)]), 24, modes[i % 4], 3, sampling)
        for i, p in enumerate(PROMPTS)
    ]


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=11)],
    ids=["greedy", "seeded"],
)
def test_a_request_in_a_batch_of_8_gets_its_solo_tokens(
    target: Target, real_cores: tuple[EngineCore, EngineCore], sampling: SamplingParams
) -> None:
    """Eight requests of different prompt lengths and speculation modes, two of them cancelled midway:
    each survivor's tokens equal what it gets served alone, token for token (fp32 CPU)."""
    solo_core, core = real_cores
    requests = _mixed_requests(target, sampling)
    solo = {r.request_id: tokens(run_to_completion(solo_core, r)) for r in requests}
    cancelled = {"m2", "m5"}
    results: dict[str, list[StepOutput]] = {}
    done = threading.Event()

    def sink_for(request_id: str) -> object:
        def sink(out: StepOutput) -> None:
            results.setdefault(request_id, []).append(out)
            if request_id in cancelled and len(results[request_id]) == 2:
                core.abort(request_id)
            if out.finished and sum(1 for rs in results.values() if rs[-1].finished) == len(requests):
                done.set()

        return sink

    used_before = core.pool.num_used
    for request in requests:
        core.submit(request, sink_for(request.request_id))  # type: ignore[arg-type]
    assert done.wait(300)
    for request in requests:
        outs = results[request.request_id]
        assert sum(1 for out in outs if out.finished) == 1, "exactly one final message"
        if request.request_id in cancelled:
            assert outs[-1].finish_reason is FinishReason.CANCELLED
            assert tokens(outs) == solo[request.request_id][: len(tokens(outs))]
        else:
            assert tokens(outs) == solo[request.request_id], request.request_id
    assert core.stats().batch_size >= 1
    assert core.pool.num_used == used_before == 0


def test_preempted_requests_resume_with_their_solo_tokens(target: Target) -> None:
    """A real KV pool of 8 pages of 16 for four requests of 40-60 positions each forces preemptions."""
    config = EngineConfig(max_batch_tokens=64)
    bytes_per_token = 2 * 30 * 3 * 64 * 4
    runner = TorchLlamaRunner(target.backend.model, target.backend.info, 16, 8 * 16 * bytes_per_token, 10**6)
    assert runner.kv.num_pages == 8
    core = EngineCore(runner, target.tokenizer, {}, config)
    core.start()
    requests = [_request(f"p{i}", target.tokenizer.encode(p), 36, min_new_tokens=36) for i, p in enumerate(PROMPTS[:4])]
    try:
        solo = {r.request_id: tokens(run_to_completion(core, r)) for r in requests}
        results = _run_concurrently(core, requests)
        assert core.scheduler.num_preemptions > 0
        for request in requests:
            assert tokens(results[request.request_id]) == solo[request.request_id]
        assert core.pool.num_used == 0
    finally:
        core.stop(10)


@pytest.mark.parametrize("weights", ["float32", "native"])
def test_runner_logits_match_the_transformers_reference(weights: str, target: Target, reference: Target) -> None:
    """One forward mixing a prefill chunk, a continued chunk and a decode step equals transformers'
    own forward of each sequence on the same weights: to fp32 rounding on the float32 weights; on the
    native int4 weights, where the two paths' different op order (fused projections, fused RMSNorm) moves
    bfloat16 roundings of the kernel's inputs, within the native-vs-float32 bound of test_quant (5% of the
    largest logit), with the same argmax."""
    if weights == "float32":
        target = reference
    assert target.backend.weights == weights
    tolerance = 1e-5 if weights == "float32" else 5e-2
    runner = build_runner(target.backend, EngineConfig(max_active_requests=4))
    assert isinstance(runner, TorchLlamaRunner)
    pool = PagePool(runner.kv.num_pages, runner.kv.page_size)
    ids = [target.tokenizer.encode(p) for p in PROMPTS[:3]]
    tables = [PageTable() for _ in ids]
    for table, seq in zip(tables, ids, strict=True):
        pool.reserve(table, len(seq))
    cut = [len(ids[0]), 5, len(ids[2]) - 1]  # whole, a first chunk, all but the last token
    runner.forward([BatchEntry(i, ids[i][: cut[i]], 0, tables[i].pages, 0) for i in range(3)])
    rest = [BatchEntry(i, ids[i][cut[i] :], cut[i], tables[i].pages, len(ids[i]) - cut[i]) for i in (1, 2)]
    got = runner.forward(rest)
    for entry, logits in zip(rest, got, strict=True):
        cache = target.backend.new_cache()
        expected = target.backend.forward(cache, ids[entry.seq_id], len(ids[entry.seq_id]))[cut[entry.seq_id] :]
        scale = float(expected.abs().max())
        assert float((logits - expected).abs().max()) < tolerance * scale
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_cpu_attention_splits_unlike_shapes_and_each_token_attends_as_alone() -> None:
    """On CPU a 16-token chunk deep in a long prompt and a 3-token verify get padded calls apart from
    8 one-token decodes (at most twice the query-key pairs they need); in float64 every entry's attention
    equals what it gets alone, bit for bit. A plan built on the host for a GPU keeps the one padded call."""
    torch.manual_seed(3)
    k_cache, v_cache = torch.randn(4096, 3, 64), torch.randn(4096, 3, 64)
    decodes = [BatchEntry(i, [1], 40 + 7 * i, range(8 * i, 8 * i + 8), 1) for i in range(8)]
    chunk = BatchEntry(8, [1] * 16, 900, range(100, 160), 0)
    verify = BatchEntry(9, [1, 2, 3], 50, range(200, 208), 3)
    batch = [decodes[0], chunk, *decodes[1:4], verify, *decodes[4:]]
    host = torch.device("cpu")
    assert len(AttentionPlan.build(batch, 16, host).groups) == 1, "a plan for a GPU keeps one padded call"
    plan = AttentionPlan.build(batch, 16, host, cpu=True)
    shapes = sorted(tuple(g.query_rows.shape) for g in plan.groups)
    assert shapes[-1] == (8, 1) and len(shapes) > 1, "the decodes pad neither to 3 nor to 16 queries"
    q = torch.randn(sum(len(e.token_ids) for e in batch), 9, 64)
    together = paged_attention(q, k_cache, v_cache, plan, 0.125, torch.float64)
    offset = 0
    for entry in batch:
        n = len(entry.token_ids)
        alone = paged_attention(
            q[offset : offset + n],
            k_cache,
            v_cache,
            AttentionPlan.build([entry], 16, host, cpu=True),
            0.125,
            torch.float64,
        )
        assert torch.equal(together[offset : offset + n], alone), entry.seq_id
        offset += n


def test_sequential_fallback_serves_the_same_tokens(reference: Target) -> None:
    """Architectures without a batched runner go through the backend one sequence at a time. Compared on
    the float32 weights: two code paths over the same exact weights give the same greedy tokens."""
    target = reference
    config = EngineConfig()
    runner = SequentialRunner(target.backend, page_size=16, num_pages=512)
    core = EngineCore(runner, target.tokenizer, {SpeculationMode.NGRAM: NgramDrafter(1, 3)}, config)
    core.start()
    batched = EngineCore(build_runner(target.backend, config), target.tokenizer, {}, config)
    batched.start()
    try:
        requests = [
            _request(f"f{i}", target.tokenizer.encode(p), 16, SpeculationMode.NGRAM) for i, p in enumerate(PROMPTS[:3])
        ]
        fallback = _run_concurrently(core, requests)
        for request in requests:
            assert tokens(fallback[request.request_id]) == tokens(run_to_completion(batched, request))
        assert core.pool.num_used == 0
    finally:
        core.stop(10)
        batched.stop(10)


def test_prefill_beside_decodes_keeps_the_step_within_the_slack() -> None:
    """With a pass cost that grows past 32 tokens, a long prompt beside 8 decodes gets a chunk that keeps
    the step within 1.25x of decoding alone, never less than a page; alone it gets the whole budget."""
    pool = PagePool(512, 16)

    def cost(tokens: int) -> float:
        return 0.1 if tokens <= 32 else 0.1 * tokens / 32

    scheduler = Scheduler(pool, max_running=16, max_batch_tokens=256, step_cost=cost, decode_step_slack=1.25)
    make = _Plain(pool)
    long = make.sequence(2000)
    scheduler.add(long)
    alone = scheduler.schedule(_no_drafts)
    assert [(s.seq, s.num_new_tokens) for s in alone.scheduled] == [(long, 256)]
    long.num_computed += 256
    decoding = [make.sequence(4, emitted=1) for _ in range(8)]
    for seq in decoding:
        scheduler.add(seq)
    scheduler.schedule(_no_drafts)
    for seq in decoding:
        seq.num_computed = len(seq.context) - 1
    long.num_computed = 512
    plan = scheduler.schedule(_no_drafts)
    chunk = next(s.num_new_tokens for s in plan.scheduled if s.seq is long)
    assert cost(8 + chunk) <= 1.25 * cost(8) and chunk >= 16, chunk


def test_a_short_prompt_beside_decodes_is_prefilled_in_one_step() -> None:
    """The slack never splits a short prompt: it is scheduled whole beside the decodes even when the slack
    allows less (a fixed cost per pass makes a pass of its own too dear: it rides with the decodes)."""
    scheduler, decoding, short = _eight_decoding_and_a_new_prompt(lambda tokens: 0.1 + 0.01 * tokens)
    plan = scheduler.schedule(_no_drafts)  # the slack alone would allow 4 prompt tokens beside 8 decodes
    assert [s.seq for s in plan.scheduled] == [*decoding, short]
    assert plan.scheduled[-1].num_new_tokens == 30


def test_a_burst_of_short_prompts_beside_decodes_starts_together() -> None:
    """Five 14-token prompts arrive while one request decodes, where the slack alone would allow 15 prompt
    tokens a step: the four that fit together in a quarter of the budget are prefilled whole in the next step
    (one a step would give the last of them its first token three passes later); the fifth waits."""
    pool = PagePool(512, 16)
    scheduler = Scheduler(
        pool, max_running=16, max_batch_tokens=256, step_cost=lambda n: 0.02 + 0.0003 * n, decode_step_slack=1.25
    )
    make = _Plain(pool)
    decoding = make.sequence(4, emitted=1)
    scheduler.add(decoding)
    scheduler.schedule(_no_drafts)
    decoding.num_computed = len(decoding.context) - 1
    burst = [make.sequence(14) for _ in range(5)]
    for seq in burst:
        scheduler.add(seq)
    plan = scheduler.schedule(_no_drafts)
    assert [(s.seq, s.num_new_tokens) for s in plan.scheduled] == [(decoding, 1), *((seq, 14) for seq in burst[:4])]


def _graph_cost(tokens: int) -> float:
    """A GPU's pass cost with CUDA graphs up to 64 rows (the H100's measured shape): a replay grows slowly
    with rows; an eager pass past the largest bucket pays ~100 ms of launches first (112 tokens 145 ms),
    and only a full one is cheaper per token than the 64-row replay."""
    return 0.019 + 0.00065 * tokens if tokens <= 64 else 0.1 + 0.0004 * tokens


def test_an_idle_engine_prefills_the_whole_prompts_that_move_the_most_tokens_per_second() -> None:
    """At an idle engine whose passes past 64 rows launch eagerly, four 28-token prompts (112 tokens) would
    part-fill an eager pass at 0.77 tokens/ms: the first pass takes two of them whole, a 64-row replay at
    1.01 tokens/ms; a 2000-token prompt fills the whole 256-token budget, the eager pass's 1.26 tokens/ms
    beating the replay. Where a pass costs more per token the more tokens it has, one prompt still goes
    whole: it is never cut short of the budget."""
    for cost, lengths, expected in (
        (_graph_cost, [28, 28, 28, 28], [28, 28]),
        (_graph_cost, [2000], [256]),
        (lambda tokens: 0.001 * tokens**1.3, [42], [42]),
    ):
        pool = PagePool(512, 16)
        scheduler = Scheduler(pool, max_running=16, max_batch_tokens=256, step_cost=cost, decode_step_slack=1.25)
        make = _Plain(pool)
        prompts = [make.sequence(n) for n in lengths]
        for seq in prompts:
            scheduler.add(seq)
        plan = scheduler.schedule(_no_drafts)
        assert [(s.seq, s.num_new_tokens) for s in plan.scheduled] == list(zip(prompts, expected, strict=False))


def test_a_prompt_that_would_cross_the_largest_graph_waits_for_the_next_pass() -> None:
    """Two 30-token prompts arrive while six requests decode: the first rides with the decodes (36 rows, a
    graph's replay); the second would make the pass 66 rows, an eager pass dearer than two passes, so it
    waits for the next one rather than slowing all seven."""
    scheduler, decoding, new = _decoding_and_new_prompts(_graph_cost, 6, [30, 30])
    plan = scheduler.schedule(_no_drafts)
    assert [(s.seq, s.num_new_tokens) for s in plan.scheduled] == [*((seq, 1) for seq in decoding), (new[0], 30)]


def test_calibration_measures_both_sides_of_where_a_pass_costs_a_step_more() -> None:
    """Besides the verify sizes and 16 / 32 / 64, start-up times the runner's cost break and one token past
    it, and the whole budget: prices past the break then rest on passes of that kind, not on a line drawn
    from the cheaper side."""
    runner = FakeRunner(num_pages=64)
    costs = CostModel()
    calibrate(runner, costs, 3, 48)
    assert sorted(costs.verify_s) == [1, 2, 3, 16, 32]
    runner.cost_breaks = (8,)
    costs = CostModel()
    calibrate(runner, costs, 3, 48)
    assert sorted(costs.verify_s) == [1, 2, 3, 8, 9, 16, 32, 48]


def _decoding_and_new_prompts(
    cost: Callable[[int], float], num_decoding: int, new_lengths: Sequence[int]
) -> tuple[Scheduler, list[EngineSequence], list[EngineSequence]]:
    """A scheduler whose `num_decoding` sequences each decode their next token, and new prompts waiting."""
    pool = PagePool(512, 16)
    scheduler = Scheduler(pool, max_running=16, max_batch_tokens=256, step_cost=cost, decode_step_slack=1.25)
    make = _Plain(pool)
    decoding = [make.sequence(4, emitted=1) for _ in range(num_decoding)]
    for seq in decoding:
        scheduler.add(seq)
    scheduler.schedule(_no_drafts)
    for seq in decoding:
        seq.num_computed = len(seq.context) - 1
    new = [make.sequence(n) for n in new_lengths]
    for seq in new:
        scheduler.add(seq)
    return scheduler, decoding, new


def _eight_decoding_and_a_new_prompt(
    cost: Callable[[int], float],
) -> tuple[Scheduler, list[EngineSequence], EngineSequence]:
    scheduler, decoding, new = _decoding_and_new_prompts(cost, 8, [30])
    return scheduler, decoding, new[0]


def test_a_new_short_prompt_goes_alone_where_passes_cost_by_the_token() -> None:
    """Where a pass costs in proportion to its tokens (a CPU), a new short prompt gets a pass of its own
    ahead of 8 decodes: its first token comes a decode step sooner, and the decodes lose nothing."""
    scheduler, decoding, new = _eight_decoding_and_a_new_prompt(lambda tokens: 0.01 * tokens)
    plan = scheduler.schedule(_no_drafts)
    assert [(s.seq, s.num_new_tokens, s.decode) for s in plan.scheduled] == [(new, 30, False)]
    new.num_computed = 30
    new.output_ids.append(7)
    new.context.append(7)
    after = scheduler.schedule(_no_drafts)
    assert {s.seq.request_id for s in after.scheduled} == {s.request_id for s in [*decoding, new]}
    assert all(s.decode for s in after.scheduled), "the next pass decodes everyone, the new request too"


def test_a_new_short_prompt_goes_alone_where_each_decode_loses_less_than_it_saves() -> None:
    """A pass with a fixed cost besides its per-token cost (the CPU runner's measured shape): alone, the new
    prompt's first token comes T(38) - T(30) sooner and each decode waits T(30) + T(8) - T(38) longer, which
    is less; request for request it goes alone, though summed over 8 decodes the loss would be larger."""
    scheduler, _decoding, new = _eight_decoding_and_a_new_prompt(lambda tokens: 0.01 + 0.002 * tokens)
    plan = scheduler.schedule(_no_drafts)
    assert [(s.seq, s.num_new_tokens, s.decode) for s in plan.scheduled] == [(new, 30, False)]


def test_a_new_short_prompt_rides_with_the_decodes_where_passes_cost_the_same() -> None:
    """Where a pass costs about the same for 8 or 38 tokens (a GPU at small batches), a pass of its own
    would save the new prompt little and cost 8 requests a whole pass: it joins the decodes."""
    scheduler, decoding, new = _eight_decoding_and_a_new_prompt(lambda tokens: 0.03 + 0.0001 * tokens)
    plan = scheduler.schedule(_no_drafts)
    assert [s.seq for s in plan.scheduled] == [*decoding, new]
    assert plan.scheduled[-1].num_new_tokens == 30


def test_a_new_prompt_alone_leaves_a_page_for_every_decode() -> None:
    """The pass of its own admits a new prompt only while the pages the decodes need next stay free."""
    pool = PagePool(10, 4)
    scheduler = Scheduler(
        pool, max_running=16, max_batch_tokens=64, step_cost=lambda n: 0.01 * n, decode_step_slack=1.25
    )
    make = _Plain(pool)
    decoding = [make.sequence(3, emitted=1) for _ in range(4)]  # 4 positions each: one page apiece
    for seq in decoding:
        scheduler.add(seq)
    scheduler.schedule(_no_drafts)
    for seq in decoding:  # as after a step: the next token goes to position 4, on a second page
        seq.num_computed = len(seq.context)
        seq.context.append(7)
        seq.output_ids.append(7)
    new = make.sequence(12)  # 3 pages: of the 6 free, the decodes need 4
    scheduler.add(new)
    plan = scheduler.schedule(_no_drafts)
    assert [s.seq for s in plan.scheduled] == decoding and all(s.decode for s in plan.scheduled)
    assert list(scheduler.waiting) == [new], "no room beside the decodes' next pages: it waits"
