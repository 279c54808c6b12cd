"""CUDA-graph passes of the exl2 runner and the Triton paged attention they use, against eager passes."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from verispec.config import EngineConfig
from verispec.kv.pages import PagePool, PageTable
from verispec.runner.base import BatchEntry

from .conftest import paged_runner

pytestmark = pytest.mark.gpu

SMALL_KV = EngineConfig(kv_cache_memory=2.0, max_active_requests=8)
RELATIVE = 5e-3  # fp16 kernels on the same weights: attention by another kernel moves last bits only


def _attention_reference(
    q: torch.Tensor,  # [rows, heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: list[list[int]],
    positions: list[int],
    page: int,
) -> torch.Tensor:
    """Each row over keys 0 .. its position of its own pages, in float32 with the KV heads expanded."""
    _rows, heads, head_dim = q.shape
    group = heads // k_cache.shape[1]
    out = []
    for row, (table, position) in enumerate(zip(tables, positions, strict=True)):
        p = torch.arange(position + 1, device=q.device)
        slots = torch.tensor(table, device=q.device)[p // page] * page + p % page
        keys = k_cache[slots].float().repeat_interleave(group, 1)  # [L, heads, D]
        values = v_cache[slots].float().repeat_interleave(group, 1)
        weights = (torch.einsum("hd,lhd->hl", q[row].float(), keys) / math.sqrt(head_dim)).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", weights, values))
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(64, 8, 128), (32, 8, 64), (9, 3, 64), (8, 8, 128)])
def test_paged_kernel_matches_attention_over_gathered_keys(heads: int, kv_heads: int, head_dim: int) -> None:
    """Rows of decodes, of a verify's k+1 tokens and of contexts across many key tiles and pages, in
    scattered pages: the kernel equals float32 attention over the gathered keys to fp16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    from verispec.kernels.paged_attention import paged_decode_attention

    torch.manual_seed(0)
    page, num_pages = 16, 160
    k_cache = torch.randn(num_pages * page, kv_heads, head_dim, device="cuda").half()
    v_cache = torch.randn(num_pages * page, kv_heads, head_dim, device="cuda").half()
    order = torch.randperm(num_pages).tolist()
    sequences = [order[0:1], order[1:6], order[6:70], order[70:71]]
    rows = [(0, 0), (0, 15), (1, 64), (1, 65), (1, 66), (1, 67), (1, 68), (2, 1000), (2, 1023), (3, 3)]
    width = 80
    tables = torch.zeros(len(rows), width, dtype=torch.int32)
    for row, (sequence, _position) in enumerate(rows):
        tables[row, : len(sequences[sequence])] = torch.tensor(sequences[sequence])
    lengths = torch.tensor([position + 1 for _, position in rows], dtype=torch.int32)
    q = torch.randn(len(rows), heads, head_dim, device="cuda").half()
    got = paged_decode_attention(
        q, k_cache, v_cache, tables.cuda(), lengths.cuda(), 1 / math.sqrt(head_dim), page
    ).float()
    expected = _attention_reference(q, k_cache, v_cache, [sequences[s] for s, _ in rows], [p for _, p in rows], page)
    error = float((got - expected).abs().max())
    print(f"heads {heads}/{kv_heads} x {head_dim}: max abs error {error:.2e}")
    assert error < 2e-2 * float(expected.abs().max())


@pytest.fixture(scope="module", params=["verispec", "exllamav2"])
def pair(exl2: Any, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """A runner that replays CUDA graphs and one that launches eagerly, both with one GEMM everywhere."""
    from verispec.runner.exl2_graphs import GRAPH_BUCKETS

    graphs = paged_runner(exl2, SMALL_KV, request.param)
    assert sorted(graphs.graphs.captured) == list(GRAPH_BUCKETS), "every bucket captures"
    return graphs, paged_runner(exl2, SMALL_KV, request.param, False)


def _prefilled(runner: Any, prompts: list[list[int]], room: int) -> list[PageTable]:
    pool = PagePool(runner.kv.num_pages, runner.kv.page_size)
    tables = [PageTable() for _ in prompts]
    for i, (table, prompt) in enumerate(zip(tables, prompts, strict=True)):
        pool.reserve(table, len(prompt) + room)
        runner.forward([BatchEntry(i, prompt, 0, table.pages, 0)])  # a graph's replay where the runner has them
    return tables


def _close(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """The largest difference relative to the largest logit, and the share of rows whose argmax agrees
    or, on random weights, is a near-tie: the other path's pick is within twice that difference of the
    top logit (fp16 noise can only swap logits that close)."""
    noise = (actual - expected).abs().max()
    relative = float(noise / expected.abs().max())
    picked = expected.gather(-1, actual.argmax(-1, keepdim=True)).squeeze(-1)
    tie = picked >= expected.max(-1).values - 2 * noise
    return relative, float(((actual.argmax(-1) == expected.argmax(-1)) | tie).float().mean())


def _batches(prompts: list[list[int]], tables: list[PageTable]) -> list[list[BatchEntry]]:
    """Few-token passes that fill buckets exactly and that need padding: decodes, verifies of k+1,
    draft catch-up (several tokens, one logit), a 12-token prompt beside decodes and a 29-token one beside
    two (a whole chat prompt in one replay)."""
    n = [len(p) for p in prompts]

    def entry(i: int, tokens: list[int], start: int, logits: int) -> BatchEntry:
        return BatchEntry(i, tokens, start, tables[i].pages, logits)

    return [
        [entry(0, [500], n[0], 1)],  # 1 row
        [entry(i, [510 + i], n[i], 1) for i in range(3)],  # 3 rows
        [entry(1, [520, 521, 522, 523, 524], n[1], 5)],  # verify k+1 = 5
        [entry(0, [530, 531, 532, 533], n[0], 4), entry(2, [540, 541, 542], n[2], 3)],  # 7 rows: bucket 8
        [entry(i, [550 + i], n[i], 1) for i in range(5)] + [entry(5, prompts[5], 0, 1)],  # decodes + a prompt
        [entry(3, [560, 561, 562], n[3], 1), entry(4, [570], n[4], 1)],  # catch-up: logits on the last row
        [entry(0, [580], n[0], 1), entry(1, [581], n[1], 1), entry(6, prompts[6], 0, 1)],  # 31 rows: bucket 32
    ]


def test_graph_replays_score_as_eager_passes(pair: tuple[Any, Any]) -> None:
    """Every pass shape above (1 to 31 rows, padded and not) gives from a graph replay the logits the
    eager pass gives on the same weights and pages, to fp16 noise; the prompts prefilled first (17 to 64
    tokens) went through replays on one side and eager passes on the other."""
    graphs, eager = pair
    prompts = [list(range(100 + 9 * i, 100 + 9 * i + n)) for i, n in enumerate((40, 23, 64, 17, 31, 12, 29))]

    # The new prompts (sequences 5 and 6) take the pool's last pages, which no prefilled prompt holds.
    def fresh(last: int) -> list[PageTable]:
        return [PageTable([last - 1]), PageTable([last - 3, last - 2])]

    graph_tables = [*_prefilled(graphs, prompts[:5], 8), *fresh(graphs.kv.num_pages)]
    eager_tables = [*_prefilled(eager, prompts[:5], 8), *fresh(eager.kv.num_pages)]
    assert graphs.graphs is not None and eager.graphs is None
    worst = 0.0
    for graph_batch, eager_batch in zip(_batches(prompts, graph_tables), _batches(prompts, eager_tables), strict=True):
        assert graphs.graphs.accepts(graph_batch) is not None, "a few-token pass replays a graph"
        got = graphs.forward(graph_batch)
        expected = eager.forward(eager_batch)
        for a, b in zip(got, expected, strict=True):
            relative, agree = _close(a, b)
            worst = max(worst, relative)
            assert relative < RELATIVE and agree == 1.0
    print(f"graph replay vs eager pass: worst relative difference {worst:.2e}")


def test_a_sequence_grows_across_pages_under_one_capture(pair: tuple[Any, Any]) -> None:
    """48 decode steps of two sequences, fed the same tokens, crossing page boundaries: the replayed
    graph reads the new lengths and page tables every step and scores as the eager pass does."""
    graphs, eager = pair
    prompts = [list(range(700, 713)), list(range(800, 830))]
    graph_tables, eager_tables = _prefilled(graphs, prompts, 64), _prefilled(eager, prompts, 64)
    worst = 0.0
    for step in range(48):
        tokens = [900 + step, 950 + step]
        batches = [
            [BatchEntry(i, [tokens[i]], len(p) + step, tables[i].pages, 1) for i, p in enumerate(prompts)]
            for tables in (graph_tables, eager_tables)
        ]
        for a, b in zip(graphs.forward(batches[0]), eager.forward(batches[1]), strict=True):
            relative, agree = _close(a, b)
            worst = max(worst, relative)
            assert relative < RELATIVE and agree == 1.0, f"step {step}"
    print(f"48 graph decode steps vs eager: worst relative difference {worst:.2e}")


def test_padding_rows_leave_every_sequence_as_it_was(pair: tuple[Any, Any]) -> None:
    """A pass of 7 rows runs in the bucket of 8: its rows write their own 7 slots and the padding row
    writes only the spare page past the pool, so every other slot of every layer stays bit for bit."""
    graphs, _eager = pair
    pool = PagePool(graphs.kv.num_pages, graphs.kv.page_size)
    bystander, busy = PageTable(), PageTable()
    pool.reserve(bystander, 20)
    pool.reserve(busy, 40)
    graphs.forward([BatchEntry(0, list(range(300, 319)), 0, bystander.pages, 0)])
    graphs.forward([BatchEntry(1, list(range(30)), 0, busy.pages, 0)])
    caches = [*graphs.k_cache, *graphs.v_cache]
    before = [cache.clone() for cache in caches]
    verify = [BatchEntry(1, list(range(7)), 30, busy.pages, 7)]
    assert graphs.graphs.accepts(verify) == 8
    graphs.forward(verify)
    size = graphs.kv.page_size
    keep = torch.ones(caches[0].shape[0], dtype=torch.bool, device=caches[0].device)
    keep[[busy.pages[p // size] * size + p % size for p in range(30, 37)]] = False  # the pass's own slots
    keep[graphs.kv.num_pages * size :] = False  # the spare page
    for old, new in zip(before, caches, strict=True):  # as bits: slots never written may hold NaN patterns
        assert torch.equal(old[keep].view(torch.int16), new[keep].view(torch.int16))


def test_prompts_replay_graphs_and_only_passes_past_the_largest_bucket_launch_eagerly(pair: tuple[Any, Any]) -> None:
    """A whole prompt of up to 64 tokens replays the bucket that holds it; more rows than the largest bucket
    launch eagerly."""
    from verispec.runner.exl2_graphs import GRAPH_BUCKETS

    graphs, _eager = pair
    table = PageTable(list(range(12)))
    assert graphs.graphs.accepts([BatchEntry(0, [1] * 40, 0, table.pages, 1)]) == 48
    assert graphs.graphs.accepts([BatchEntry(0, [1] * GRAPH_BUCKETS[-1], 0, table.pages, 1)]) == GRAPH_BUCKETS[-1]
    assert graphs.graphs.accepts([BatchEntry(0, [1] * (GRAPH_BUCKETS[-1] + 1), 0, table.pages, 1)]) is None
    many = [BatchEntry(i, [1] * 4, 0, table.pages, 1) for i in range(GRAPH_BUCKETS[-1] // 4 + 1)]
    assert graphs.graphs.accepts(many) is None
    assert graphs.graphs.largest == GRAPH_BUCKETS[-1]


def test_a_pass_returns_before_the_device_has_run_it(pair: tuple[Any, Any]) -> None:
    """The runner is asynchronous: a pass only queues its work, so the engine hands the step before's tokens
    out while the device runs it. Behind a second of work already queued, forward returns with that work
    still running for a replay and for an eager pass (past the largest bucket, or with no graphs), each with
    a prefill chunk whose rows but the last want no logits (the index of the rows that do, the embeddings
    and the attention plan go up from host memory behind the queue, not after it)."""
    from verispec.runner.exl2_graphs import GRAPH_BUCKETS

    graphs, eager = pair
    cases = [
        ("replay", graphs, 20),
        ("eager past the largest bucket", graphs, GRAPH_BUCKETS[-1] + 6),
        ("eager", eager, 20),
    ]
    for name, runner, tokens in cases:
        pool = PagePool(runner.kv.num_pages, runner.kv.page_size)
        table = PageTable()
        pool.reserve(table, 2 * tokens)
        chunks = [[BatchEntry(0, list(range(200, 200 + tokens)), start, table.pages, 1)] for start in (0, tokens)]
        runner.forward(chunks[0])  # warm: any first-call work of this shape is done
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(2_000_000_000)  # type: ignore[no-untyped-call]  # ~1 s of GPU clock; torch leaves it untyped
        logits = runner.forward(chunks[1])
        still_running = not stream.query()
        torch.cuda.synchronize()
        assert still_running, f"{name}: forward waited for the work queued before it"
        assert logits[0].shape[0] == 1 and bool(torch.isfinite(logits[0]).all())


def test_calibration_times_every_bucket_step_and_prices_the_eager_pass_above_the_largest(
    pair: tuple[Any, Any],
) -> None:
    """Start-up calibration over a runner with graphs times each captured bucket and one row past it, and the
    full budget: one row past the largest bucket launches eagerly, dearer than the largest replay, so the
    scheduler's prices step up there instead of following a line drawn from the replays."""
    from verispec.loader import calibrate
    from verispec.spec.adaptive import CostModel

    graphs, _eager = pair
    costs = CostModel()
    calibrate(graphs, costs, 9, SMALL_KV.max_batch_tokens)
    largest = graphs.graphs.largest
    steps = {n for bucket in graphs.cost_breaks for n in (bucket, bucket + 1)}
    assert steps | {SMALL_KV.max_batch_tokens} <= set(costs.verify_s)
    print(f"calibrated ms: { {n: round(1000 * s, 2) for n, s in sorted(costs.verify_s.items())} }")
    assert costs.verify_s[largest + 1] > costs.verify_s[largest]


def test_a_bucket_that_cannot_be_captured_passes_to_the_next(exl2: Any) -> None:
    """A capture that fails (here: a host sync inside the 3-row pass, as a kernel that cannot be captured
    would) is logged and dropped; the GPU gets its default stream back, the next buckets still capture, and
    a 3-row pass replays the 4-row graph with the eager pass's logits."""
    from verispec.runner.exl2_graphs import DecodeGraphs

    runner = paged_runner(exl2, SMALL_KV, "exllamav2", cuda_graphs=False)
    eager = paged_runner(exl2, SMALL_KV, "exllamav2", cuda_graphs=False)
    run_modules = runner.run_modules

    def syncing(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] == 3:
            float(x.sum())  # waits for the GPU: not allowed while capturing
        out: torch.Tensor = run_modules(x, *args, **kwargs)
        return out

    runner.run_modules = syncing
    runner.graphs = DecodeGraphs(runner, "exllamav2")
    assert 3 not in runner.graphs.captured and {1, 2, 4, 5} <= set(runner.graphs.captured)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    runner.run_modules = run_modules
    prompts = [list(range(100 + 9 * i, 121 + 9 * i)) for i in range(3)]
    tables = [_prefilled(r, prompts, 4) for r in (runner, eager)]
    steps = [[BatchEntry(i, [600 + i], 21, t[i].pages, 1) for i in range(3)] for t in tables]
    assert runner.graphs.accepts(steps[0]) == 4
    for a, b in zip(runner.forward(steps[0]), eager.forward(steps[1]), strict=True):
        relative, agree = _close(a, b)
        assert relative < RELATIVE and agree == 1.0


def test_graphs_on_a_two_gpu_split_score_as_eager_passes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Llama-8B shape split over two GPUs: one graph per GPU, the hidden state hopping between them;
    decode and verify replays give the eager pass's logits, and a draft placed on GPU 1 alone captures
    on GPU 1."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    from verispec.backends.exl2 import Exl2Backend
    from verispec.tools.synth import synth

    path = tmp_path_factory.mktemp("llama-8b-exl2-graphs")
    synth("llama-8b", path, bits=4, seed=3, device="cuda")
    split = Exl2Backend(path, "two-gpus", gpu_split=(3.0, 16.0), max_context_length=2048)
    graphs, eager = paged_runner(split, SMALL_KV, "auto"), paged_runner(split, SMALL_KV, "auto", False)
    assert len(graphs.graphs.segments) == 2
    prompts = [list(range(200, 240)), list(range(300, 323))]
    tables = [_prefilled(graphs, prompts, 8), _prefilled(eager, prompts, 8)]
    for tokens in ([700], [701, 702, 703, 704, 705]):  # a decode step, then a verify of k+1 = 5
        batches = [
            [BatchEntry(i, tokens, len(prompt), t[i].pages, len(tokens)) for i, prompt in enumerate(prompts)]
            for t in tables
        ]
        for a, b in zip(graphs.forward(batches[0]), eager.forward(batches[1]), strict=True):
            relative, agree = _close(a, b)
            assert relative < RELATIVE and agree == 1.0
    tiny = tmp_path_factory.mktemp("tiny-on-gpu-1")
    synth("tiny", tiny, bits=4, seed=1, device="cuda")
    draft = Exl2Backend(tiny, "draft-on-gpu-1", gpu_split=(0.0, 4.0))
    assert draft.info.devices == ("cuda:1",)
    on_one = paged_runner(draft, SMALL_KV, "auto")
    assert [s.device for s in on_one.graphs.segments] == [1] and on_one.graphs.captured


def test_closing_a_graphed_runner_gives_its_memory_back_with_the_heap_frozen(exl2: Any) -> None:
    """A runner and its CUDA graphs refer to each other. The server freezes start-up's objects, so the
    collector never breaks that cycle: close() must drop the graphs and the pages, and then the pair goes
    by reference counting alone, its memory with it (allocated bytes back to the figure before)."""
    import gc
    import weakref

    paged_runner(exl2, SMALL_KV, "verispec").close()  # one-time allocations (kernels' buffers) made first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    runner = paged_runner(exl2, SMALL_KV, "verispec")
    assert runner.graphs is not None and runner.graphs.captured
    held = torch.cuda.memory_allocated() - before
    gone = weakref.ref(runner)
    gc.collect()
    gc.freeze()
    try:
        runner.close()
        del runner
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated() - before
    finally:
        gc.unfreeze()
    print(f"runner held {held / 2**20:.0f} MiB; {left / 2**20:.1f} MiB left after close")
    assert gone() is None, "nothing else holds the runner"
    assert held > 2**20 and left <= max(0.01 * held, 2**20)
