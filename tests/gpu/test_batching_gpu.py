"""The paged ExLlamaV2 runner on a GPU: ragged batches against the torch reference, batch vs solo, pages."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from verispec.config import EngineConfig
from verispec.engine.core import EngineCore, run_to_completion
from verispec.kv.pages import PagePool, PageTable
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
from verispec.runner.base import BatchEntry
from verispec.spec.drafters import ModelDrafter, NgramDrafter
from verispec.tokenizer import Tokenizer

from .conftest import paged_runner

pytestmark = pytest.mark.gpu

RELATIVE_TOLERANCE = 0.02  # fp16 kernels vs the fp32 reference on the same weights (as test_exl2.py)
SMALL_KV = EngineConfig(kv_cache_memory=2.0, max_active_requests=8)

PROMPTS = [list(range(300 + 7 * i, 300 + 7 * i + n)) for i, n in enumerate((40, 9, 23, 64, 3, 17, 31, 12))]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    expected = expected.to(actual.device)
    relative = float((actual - expected).abs().max() / expected.abs().max())
    agree = float((actual.argmax(-1) == expected.argmax(-1)).float().mean())
    return relative, agree


@pytest.fixture(
    scope="module", params=[("verispec", True), ("exllamav2", True), ("verispec", False), ("exllamav2", False)]
)
def runner(exl2: Any, request: pytest.FixtureRequest) -> Any:
    """The paged runner with each 4-bit GEMM on every batch (the Triton kernel, ExLlamaV2's own), with
    few-token passes replayed as CUDA graphs and launched eagerly."""
    gemm, cuda_graphs = request.param
    made = paged_runner(exl2, SMALL_KV, gemm, cuda_graphs)
    assert bool(made.q4_layers) == (gemm == "verispec")
    assert (made.graphs is not None) == cuda_graphs
    return made


def test_auto_gemm_measures_both_paths_and_keeps_the_faster(exl2: Any) -> None:
    """By default the runner captures every row bucket with each GEMM, times both replays and keeps the
    faster; without graphs it times eager passes of 1 .. 64 sequences the same way. With every bucket
    captured no pass of up to 64 rows launches eagerly, and none is timed."""
    from verispec.runner.exl2 import Exl2Runner
    from verispec.runner.exl2_graphs import GRAPH_BUCKETS

    made = build_runner(exl2, SMALL_KV)
    assert isinstance(made, Exl2Runner), "the exl2 backend gets the paged runner"
    assert made.q4_layers, "the uniform 4-bit model is covered by the Triton GEMM"
    assert made.graphs is not None, "CUDA graphs are on by default"
    assert set(made.graphs.calibration) == {str(rows) for rows in GRAPH_BUCKETS}
    for rows, times in made.graphs.calibration.items():
        assert made.graphs.captured[int(rows)].use_q4 == (times["verispec"] < times["exllamav2"])
    print(f"replay ms by rows: {made.graphs.calibration}")
    assert made.gemm_calibration == {}
    eager = paged_runner(exl2, SMALL_KV, "auto", cuda_graphs=False)
    assert set(eager.gemm_calibration) == {str(rows) for rows in (1, 2, 4, 8, 16, 32, 64)}
    for rows, times in eager.gemm_calibration.items():
        assert eager.q4_rows[int(rows)] == (times["verispec"] < times["exllamav2"])
    print(f"eager pass ms by rows: {eager.gemm_calibration}")


def test_ragged_batch_matches_the_reference(runner: Any, reference: Any) -> None:
    """One pass mixing whole prompts, a chunk continuing an earlier chunk and a k+1 verify step gives,
    per sequence, the logits the torch reference gives for that sequence alone."""
    pool = PagePool(runner.kv.num_pages, runner.kv.page_size)
    tables = [PageTable() for _ in PROMPTS[:4]]
    for table, prompt in zip(tables, PROMPTS, strict=False):
        pool.reserve(table, len(prompt) + 8)
    first = [BatchEntry(i, PROMPTS[i][:5], 0, tables[i].pages, 0) for i in (1, 3)]
    runner.forward(first)
    batch = [
        BatchEntry(0, PROMPTS[0], 0, tables[0].pages, len(PROMPTS[0])),
        BatchEntry(1, PROMPTS[1][5:], 5, tables[1].pages, len(PROMPTS[1]) - 5),
        BatchEntry(2, PROMPTS[2], 0, tables[2].pages, 1),
        BatchEntry(3, PROMPTS[3][5:], 5, tables[3].pages, 3),
    ]
    got = runner.forward(batch)
    for entry, logits in zip(batch, got, strict=True):
        full = PROMPTS[entry.seq_id]
        expected = reference.forward(reference.new_cache(), full, entry.num_logits)
        relative, agree = _close(logits, expected)
        print(f"sequence {entry.seq_id}: relative {relative:.5f}, argmax agreement {agree:.3f}")
        assert relative < RELATIVE_TOLERANCE and agree >= 0.9
    # A verify pass of k+1 = 5 tokens after the prompt of sequence 2.
    drafts = [401, 402, 403, 404, 405]
    verify = runner.forward([BatchEntry(2, drafts, len(PROMPTS[2]), tables[2].pages, 5)])[0]
    expected = reference.forward(reference.new_cache(), [*PROMPTS[2], *drafts], 5)
    relative, agree = _close(verify, expected)
    print(f"verify k+1=5: relative {relative:.5f}, argmax agreement {agree:.3f}")
    assert relative < RELATIVE_TOLERANCE and agree >= 0.8


def test_a_sequence_in_a_batch_scores_as_it_does_alone(runner: Any) -> None:
    """Batch of 8 decode steps vs each alone: the same fp16 kernels on more rows, agreeing to fp16 noise."""
    pool = PagePool(runner.kv.num_pages, runner.kv.page_size)
    tables = [PageTable() for _ in PROMPTS]
    for i, (table, prompt) in enumerate(zip(tables, PROMPTS, strict=True)):
        pool.reserve(table, len(prompt) + 1)
        runner.forward([BatchEntry(i, prompt, 0, table.pages, 0)])
    steps = [BatchEntry(i, [500 + i], len(p), tables[i].pages, 1) for i, p in enumerate(PROMPTS)]
    batched = runner.forward(steps)
    worst = 0.0
    for entry, logits in zip(steps, batched, strict=True):
        alone = runner.forward([entry])[0]
        relative, agree = _close(logits, alone)
        worst = max(worst, relative)
        assert relative < 5e-3 and agree == 1.0
    print(f"batch of 8 vs solo: worst relative difference {worst:.2e}")


def _request(i: int, mode: SpeculationMode, n: int = 24) -> Request:
    return Request(
        request_id=f"g{i}",
        prompt_token_ids=tuple(PROMPTS[i]),
        sampling=SamplingParams(),
        stopping=StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
        response=ResponseOptions(),
        speculation=SpeculationParams(mode, 3),
    )


def test_engine_batches_on_gpu_and_returns_every_page(exl2: Any, runner: Any, tiny_dir: Path) -> None:
    """Eight mixed requests (OFF, n-gram, self-draft; one cancelled) through one engine: one final message
    each, greedy tokens as served alone (fp16: near-ties may flip, so the agreement is printed and held
    to most tokens), and a page pool as full at the end as at the start."""
    drafters: dict[SpeculationMode, Any] = {
        SpeculationMode.NGRAM: NgramDrafter(1, 3),
        SpeculationMode.DRAFT_MODEL: ModelDrafter(build_runner(exl2, SMALL_KV)),
    }
    core = EngineCore(runner, Tokenizer(tiny_dir), drafters, SMALL_KV)
    core.start()
    modes = [SpeculationMode.OFF, SpeculationMode.NGRAM, SpeculationMode.DRAFT_MODEL, SpeculationMode.AUTO]
    requests = [_request(i, modes[i % 4]) for i in range(len(PROMPTS))]
    try:
        solo = {r.request_id: [t for o in run_to_completion(core, r) for t in o.token_ids] for r in requests}
        results: dict[str, list[StepOutput]] = {}

        def run(request: Request) -> None:
            results[request.request_id] = run_to_completion(core, request)

        threads = [threading.Thread(target=run, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        core.abort("g5")
        for thread in threads:
            thread.join()
        agree = total = 0
        for request in requests:
            outs = results[request.request_id]
            assert sum(1 for o in outs if o.finished) == 1
            got = [t for o in outs for t in o.token_ids]
            if outs[-1].finish_reason is FinishReason.CANCELLED:
                continue
            total += len(got)
            agree += next(
                (i for i, (a, b) in enumerate(zip(got, solo[request.request_id], strict=True)) if a != b), len(got)
            )
        print(f"batched vs solo greedy on GPU: {agree}/{total} tokens before the first divergence")
        assert agree >= 0.9 * total
        assert core.pool.num_used == 0
        assert core.stats().batch_size >= 1
    finally:
        core.stop(10)


def test_warm_up_runs_every_decode_shape_and_leaves_no_trace(runner: Any) -> None:
    """The CUDA warm-up at engine build (decode batches of 1, 2, 4 ... sequences, a full token budget of
    prefill) leaves a sequence's logits as they were, to fp16 noise: it writes only pages that are
    rewritten before use."""
    from verispec.loader import warm_up

    pool = runner.kv.new_pool()
    table = PageTable()
    pool.reserve(table, len(PROMPTS[0]) + 1)
    before = runner.forward([BatchEntry(0, PROMPTS[0], 0, table.pages, 1)])[0]
    warm_up(runner, SMALL_KV.max_active_requests, SMALL_KV.max_batch_tokens)
    after = runner.forward([BatchEntry(0, PROMPTS[0], 0, table.pages, 1)])[0]
    relative, agree = _close(after, before)  # kernels may pick other fp16 algorithms once warm
    print(f"after the warm-up: relative {relative:.2e}, argmax agreement {agree:.3f}")
    assert relative < 0.005 and agree == 1.0, "fp16 noise is ~1e-3; an overwritten page gives O(1)"
