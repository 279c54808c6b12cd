"""`verispec bench exl2`: the ExLlamaV2 backend on a GPU, measured against ExLlamaV2's own generator.

For a target (e.g. a synthetic Llama-70B-shape EXL2) and a draft (e.g. Llama-1B shape) it prints JSON
with VRAM and load time per model, decode tokens/s driven directly and through the engine, the same
for ExLlamaV2DynamicGenerator (unpaged) with and without the draft, the cost of one target pass over
1..9 tokens, the draft step cost, and speculative speedups at synthetic acceptance rates (a replay
drafter proposes the target's own recorded greedy continuation with injected misses).

Its flags are defined in `verispec.tools.bench`: this module imports torch at top level.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

PROMPT_TOKENS = [1, *range(1000, 1063)]  # 64 tokens
K_MAX = {"off": 0, "auto": 8}  # num_draft_tokens per mode: AUTO chooses k in 0..8
# The paged runner's paths, timed in one run: (name, --exl2-gemm, --cuda-graphs).
RUNNER_PATHS = (("exllamav2", "exllamav2", False), ("verispec", "verispec", False), ("cuda_graphs", "auto", True))


def _progress(message: str) -> None:
    print(f"[bench exl2] {message}", file=sys.stderr, flush=True)


def _used_gib_per_gpu() -> list[float]:
    """Device memory in use on each GPU (all processes, CUDA context included), GiB."""
    torch.cuda.synchronize()
    return [
        (total - free) / 2**30 for free, total in (torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count()))
    ]


def _used_gib() -> float:
    return sum(_used_gib_per_gpu())


class ReplayDrafter:
    """Proposes the target's recorded greedy continuation, each token replaced by a miss with
    probability 1 - acceptance: synthetic acceptance, for pricing speculation on random weights."""

    name = "replay"
    misses_carry_over = True  # stands in for a draft model

    def __init__(self, reference: Sequence[int], acceptance: float, vocab_size: int, seed: int = 0) -> None:
        self.reference = list(reference)
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def start(self) -> object:
        return None

    def propose(self, tasks: Sequence[Any]) -> list[Any]:
        from verispec.spec.verify import Proposal

        proposals = []
        for task in tasks:
            drafts = []
            for token in self.reference[len(task.context) : len(task.context) + task.k]:
                miss = self.rng.random() >= self.acceptance
                drafts.append((token + 1) % self.vocab_size if miss else token)
            proposals.append(Proposal(drafts))
        return proposals

    def accept(self, state: object, valid_length: int) -> None:
        return None

    def free(self, state: object) -> None:
        return None

    def close(self) -> None:
        return None


def _request(mode: str, k: int, n: int, request_id: str) -> Any:
    from verispec.request import (
        Request,
        ResponseOptions,
        SamplingParams,
        SpeculationMode,
        SpeculationParams,
        StoppingCriteria,
    )

    return Request(
        request_id=request_id,
        prompt_token_ids=tuple(PROMPT_TOKENS),
        sampling=SamplingParams(),
        stopping=StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
        response=ResponseOptions(),
        speculation=SpeculationParams(SpeculationMode(mode), k),
    )


class EngineRun(NamedTuple):
    tokens_per_s: float  # n tokens over the whole request, its prompt's prefill included
    decode_tokens_per_s: float  # the tokens after the first over the time from the first to the last
    token_ids: list[int]
    spec: Any  # the final output's speculation stats


def _engine_run(core: Any, mode: str, k: int, n: int, label: str) -> EngineRun:
    from verispec.engine.core import run_to_completion

    arrived: list[float] = []
    start = time.perf_counter()
    outputs = run_to_completion(
        core, _request(mode, k, n, label), observe=lambda _: arrived.append(time.perf_counter())
    )
    later = n - len(outputs[0].token_ids)
    return EngineRun(
        tokens_per_s=n / (arrived[-1] - start),
        decode_tokens_per_s=later / (arrived[-1] - arrived[0]) if later and arrived[-1] > arrived[0] else 0.0,
        token_ids=[t for o in outputs for t in o.token_ids],
        spec=outputs[-1].spec,
    )


def _weight_bytes_per_pass(model_dir: str) -> int:
    """Bytes of weights a pass reads: the checkpoint's tensors but the embedding table (one row a token)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if not key.endswith("embed_tokens.weight"):
                    piece = handle.get_slice(key)
                    total += math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
    return total


_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2, "I64": 8, "U8": 1, "I8": 1}


def _direct(backend: Any, n: int) -> float:
    cache = backend.new_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    logits = backend.forward(cache, PROMPT_TOKENS, 1)
    for _ in range(n - 1):
        logits = backend.forward(cache, [int(logits[0].argmax())], 1)
    torch.cuda.synchronize()
    backend.free(cache)
    return n / (time.perf_counter() - start)


def _pass_cost(backend: Any, tokens: int, repeats: int = 20) -> float:
    cache = backend.new_cache()
    backend.forward(cache, PROMPT_TOKENS, 1)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        backend.forward(cache, list(range(2000, 2000 + tokens)), tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        backend.rollback(cache, len(PROMPT_TOKENS))
    backend.free(cache)
    return statistics.median(times)


def _pass_figures(target: Any, draft: Any, n: int) -> dict[str, Any]:
    """ExLlamaV2's own forward (direct decode, passes of 1..9 tokens, the draft step), then the paged
    runner's passes with each 4-bit GEMM, all in this run."""
    _progress("direct decode and pass costs")
    _direct(target, n)  # warm-up
    result: dict[str, Any] = {"direct_tokens_per_s": round(_direct(target, n), 2)}
    one = _pass_cost(target, 1)
    result["verify_pass_ms"] = {str(t): round(1000 * _pass_cost(target, t), 2) for t in range(1, 10)}
    result["verify_pass_relative"] = {t: round(ms / (1000 * one), 2) for t, ms in result["verify_pass_ms"].items()}
    result["draft_step_ms"] = round(1000 * _pass_cost(draft, 1), 2)
    _progress("paged runner passes: each 4-bit GEMM launched eagerly, then replayed as CUDA graphs")
    passes: dict[str, dict[str, Any]] = {"target": {}, "draft": {}}
    for role, model in (("target", target), ("draft", draft)):
        for name, gemm, graphs in RUNNER_PATHS:
            passes[role][name] = _runner_pass_costs(model, gemm, graphs)
            _progress(f"{role} {name}: {json.dumps(passes[role][name])}")
            torch.cuda.empty_cache()
    result["runner_passes"] = passes
    torch.cuda.empty_cache()
    return result


def _runner_pass_costs(backend: Any, gemm: str, cuda_graphs: bool, repeats: int = 10) -> dict[str, Any]:
    """One sequence's verify pass of 1..9 tokens and decode batches of 1..32 sequences through the paged
    runner on one path (medians, ms), and each relative to the 1-token pass."""
    from verispec.config import EngineConfig
    from verispec.kv.pages import PageTable
    from verispec.runner.base import median_seconds, scratch_entry
    from verispec.runner.exl2 import Exl2Runner

    engine = EngineConfig(kv_cache_memory=4.0, max_active_requests=32)
    runner = Exl2Runner(
        backend, engine.kv_page_size, engine.kv_cache_memory, 32 * 1024, gemm=gemm, cuda_graphs=cuda_graphs
    )
    pool = runner.kv.new_pool()
    tables = [PageTable() for _ in range(32)]
    for i, table in enumerate(tables):
        runner.forward([scratch_entry(pool, table, PROMPT_TOKENS, 0, 1, -1 - i)])
    context = len(PROMPT_TOKENS)

    def timed(batch: list[Any]) -> float:
        return 1000 * median_seconds(partial(runner.forward, batch), repeats)

    verify = {}
    for tokens in range(1, 10):
        pool.reserve(tables[0], context + tokens)
        verify[str(tokens)] = round(timed([scratch_entry(pool, tables[0], [7] * tokens, context, tokens, -1)]), 2)
    decode = {}
    for size in (1, 2, 4, 8, 16, 32):
        batch = [scratch_entry(pool, tables[i], [7], context, 1, -1 - i) for i in range(size)]
        decode[str(size)] = round(timed(batch), 2)
    replay_ms = runner.graphs.calibration if runner.graphs is not None else {}
    runner.close()  # its pages and graphs go back now
    return {
        "replay_ms_by_gemm": replay_ms,
        "verify_pass_ms": verify,
        "verify_pass_relative": {t: round(ms / verify["1"], 2) for t, ms in verify.items()},
        "decode_batch_ms": decode,
        "decode_batch_relative": {b: round(ms / decode["1"], 2) for b, ms in decode.items()},
        "decode_batch_tokens_per_s": {b: round(int(b) * 1000 / ms, 1) for b, ms in decode.items()},
    }


def _dynamic_generator(target: Any, draft: Any | None, k: int, n: int) -> float:
    from exllamav2 import ExLlamaV2Cache, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2Sampler

    model = target.model
    cache = ExLlamaV2Cache(model, max_seq_len=1024)
    extra: dict[str, Any] = {}
    if draft is not None:
        extra = {
            "draft_model": draft.model,
            "draft_cache": ExLlamaV2Cache(draft.model, max_seq_len=1024),
            "num_draft_tokens": k,
        }
    generator = ExLlamaV2DynamicGenerator(
        model=model, cache=cache, tokenizer=ExLlamaV2Tokenizer(target.config), paged=False, max_batch_size=1, **extra
    )
    prompt = "The lighthouse keeper " * 16  # the generator takes text; about 64 tokens either way
    settings = ExLlamaV2Sampler.Settings.greedy()
    generator.generate(prompt=prompt, max_new_tokens=8, gen_settings=settings, stop_conditions=[])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    generator.generate(prompt=prompt, max_new_tokens=n, gen_settings=settings, stop_conditions=[])
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def _load_models(
    args: argparse.Namespace, splits: dict[str, tuple[float, ...]], result: dict[str, Any]
) -> tuple[Any, Any]:
    """Loads target and draft with their splits, recording devices, load time and VRAM of each."""
    from verispec.backends.exl2 import Exl2Backend

    result["gpu_split"] = {role: list(split) for role, split in splits.items() if split}
    result["cache_mode"] = args.cache_mode
    backends = []
    base = _used_gib()
    for role, path in (("target", args.model), ("draft", args.draft_model)):
        _progress(f"loading the {role} {path}")
        start = time.perf_counter()
        backend = Exl2Backend(path, path.name, gpu_split=splits[role], cache_mode=args.cache_mode)
        result[f"{role}_devices"] = list(backend.info.devices)
        result[f"{role}_load_s"] = round(time.perf_counter() - start, 1)
        result[f"{role}_vram_gib"] = round(_used_gib() - base, 2)
        base = _used_gib()
        backends.append(backend)
    return backends[0], backends[1]


def run_exl2(args: argparse.Namespace) -> dict[str, Any]:
    from verispec.config import EngineConfig, parse_split
    from verispec.engine.core import EngineCore
    from verispec.errors import ModelLoadError
    from verispec.loader import calibrate, calibrate_draft
    from verispec.request import SpeculationMode
    from verispec.runner import build_runner
    from verispec.spec.adaptive import CostModel
    from verispec.spec.drafters import ModelDrafter
    from verispec.tokenizer import Tokenizer
    from verispec.tools.bench_gemm import copy_bandwidth

    splits = {  # bad input fails here, before any GPU work
        "target": parse_split("--gpu-split", args.gpu_split),
        "draft": parse_split("--draft-gpu-split", args.draft_gpu_split),
    }
    if not torch.cuda.is_available():
        raise ModelLoadError("bench exl2 needs a CUDA device, and none is visible")
    n, k = args.max_new_tokens, args.num_draft_tokens
    result: dict[str, Any] = {
        "benchmark": "exl2",
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "max_new_tokens": n,
        "copy_tb_per_s": copy_bandwidth(5),  # before the models and the engine's pool take the memory
    }
    target, draft = _load_models(args, splits, result)
    result.update(_pass_figures(target, draft, n))
    tokenizer = Tokenizer(args.model)
    costs = CostModel()
    config = EngineConfig()
    runner, draft_runner = build_runner(target, config), build_runner(draft, config)
    graphs = getattr(runner, "graphs", None)
    result["auto_gemm_calibration_ms"] = graphs.calibration if graphs is not None else {}
    result["auto_gemm_eager_calibration_ms"] = getattr(runner, "gemm_calibration", {})
    calibrate(runner, costs, 9, config.max_batch_tokens)
    calibrate_draft(draft_runner, costs)
    drafters = {SpeculationMode.DRAFT_MODEL: ModelDrafter(draft_runner)}
    core = EngineCore(runner, tokenizer, drafters, config, costs)
    core.start()
    try:
        measurements = _engine_measurements(core, target.info.vocab_size, n, k, args.repeats)
        result.update(measurements)
        _progress(f"engine: {json.dumps(measurements)}")
        result["service_vs_direct"] = round(result["engine_off_tokens_per_s"] / result["direct_tokens_per_s"], 3)
        result.update(_roofline(args.model, result["copy_tb_per_s"], result["engine_off_decode_tokens_per_s"]))
    finally:
        core.stop(10)
    result["used_gib_per_gpu_after_engine_runs"] = [round(gib, 2) for gib in _used_gib_per_gpu()]
    if core.stopped:
        core.close()  # the engine's pages and graphs make room for ExLlamaV2's own caches
    torch.cuda.empty_cache()
    result.update(_generator_figures(target, draft, k, n, result["engine_off_tokens_per_s"]))
    return result


def _generator_figures(target: Any, draft: Any, k: int, n: int, engine_off_tps: float) -> dict[str, Any]:
    """ExLlamaV2's own generator, unpaged, without and with the draft; an error is reported, not raised, so
    that the engine's figures are kept."""
    _progress("ExLlamaV2DynamicGenerator, unpaged, without and with the draft")
    result: dict[str, Any] = {}
    try:
        generator_tps = round(_dynamic_generator(target, None, k, n), 2)
        result["exllamav2_dynamic_generator_tokens_per_s"] = generator_tps
        result["engine_off_vs_exllamav2_generator"] = round(engine_off_tps / generator_tps, 3)
        with_draft = _dynamic_generator(target, draft, k, n)
        result[f"exllamav2_dynamic_generator_with_draft_k{k}_tokens_per_s"] = round(with_draft, 2)
    except Exception as exc:  # keep the engine's figures even if the comparison run fails
        result["exllamav2_dynamic_generator_error"] = f"{type(exc).__name__}: {exc}"
    return result


def _roofline(model_dir: str, copy_tb_per_s: float, decode_tokens_per_s: float) -> dict[str, Any]:
    """Where single-stream decode stands against reading every weight once per token at copy bandwidth."""
    weight_bytes = _weight_bytes_per_pass(model_dir)
    roofline = copy_tb_per_s * 1e12 / weight_bytes
    return {
        "weight_gb_read_per_pass": round(weight_bytes / 1e9, 2),
        "decode_roofline_tokens_per_s": round(roofline, 1),
        "engine_off_decode_share_of_roofline": round(decode_tokens_per_s / roofline, 3),
    }


def _engine_measurements(core: Any, vocab_size: int, n: int, k: int, repeats: int) -> dict[str, Any]:
    """Engine OFF vs AUTO with the random draft (alternating, medians), fixed k, replayed acceptance."""
    from verispec.engine.core import EngineCore
    from verispec.request import SpeculationMode

    result: dict[str, Any] = {}
    _progress(f"engine: OFF and AUTO with the random draft in ABBA order, {2 * repeats} each; then fixed k={k}")
    for mode in ("off", "auto"):  # warm both paths over a whole request first
        _engine_run(core, mode, K_MAX[mode], n, f"warm-{mode}")
    runs: dict[str, list[float]] = {"off": [], "auto": []}
    off_decode: list[float] = []
    auto_draft_tokens = auto_accepted = 0
    for repeat in range(repeats):  # ABBA cancels the machine's drift between the two modes
        for mode in ("off", "auto", "auto", "off"):
            run = _engine_run(core, mode, K_MAX[mode], n, f"{mode}-{repeat}")
            runs[mode].append(run.tokens_per_s)
            if mode == "off":
                reference = run.token_ids
                off_decode.append(run.decode_tokens_per_s)
            else:
                auto_draft_tokens += run.spec.num_draft_tokens
                auto_accepted += run.spec.num_accepted_tokens
    off_runs, auto_runs = runs["off"], runs["auto"]
    off_tps, auto_tps = statistics.median(off_runs), statistics.median(auto_runs)
    fixed = _engine_run(core, "draft_model", k, n, "fixed")
    fixed_tps, fixed_spec = fixed.tokens_per_s, fixed.spec
    result["engine_off_tokens_per_s"] = round(off_tps, 2)
    result["engine_off_runs"] = [round(t, 2) for t in off_runs]
    result["engine_off_decode_tokens_per_s"] = round(statistics.median(off_decode), 2)
    result["random_draft"] = {
        "auto_tokens_per_s": round(auto_tps, 2),
        "auto_runs": [round(t, 2) for t in auto_runs],
        "auto_vs_off": round(auto_tps / off_tps, 3),
        "auto_draft_tokens_all_runs": auto_draft_tokens,
        "auto_accepted_all_runs": auto_accepted,
        f"fixed_k{k}_tokens_per_s": round(fixed_tps, 2),
        f"fixed_k{k}_acceptance": round(fixed_spec.num_accepted_tokens / max(fixed_spec.num_draft_tokens, 1), 3),
    }
    full = PROMPT_TOKENS + reference
    synthetic = {}
    for acceptance in (0.6, 0.8, 1.0):
        # An engine of its own over the same runner, handed the replay drafter at construction.
        replay = EngineCore(
            core.runner,
            core.tokenizer,
            {SpeculationMode.DRAFT_MODEL: ReplayDrafter(full, acceptance, vocab_size)},
            core.config,
            core.costs,
        )
        _progress(f"replay drafter, synthetic acceptance {acceptance}")
        replay.start()
        try:
            fixed = _engine_run(replay, "draft_model", k, n, f"replay-{acceptance}")
            auto = _engine_run(replay, "auto", K_MAX["auto"], n, f"replay-auto-{acceptance}")
        finally:
            replay.stop(10)
        spec, auto_spec = fixed.spec, auto.spec
        synthetic[str(acceptance)] = {
            f"fixed_k{k}_speedup": round(fixed.tokens_per_s / off_tps, 3),
            "auto_speedup": round(auto.tokens_per_s / off_tps, 3),
            "measured_acceptance": round(spec.num_accepted_tokens / max(spec.num_draft_tokens, 1), 3),
            "auto_tokens_per_step": round(auto_spec.num_emitted_tokens / max(auto_spec.num_steps, 1), 2),
            "outputs_equal_greedy": fixed.token_ids == reference and auto.token_ids == reference,
        }
    result["synthetic_acceptance"] = synthetic
    return result
