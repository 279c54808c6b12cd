"""`verispec bench`: measurements printed as JSON.

This module defines the flags of every kind (overhead, spec, soak, exl2, batch) and imports nothing heavy at
top level, so that building the CLI's parser stays cheap; each kind imports torch, grpc and the service's
parts inside the functions that run it (soak, exl2 and batch live in their own modules).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from verispec.tools.common import PositionCounts, concurrency_list

log = structlog.get_logger(__name__)

OVERHEAD_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bench", required=True)
    overhead = kinds.add_parser(
        "overhead",
        help="tokens/s of one greedy request through the gRPC stream vs the backend driven directly",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    overhead.add_argument("--model", default=None, help="target model (default: the embedded model)")
    overhead.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per run")
    overhead.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved")
    overhead.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    add_spec_arguments(kinds)
    add_soak_arguments(kinds)
    add_exl2_arguments(kinds)
    add_batch_arguments(kinds)
    from verispec.tools.bench_cost import add_cost_arguments
    from verispec.tools.bench_cpu_peer import add_cpu_peer_arguments
    from verispec.tools.bench_gemm import add_gemm_arguments
    from verispec.tools.bench_quality import add_quality_arguments
    from verispec.tools.quality_exl2 import add_quality_exl2_arguments

    add_cost_arguments(kinds)
    add_cpu_peer_arguments(kinds)
    add_gemm_arguments(kinds)
    add_quality_arguments(kinds)
    add_quality_exl2_arguments(kinds)


def add_soak_arguments(kinds: Any) -> None:
    soak = kinds.add_parser(
        "soak",
        help="bounded load on loopback: cancels, deadlines, bad requests",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    soak.add_argument("--requests", type=int, default=1000, help="requests in all")
    soak.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    soak.add_argument("--cancel-fraction", type=float, default=0.3, help="streams cancelled mid-way")
    soak.add_argument("--deadline-fraction", type=float, default=0.1, help="calls with a 50-300 ms deadline")
    soak.add_argument("--bad-fraction", type=float, default=0.1, help="calls with an invalid field")
    soak.add_argument(
        "--attack-fraction",
        type=float,
        default=0.1,
        help="hostile calls: large Tokenize, huge prompts, stalled readers, degenerate floats, role injection",
    )
    soak.add_argument("--max-new-tokens", type=int, default=12, help="upper bound per request")
    soak.add_argument("--time-limit", type=float, default=900, help="seconds before the run stops itself")
    soak.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    soak.add_argument("--output", type=Path, default=None, help="also write the JSON here")


def add_exl2_arguments(kinds: Any) -> None:
    exl2 = kinds.add_parser(
        "exl2",
        help="ExLlamaV2 backend on a GPU vs ExLlamaV2DynamicGenerator (JSON)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exl2.add_argument("--model", type=Path, required=True, help="target checkpoint (EXL2/GPTQ)")
    exl2.add_argument("--draft-model", type=Path, required=True, help="draft checkpoint (EXL2/GPTQ)")
    exl2.add_argument("--max-new-tokens", type=int, default=128, help="tokens per measured request")
    exl2.add_argument("--num-draft-tokens", type=int, default=4, help="k for the fixed-k runs")
    exl2.add_argument("--repeats", type=int, default=3, help="rounds of OFF, AUTO, AUTO, OFF; medians are reported")
    exl2.add_argument("--gpu-split", default="", help="target GB per GPU, e.g. 20,22 (empty: autosplit)")
    exl2.add_argument("--draft-gpu-split", default="", help="draft GB per GPU (empty: autosplit)")
    exl2.add_argument("--cache-mode", default="fp16", help="KV cache mode of both models: fp16, q8, q6 or q4")
    exl2.add_argument("--output", type=Path, default=None, help="also write the JSON here")


def add_batch_arguments(kinds: Any) -> None:
    batch = kinds.add_parser(
        "batch",
        help="load sweep through the gRPC server: batched vs round-robin scheduling, speculation OFF vs AUTO",
        description="N concurrent greedy streams per point, for each scheduling policy, speculation mode and "
        "concurrency: aggregate tokens/s, inter-token latency and TTFT (median of --repeats, with min and max), "
        "then a short request's TTFT under load against the idle server. One model load; an engine and "
        "in-process server per policy, one at a time. With --backend exl2, also ExLlamaV2's own batched "
        "forward (the raw ceiling).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    batch.add_argument("--model", default=None, help="target model (default: the embedded model)")
    batch.add_argument("--backend", default="torch_ref", help="torch_ref, or exl2 (CUDA)")
    batch.add_argument("--draft-model", default="", help="draft model for AUTO (default: n-gram drafter)")
    batch.add_argument("--concurrency", type=concurrency_list, default=(1, 2, 4, 8, 16), help="streams per point")
    batch.add_argument("--max-new-tokens", type=int, default=32, help="tokens every stream generates")
    batch.add_argument("--repeats", type=int, default=3, help="rounds of every point, interleaved")
    batch.add_argument(
        "--max-batch-tokens", type=int, default=0, help="server's token budget per pass (0: its default)"
    )
    batch.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=2000,
        help="prompt in prefill during the TTFT probe (0: skip that case)",
    )
    batch.add_argument(
        "--probe-samples", type=int, default=8, help="short requests the TTFT probe sends per condition and repeat"
    )
    batch.add_argument("--no-ttft-probe", action="store_true", help="skip the TTFT-under-load probe")
    batch.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    batch.add_argument("--plot", type=Path, default=None, help="PNG of aggregate tokens/s against concurrency")


def run_bench(args: argparse.Namespace) -> int:
    from verispec import telemetry
    from verispec.config import TelemetryConfig

    telemetry.configure_logging(TelemetryConfig(log_level="warning"))
    if args.bench == "overhead":
        result = asyncio.run(_overhead(args))
    elif args.bench == "spec":
        result = _spec(args)
    elif args.bench == "exl2":
        from verispec.tools.bench_exl2 import run_exl2

        result = run_exl2(args)
    elif args.bench == "soak":
        from verispec.tools.soak import run_soak

        result = run_soak(args, _progress)
    elif args.bench == "batch":
        from verispec.tools.bench_batch import run_batch

        result = run_batch(args, _progress)
    elif args.bench == "gemm":
        from verispec.tools.bench_gemm import run_gemm

        result = run_gemm(args)
    elif args.bench == "cpu-peer":
        from verispec.tools.bench_cpu_peer import run_cpu_peer

        result = run_cpu_peer(args, _progress)
    elif args.bench == "cost":
        from verispec.tools.bench_cost import run_cost

        result = run_cost(args, _progress)
    elif args.bench == "quality":
        from verispec.tools.bench_quality import run_quality

        result = run_quality(args, _progress)
    elif args.bench == "quality-exl2":
        from verispec.tools.quality_exl2 import run_quality_exl2

        result = run_quality_exl2(args, _progress)
    else:  # pragma: no cover - argparse only accepts the kinds above
        raise SystemExit(f"unknown benchmark {args.bench}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 1 if "error" in result else 0  # a run that stopped early still reports what it measured


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def direct_greedy(runner: Any, prompt_ids: list[int], num_tokens: int, suppress: list[int]) -> float:
    """Seconds for plain greedy decoding of num_tokens straight on the model runner (end-of-sequence masked),
    in pages of a scratch pool: call it on the engine thread while the engine is idle."""
    import torch

    from verispec.kv.pages import PageTable
    from verispec.runner.base import scratch_entry

    pool, table = runner.kv.new_pool(), PageTable()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            logits = runner.forward([scratch_entry(pool, table, prompt_ids, 0, 1)])[0]
            for i in range(num_tokens - 1):
                logits[:, suppress] = float("-inf")
                token = int(logits[0].argmax())
                logits = runner.forward([scratch_entry(pool, table, [token], len(prompt_ids) + i, 1)])[0]
            return time.perf_counter() - start
    finally:
        runner.free(-1)


async def _overhead(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from verispec.api.server import Server
    from verispec.config import DEFAULT_MODEL, config_from_argv
    from verispec.loader import load
    from verispec_proto.v1 import generation_pb2 as pb
    from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

    config = config_from_argv(
        [
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--model",
            args.model or DEFAULT_MODEL,
            "--speculation",
            "off",
            "--step-spans",
            "off",
        ]
    )
    _progress("loading the model")
    models = await asyncio.to_thread(load, config)
    server = Server(config)
    port = await server.start()
    await server.load(lambda _config, _observer: models)
    runner = models.engine.core.runner
    prompt_ids = models.tokenizer.encode(OVERHEAD_PROMPT)
    suppress = sorted(models.tokenizer.eos_token_ids)
    n = args.max_new_tokens
    request = pb.StreamGenerateRequest(
        prompt=OVERHEAD_PROMPT,
        max_new_tokens=n,
        min_new_tokens=n,
        speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_OFF),
    )
    direct_s: list[float] = []
    service_s: list[float] = []
    ttft_s: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await _stream(stub, request)  # warm-up of both paths
        for i in range(args.repeats):
            _progress(f"run {i + 1}/{args.repeats}: direct")
            # The engine thread owns torch's thread pool: measure the runner there too.
            direct = models.engine.core.call(lambda: direct_greedy(runner, prompt_ids, n, suppress))
            direct_s.append(await asyncio.wrap_future(direct))
            _progress(f"run {i + 1}/{args.repeats}: gRPC stream")
            elapsed, first, count = await _stream(stub, request)
            assert count == n, f"the service generated {count} tokens, expected {n}"
            service_s.append(elapsed)
            ttft_s.append(first)
    await server.stop(0)
    direct_tps = n / statistics.median(direct_s)
    service_tps = n / statistics.median(service_s)
    return {
        "benchmark": "overhead",
        "model": models.target.model_id,
        "device": ",".join(models.target.devices),
        "quantization": models.target.quantization,
        "bits_per_weight": models.target.bits_per_weight,
        "weight_bytes": models.target.weight_bytes,
        "max_new_tokens": n,
        "repeats": args.repeats,
        "direct_tokens_per_s": round(direct_tps, 2),
        "grpc_stream_tokens_per_s": round(service_tps, 2),
        "ratio": round(service_tps / direct_tps, 4),
        "grpc_ttft_ms_median": round(1000 * statistics.median(ttft_s), 1),
        "direct_s": [round(s, 3) for s in direct_s],
        "grpc_stream_s": [round(s, 3) for s in service_s],
    }


async def _stream(stub: Any, request: Any) -> tuple[float, float, int]:
    """(seconds to the last message, seconds to the first token, tokens received)."""
    start = time.perf_counter()
    first = 0.0
    count = 0
    async for message in stub.StreamGenerate(request):
        if count == 0 and message.token_ids:
            first = time.perf_counter() - start
        count += len(message.token_ids)
    return time.perf_counter() - start, first, count


# -- speculation: OFF vs AUTO ----------------------------------------------------------------------

PASSAGE = (
    "The lighthouse stood at the edge of the cliff, its white paint peeling in long strips. Every night "
    "the keeper climbed the one hundred and twelve steps, trimmed the wick, and watched the beam sweep "
    "across the water until dawn. In winter the storms came from the north and shook the glass of the "
    "lantern room, and in summer the fog rolled in so thick that the horn sounded every half minute "
    "from dusk to morning. The keeper kept a logbook of every ship that passed, every storm that broke, "
    "and every bird that struck the glass, and he wrote in it each evening before he lit the lamp."
)
CODE = (
    "def total(items, tax_rate):\n"
    "    x = 0\n"
    "    for item in items:\n"
    "        x = x + item.price * item.quantity\n"
    "    if x > 100:\n"
    "        x = x * 0.9\n"
    "    x = x + x * tax_rate\n"
    '    print("total:", x)\n'
    "    return round(x, 2)\n"
)
COPY_HEAVY = (
    f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Rename the variable `x` to `subtotal` in this code and print the whole function:\n\n{CODE}",
    f"Fix the spelling mistakes in this paragraph and return it in full:\n\n{PASSAGE.replace('the ', 'teh ')}",
)
FREE_WRITING = (
    "Write a short poem about autumn leaves.",
    "Explain in a few sentences why the sky is blue.",
    "Give three tips for someone learning to cook.",
)


def add_spec_arguments(kinds: Any) -> None:
    spec = kinds.add_parser(
        "spec",
        help="speculation OFF vs AUTO on copy-heavy and free-writing prompts (greedy)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    spec.add_argument("--model", default=None, help="target model (default: the embedded model)")
    spec.add_argument("--draft-model", default="", help="draft model (default: n-gram drafter)")
    spec.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request")
    spec.add_argument("--num-draft-tokens", type=int, default=8, help="largest k AUTO may choose")
    spec.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    spec.add_argument("--plot", type=Path, default=None, help="PNG of acceptance by draft position")


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    from verispec.config import DEFAULT_MODEL, config_from_argv
    from verispec.engine.core import run_to_completion
    from verispec.loader import load
    from verispec.request import (
        Request,
        ResponseOptions,
        SamplingParams,
        SpeculationMode,
        SpeculationParams,
        StoppingCriteria,
    )

    flags = ["--model", args.model or DEFAULT_MODEL, "--max-num-draft-tokens", str(args.num_draft_tokens)]
    if args.draft_model:
        flags += ["--draft-model", args.draft_model]
    counts = PositionCounts()
    _progress("loading the model")
    models = load(config_from_argv(flags), observer=counts)
    core, tokenizer, target = models.engine.core, models.tokenizer, models.engine.core.runner
    result: dict[str, Any] = {
        "benchmark": "spec",
        "model": target.info.model_id,
        "drafter": models.auto_drafter,
        "device": ",".join(target.info.devices),
        "quantization": target.info.quantization,
        "bits_per_weight": target.info.bits_per_weight,
        "weight_bytes": target.info.weight_bytes,
        "max_new_tokens": args.max_new_tokens,
        "max_num_draft_tokens": args.num_draft_tokens,
        "sets": {},
    }
    for name, prompts in (("copy_heavy", COPY_HEAVY), ("free_writing", FREE_WRITING)):
        counts.clear()
        seconds = {"off": 0.0, "auto": 0.0}
        tokens = {"off": 0, "auto": 0}
        drafted = accepted = steps = 0
        identical = True
        for i, prompt in enumerate(prompts):
            ids = tokenizer.encode_chat([("user", prompt)])
            outputs = {}
            for mode in ("off", "auto"):
                _progress(f"{name} {i + 1}/{len(prompts)}: speculation {mode}")
                counts.enabled = mode == "auto"
                request = Request(
                    request_id=f"{name}-{i}-{mode}",
                    prompt_token_ids=tuple(ids),
                    sampling=SamplingParams(),
                    stopping=StoppingCriteria(max_new_tokens=args.max_new_tokens),
                    response=ResponseOptions(),
                    speculation=SpeculationParams(SpeculationMode(mode), args.num_draft_tokens),
                )
                start = time.perf_counter()
                outs = run_to_completion(core, request)
                seconds[mode] += time.perf_counter() - start
                outputs[mode] = [t for o in outs for t in o.token_ids]
                tokens[mode] += len(outputs[mode])
                stats = outs[-1].spec
                if mode == "auto" and stats is not None:
                    drafted += stats.num_draft_tokens
                    accepted += stats.num_accepted_tokens
                    steps += stats.num_steps
            identical &= outputs["off"] == outputs["auto"]
        off_tps, auto_tps = tokens["off"] / seconds["off"], tokens["auto"] / seconds["auto"]
        result["sets"][name] = {
            "prompts": len(prompts),
            "tokens": tokens["auto"],
            "off_tokens_per_s": round(off_tps, 2),
            "auto_tokens_per_s": round(auto_tps, 2),
            "speedup": round(auto_tps / off_tps, 3),
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "draft_tokens": drafted,
            "mean_tokens_per_step": round(tokens["auto"] / max(steps + len(prompts), 1), 3),
            "acceptance_by_position": counts.rates(),
            "greedy_outputs_identical": identical,
        }
    core.stop(10)
    result["verify_ms_by_tokens"] = {str(n): round(s * 1000, 2) for n, s in sorted(core.costs.verify_s.items())}
    if args.plot is not None:
        _plot_acceptance(result, args.plot)
        result["plot"] = str(args.plot)
    return result


def _plot_acceptance(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.4
    for offset, (name, data) in zip((-width / 2, width / 2), result["sets"].items(), strict=False):
        rates = data["acceptance_by_position"]
        positions = [int(p) for p in rates]
        label = f"{name} (speedup {data['speedup']}x)"
        axis.bar([p + offset for p in positions], list(rates.values()), width=width, label=label)
    axis.set_xlabel("draft position")
    axis.set_ylabel("acceptance rate")
    axis.set_ylim(0, 1)
    axis.set_title(f"{result['model']}, drafter {result['drafter']}, AUTO k <= {result['max_num_draft_tokens']}")
    axis.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
