"""Start-up wiring of the model side: config -> backend -> drafters -> engine, with progress logs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import structlog

from verispec.backends.base import Backend, BackendInfo
from verispec.config import Config, ModelConfig
from verispec.engine.async_engine import AsyncEngine
from verispec.engine.core import EngineCore
from verispec.engine.speculative import StepObserver
from verispec.errors import ConfigError, ModelLoadError
from verispec.kernels import MAX_Q4_ROWS
from verispec.kv.pages import PageTable, pages_for
from verispec.models import gguf_source, resolve_model
from verispec.request import SamplingParams, SpeculationMode
from verispec.runner import build_runner
from verispec.runner.base import ModelRunner, scratch_entry
from verispec.sampling import Sampler
from verispec.spec.adaptive import CostModel
from verispec.spec.drafters import Drafter, ModelDrafter, NgramDrafter
from verispec.spec.verify import Proposal, verify
from verispec.tokenizer import Tokenizer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LoadedModels:
    """Everything the API needs once loading is done."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    target: BackendInfo
    draft: BackendInfo | None
    auto_drafter: str


def load_backend(
    model: ModelConfig, spec: str, gpu_split: tuple[float, ...] | None = None
) -> tuple[Backend, Tokenizer]:
    """Loads one model (target or draft) and its tokenizer; `gpu_split` overrides the target's split."""
    model_dir = resolve_model(spec, model.cache_dir)
    tokenizer = Tokenizer(model_dir)
    if model.backend == "torch_ref":
        from verispec.backends.torch_ref import TorchRefBackend

        gguf = gguf_source(spec, model.cache_dir)
        backend = TorchRefBackend(
            model_dir, spec, model.device, model.dtype, model.max_context_length, model.weights, gguf
        )
        tokenizer.add_eos_token_ids(backend.generation_eos)
        return backend, tokenizer
    if model.backend == "exl2":
        from verispec.backends.exl2 import Exl2Backend

        split = model.gpu_split if gpu_split is None else gpu_split
        exl2 = Exl2Backend(
            model_dir,
            spec,
            split,
            model.reserve_gb,
            model.cache_mode,
            model.max_context_length,
            model.exl2_gemm,
            model.cuda_graphs,
        )
        return exl2, tokenizer
    raise ConfigError("--backend", f"backend {model.backend!r} is not available in this build")


def load(config: Config, observer: StepObserver | None = None) -> LoadedModels:
    """Loads target and draft on a new engine thread, which then runs the engine loop.

    One thread does all torch work: loading, calibration and every step. `observer` (metrics, a
    benchmark's counters) is told about every step.
    """
    loaded: Future[LoadedModels] = Future()

    def engine_thread() -> None:
        try:
            models = _load(config, observer)
        except BaseException as exc:
            loaded.set_exception(exc)
            return
        loaded.set_result(models)
        models.engine.core.run()

    threading.Thread(target=engine_thread, name="verispec-engine", daemon=True).start()
    return loaded.result()


def _load(config: Config, observer: StepObserver | None) -> LoadedModels:
    started = time.monotonic()
    target, tokenizer = load_backend(config.model, config.model.model)
    draft = None
    if config.spec.draft_model:
        draft, draft_tokenizer = load_backend(config.model, config.spec.draft_model, config.spec.draft_gpu_split)
        check_same_vocabulary(tokenizer, draft_tokenizer, config.spec.draft_model)
    models = build_engine(config, target, tokenizer, draft, observer)
    log.info("engine.ready", seconds=round(time.monotonic() - started, 2), auto_drafter=models.auto_drafter)
    return models


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    if not target.same_vocabulary(draft):
        raise ModelLoadError(
            f"draft model {draft_name!r} does not share the target's vocabulary "
            f"(target {target.vocab_size} tokens, draft {draft.vocab_size}); "
            "speculative decoding needs identical token ids"
        )


def start_engine(
    config: Config,
    target: Backend,
    tokenizer: Tokenizer,
    draft: Backend | None = None,
    observer: StepObserver | None = None,
) -> LoadedModels:
    """build_engine, with the loop on a thread of its own (tests)."""
    models = build_engine(config, target, tokenizer, draft, observer)
    models.engine.core.start()
    return models


def build_engine(
    config: Config,
    target: Backend,
    tokenizer: Tokenizer,
    draft: Backend | None = None,
    observer: StepObserver | None = None,
) -> LoadedModels:
    """Builds runners, drafters and the engine over loaded models and calibrates step costs."""
    runner = build_runner(target, config.engine)
    drafters: dict[SpeculationMode, Drafter] = {
        SpeculationMode.NGRAM: NgramDrafter(config.spec.ngram_min, config.spec.ngram_max)
    }
    costs = CostModel()
    warm_up(runner, config.engine.max_active_requests, config.engine.max_batch_tokens)
    calibrate(runner, costs, config.spec.max_num_draft_tokens + 1, config.engine.max_batch_tokens)
    if draft is not None:
        target_positions = runner.kv.num_pages * runner.kv.page_size
        draft_runner = build_runner(draft, config.engine, target.info.max_context_length, target_positions)
        drafters[SpeculationMode.DRAFT_MODEL] = ModelDrafter(draft_runner)
        warm_up(draft_runner, config.engine.max_active_requests, config.engine.max_batch_tokens)
        calibrate_draft(draft_runner, costs)
    core = EngineCore(runner, tokenizer, drafters, config.engine, costs, observer)
    auto = "draft_model" if draft is not None else "ngram"
    return LoadedModels(AsyncEngine(core), tokenizer, target.info, draft.info if draft else None, auto)


WARM_UP_CONTEXT = 16  # positions each warm-up sequence holds before its decode passes


def warm_up(runner: ModelRunner, max_running: int, max_batch_tokens: int) -> None:
    """On CUDA, one untimed pass over each decode batch shape the engine meets first (1, 2, 4 ... up to
    max_running sequences of one token), over a verify-shaped pass of 64 rows and over a full token budget
    of prefill (the 4-bit GEMMs compile and choose their kernels then, not in a request).

    The first passes over new shapes cost more than later ones (the caching allocator grows, kernels
    load on first use); without this the first requests pay it, and the early step costs that AUTO
    and the scheduler price with are skewed. On the CPU a first pass costs what later ones do, so
    nothing runs there.
    """
    if not any(device.startswith("cuda") for device in runner.info.devices):
        return
    started = time.perf_counter()
    pool = runner.kv.new_pool()
    fit = pool.num_pages // pages_for(WARM_UP_CONTEXT + 1, pool.page_size)  # sequences the pool holds at once
    sizes = [b for b in (2**i for i in range(max_running.bit_length())) if b <= min(max_running, fit)]
    tables = [PageTable() for _ in range(max(sizes, default=0))]
    context = list(range(WARM_UP_CONTEXT))
    try:
        if tables:
            runner.forward([scratch_entry(pool, t, context, 0, 1, -1 - i) for i, t in enumerate(tables)])
        for size in sizes:
            runner.forward(
                [scratch_entry(pool, t, [1], WARM_UP_CONTEXT, 1, -1 - i) for i, t in enumerate(tables[:size])]
            )
        for table in tables:
            pool.release(table)
        # Verify-shaped: the most rows the exl2 runner's 4-bit GEMM takes, logits on every row.
        rows = min(MAX_Q4_ROWS, pool.capacity_tokens)
        runner.forward([scratch_entry(pool, PageTable(), list(range(rows)), 0, rows)])
        prefill = min(max_batch_tokens, pool.capacity_tokens)
        runner.forward([scratch_entry(pool, PageTable(), list(range(prefill)), 0, 1)])
    finally:
        for i in range(len(tables) or 1):
            runner.free(-1 - i)
    log.info(
        "engine.warmed_up", batch_sizes=sizes, prefill_tokens=prefill, seconds=round(time.perf_counter() - started, 2)
    )


def calibrate_draft(draft: ModelRunner, costs: CostModel, repeats: int = 5) -> None:
    """Measures one draft step so AUTO prices draft-model speculation before its first request."""
    pool, table = draft.kv.new_pool(), PageTable()
    try:
        draft.forward([scratch_entry(pool, table, list(range(16)), 0, 1)])
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            # A draft step ends with its token on the host.
            int(draft.forward([scratch_entry(pool, table, [16], 16, 1)])[0][0].argmax())
            best = min(best, time.perf_counter() - start)
        costs.record_draft("draft_model", 1, best)
    finally:
        draft.free(-1)
    log.info("engine.calibrated_draft", step_ms=round(best * 1000, 2))


def calibrate(runner: ModelRunner, costs: CostModel, max_tokens: int, max_batch_tokens: int, repeats: int = 3) -> None:
    """Measures a pass over 1..max_tokens tokens (and a few larger, as batches reach) so AUTO can price
    k from the first request, and the scheduler can size prefill chunks.

    It times what a live step times (the forward pass and verification, which also waits for the
    device), so calibrated and live figures mix in one average without bias. Where the runner's cost
    steps up past a pass size (its CUDA graphs' buckets), both sides of each step and the full budget are
    measured too: interpolation across a step would price the passes past it too low.
    """
    pool, table = runner.kv.new_pool(), PageTable()
    sampler = Sampler(SamplingParams(), runner.info.vocab_size, [])
    larger = {n for n in (16, 32, 64) if n <= max_batch_tokens}
    for step in runner.cost_breaks:
        larger |= {n for n in (step, step + 1, max_batch_tokens) if step <= n <= max_batch_tokens}
    sizes = [*range(1, max_tokens + 1), *sorted(n for n in larger if n > max_tokens)]
    sizes = [n for n in sizes if 16 + n <= pool.capacity_tokens]  # a tiny test pool measures what fits
    try:
        runner.forward([scratch_entry(pool, table, list(range(16)), 0, 1)])  # also warms the kernels
        for n in sizes:
            best = float("inf")
            for _ in range(repeats if n <= max_tokens else 1):
                start = time.perf_counter()
                logits = runner.forward([scratch_entry(pool, table, list(range(n)), 16, n)])[0]
                verify(sampler, logits, Proposal(list(range(1, n))), 0)
                best = min(best, time.perf_counter() - start)
            costs.record_verify(n, best)
    finally:
        runner.free(-1)
    log.info("engine.calibrated", verify_ms={n: round(s * 1000, 2) for n, s in costs.verify_s.items()})
