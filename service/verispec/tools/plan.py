"""`verispec plan`: will a model fit these GPUs, how is it split, and how many sequences does it hold?

The arithmetic follows what the exl2 backend loads: decoder layers fill the GPUs in order (the split that
`--gpu-split` gives and `plan_split` checks), the head and final norm sit on the last GPU, the token
embedding stays in host memory, and each GPU holds the KV cache of its own layers. On top come two
reserves measured on an H200 (benchmarks/exl2-70b-*.json): activation scratch for a 2048-token chunk on
every GPU plus the logits of that chunk on the last one, and the CUDA context. With them the estimate
for the 70B shape at 4.0 bpw is 37.1 GiB on one GPU (measured 37.0) and 20.1 / 19.6 GiB per GPU under
`--gpu-split 17.5,19 --cache-mode q4` with the 1B draft on GPU 0 (measured 19.3 / 19.6).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verispec.tools.synth import GROUP_SIZE, SHAPES, Shape

GIB = 1024**3
CHUNK_TOKENS = 2048  # ExLlamaV2's max_input_len as the backend sets it: the rows of one prefill chunk
CUDA_CONTEXT_GIB = 0.75  # per GPU: what the two-GPU measurement leaves after weights, cache and scratch
# Bytes per cached K or V element; ExLlamaV2's quantized caches add an fp16 scale per 32 elements.
CACHE_BYTES = {"fp16": 2.0, "q8": 1.0 + 2 / 32, "q6": 0.75 + 2 / 32, "q4": 0.5 + 2 / 32}
COMPARE_BITS = (16.0, 8.0, 6.0, 5.0, 4.0, 3.0)


@dataclass(frozen=True)
class Gpu:
    """One GPU: a name and its memory; bandwidth (TB/s) where known, for the roofline."""

    name: str
    memory_gib: float
    bandwidth_tbs: float = 0.0


GPUS = {
    "rtx4090": Gpu("rtx4090", 24.0, 1.01),
    "rtx3090": Gpu("rtx3090", 24.0, 0.94),
    "l40s": Gpu("l40s", 48.0, 0.86),
    "a100-40g": Gpu("a100-40g", 40.0, 1.56),
    "a100-80g": Gpu("a100-80g", 80.0, 2.04),
    "h100-80g": Gpu("h100-80g", 80.0, 3.35),
    "h200": Gpu("h200", 140.0, 4.8),
}


def parse_gpus(text: str) -> list[Gpu]:
    """'2x24', '1x80', 'rtx4090', '2xa100-80g', 'rtx4090,24' -> one Gpu per card."""
    gpus: list[Gpu] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        count_text, _, kind = part.partition("x") if part[0].isdigit() and "x" in part else ("1", "", part)
        if not count_text.isdigit() or int(count_text) < 1:
            raise ValueError(f"cannot read GPU count in {part!r}")
        if kind in GPUS:
            gpu = GPUS[kind]
        else:
            try:
                gpu = Gpu(f"{float(kind):g}GiB", float(kind))
            except ValueError:
                raise ValueError(f"unknown GPU {kind!r}; known: {', '.join(GPUS)}, or a size in GiB") from None
        gpus += [gpu] * int(count_text)
    if not gpus:
        raise ValueError("no GPUs given")
    return gpus


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of one model as the exl2 backend places it."""

    name: str
    shape: Shape
    bits: float
    layer_bytes: tuple[int, ...]  # per decoder layer, load order
    head_bytes: int  # lm_head and the final norm: on the last GPU
    embedding_bytes: int  # the token embedding: host memory

    @property
    def gpu_bytes(self) -> int:
        return sum(self.layer_bytes) + self.head_bytes

    @property
    def total_bytes(self) -> int:
        return self.gpu_bytes + self.embedding_bytes


def linear_bytes(in_features: int, out_features: int, bits: float) -> int:
    """Stored bytes of one linear: EXL2 with uniform groups of 128 below 16 bits, plain fp16 at 16.

    At whole bits this equals synth.linear_bytes (the synthetic checkpoint's tensors); fractional bits
    (4.65 bpw) scale the packed weights and keep the same per-group and permutation overhead.
    """
    if bits >= 16:
        return in_features * out_features * 2
    groups = in_features // GROUP_SIZE
    packed = math.ceil(in_features * bits / 32) * out_features * 4
    return packed + groups * out_features // 8 * 4 + groups * 2 + groups * 4 + in_features * 4


def shape_sizes(name: str, shape: Shape, bits: float) -> ModelSizes:
    """Sizes of a known shape at `bits` per weight (linears and head), fp16 norms and embedding."""
    norms = 2 * shape.hidden * 2
    layers = tuple(sum(linear_bytes(i, o, bits) for _, i, o in shape.linears(n)) + norms for n in range(shape.layers))
    head = linear_bytes(shape.hidden, shape.vocab, bits) + shape.hidden * 2
    return ModelSizes(name, shape, bits, layers, head, shape.vocab * shape.hidden * 2)


def checkpoint_shape(model_dir: Path) -> tuple[Shape, float]:
    """The shape in a checkpoint's config.json and its bits per weight (16 when unquantized)."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    shape = Shape(
        hidden=int(config["hidden_size"]),
        intermediate=int(config["intermediate_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab=int(config["vocab_size"]),
        max_positions=int(config.get("max_position_embeddings", 8192)),
    )
    bits = float((config.get("quantization_config") or {}).get("bits", 16.0))
    return shape, bits


def checkpoint_sizes(model_dir: Path) -> ModelSizes:
    """Sizes read from the safetensors headers of a checkpoint directory."""
    from verispec.backends.exl2 import tensor_bytes

    shape, bits = checkpoint_shape(model_dir)
    per_layer = [0] * shape.layers
    head = embedding = 0
    for key, size, layer in tensor_bytes(model_dir):
        if layer is not None:
            per_layer[layer] += size
        elif "embed_tokens" in key:
            embedding += size
        else:
            head += size
    if not head:  # tied embeddings: the head reads the embedding, and ExLlamaV2 puts a copy on the GPU
        head = embedding
    return ModelSizes(model_dir.name, shape, bits, tuple(per_layer), head, embedding)


def model_sizes(model: str, bits: float | None) -> ModelSizes:
    """A known shape name or a checkpoint directory; `bits` overrides the checkpoint's own."""
    if model in SHAPES:
        return shape_sizes(model, SHAPES[model], 4.0 if bits is None else bits)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither a known shape ({', '.join(SHAPES)}) nor a checkpoint directory")
    if bits is None:
        return checkpoint_sizes(path)
    shape, _ = checkpoint_shape(path)
    return shape_sizes(path.name, shape, bits)


def kv_bytes_per_layer(shape: Shape, context: int, cache_mode: str) -> float:
    """K and V of one layer for one sequence of `context` tokens."""
    return 2 * shape.kv_heads * shape.head_dim * context * CACHE_BYTES[cache_mode]


def scratch_bytes(shape: Shape, last: bool) -> int:
    """Activation scratch of one prefill chunk on a GPU; the last GPU also holds the chunk's logits
    (fp16 and their float32 copy)."""
    activations = CHUNK_TOKENS * (3 * shape.intermediate + 4 * shape.hidden) * 2
    return activations + (CHUNK_TOKENS * shape.vocab * 6 if last else 0)


def draft_bytes(draft: ModelSizes, context: int, cache_mode: str, sequences: int) -> float:
    """What a draft placed whole on one GPU takes: weights, its KV cache and its own scratch."""
    kv = draft.shape.layers * kv_bytes_per_layer(draft.shape, context, cache_mode) * sequences
    return draft.gpu_bytes + kv + scratch_bytes(draft.shape, last=True)


def plan(
    target: ModelSizes,
    gpus: list[Gpu],
    context: int,
    sequences: int,
    cache_mode: str,
    draft: ModelSizes | None = None,
    split_gb: list[float] | None = None,
) -> dict[str, Any]:
    """Places layers on the GPUs (each layer with its KV cache for `sequences`), then reports per GPU.

    Without `split_gb`, layers go to GPU 0 until the next would not fit, then to GPU 1, and so on (as
    autosplit does); with it, they are placed as `--gpu-split` places them (the backend's plan_split).
    The last GPU also holds the head; the draft (if any) goes on GPU 0. Returns a JSON-ready dictionary.
    """
    if cache_mode not in CACHE_BYTES:
        raise ValueError(f"cache mode {cache_mode!r} is not one of {', '.join(CACHE_BYTES)}")
    shape = target.shape
    kv_layer, fixed, capacity = _budget(target, gpus, context, sequences, cache_mode, draft)
    last = len(gpus) - 1
    if split_gb is None:
        placement = _fill(target.layer_bytes, kv_layer * sequences, fixed, capacity)
    else:
        from verispec.backends.exl2 import plan_split

        if len(split_gb) != len(gpus):
            raise ValueError(f"--gpu-split has {len(split_gb)} shares for {len(gpus)} GPUs")
        placement = plan_split(list(target.layer_bytes), target.head_bytes + target.embedding_bytes, split_gb)
    rows: list[dict[str, Any]] = []
    for i, gpu in enumerate(gpus):
        layers = [n for n, g in enumerate(placement) if g == i]
        weights = sum(target.layer_bytes[n] for n in layers) + (target.head_bytes if i == last else 0)
        kv = kv_layer * len(layers) * sequences
        reserve = CUDA_CONTEXT_GIB * GIB + scratch_bytes(shape, i == last)
        drafted = draft_bytes(draft, context, cache_mode, sequences) if draft is not None and i == 0 else 0.0
        used = weights + kv + reserve + drafted
        rows.append(
            {
                "gpu": i,
                "name": gpu.name,
                "memory_gib": gpu.memory_gib,
                "layers": [layers[0], layers[-1] + 1] if layers else [],
                "num_layers": len(layers),
                "weights_gib": _gib(weights),
                "kv_cache_gib": _gib(kv),
                "reserve_gib": _gib(reserve),
                "draft_gib": _gib(drafted),
                "used_gib": _gib(used),
                "free_gib": _gib(capacity[i] - used),
            }
        )
    kv_per_sequence = kv_layer * shape.layers
    result: dict[str, Any] = {
        "model": target.name,
        "bits": target.bits,
        "draft": draft.name if draft is not None else None,
        "gpus": [g.name for g in gpus],
        "context": context,
        "sequences": sequences,
        "cache_mode": cache_mode,
        "weights_gib": _gib(target.total_bytes),
        "weights_gpu_gib": _gib(target.gpu_bytes),
        "embedding_host_gib": _gib(target.embedding_bytes),
        "kv_cache_per_sequence_gib": _gib(kv_per_sequence),
        "kv_cache_total_gib": _gib(kv_per_sequence * sequences),
        "per_gpu": rows,
        "max_sequences": _max_sequences(target, gpus, context, cache_mode, draft),
    }
    overflow: list[tuple[float, int]] = []
    if len(placement) < shape.layers:  # layers left over: they would go past the last GPU
        missing = sum(target.layer_bytes[len(placement) :]) + kv_layer * sequences * (shape.layers - len(placement))
        overflow = [(float(rows[last]["free_gib"]) - missing / GIB, last)]
    else:
        overflow = [(float(r["free_gib"]), int(r["gpu"])) for r in rows if r["free_gib"] < 0]
    result["fits"] = not overflow
    if overflow:
        free, index = min(overflow)
        short = gpus[index]
        result["shortfall"] = {"gpu": index, "name": short.name, "gib": round(-free, 2)}
        result["message"] = (
            f"does not fit: GPU {index} ({short.name}, {short.memory_gib:g} GiB) is short by {-free:.2f} GiB "
            f"for {sequences} x {context} tokens with a {cache_mode} cache"
        )
    else:
        result["gpu_split"] = split_gb or gpu_split(target, placement, len(gpus))
    return result


def _fill(layer_bytes: tuple[int, ...], kv_per_layer: float, fixed: list[float], capacity: list[float]) -> list[int]:
    """GPU of each layer, filling in order; shorter than layer_bytes when the last GPU runs out."""
    used = list(fixed)
    placement: list[int] = []
    gpu = 0
    for size in layer_bytes:
        while gpu < len(capacity) and used[gpu] + size + kv_per_layer > capacity[gpu]:
            gpu += 1
        if gpu == len(capacity):
            break
        used[gpu] += size + kv_per_layer
        placement.append(gpu)
    return placement


def gpu_split(target: ModelSizes, placement: list[int], num_gpus: int) -> list[float]:
    """The `--gpu-split` (GB of weights per GPU) that gives `placement` under the backend's plan_split,
    which charges half of the non-layer bytes to the first GPU and half to the last."""
    fixed = target.head_bytes + target.embedding_bytes
    split = []
    for i in range(num_gpus):
        weights = sum(b for b, g in zip(target.layer_bytes, placement, strict=True) if g == i)
        weights += fixed // 2 * ((i == 0) + (i == num_gpus - 1))
        split.append(math.ceil(weights / GIB * 100 + 1e-9) / 100)
    return split


def _max_sequences(target: ModelSizes, gpus: list[Gpu], context: int, cache_mode: str, draft: ModelSizes | None) -> int:
    """Largest number of concurrent sequences of `context` tokens that still fits (0: not even one)."""
    low, high = 0, 1
    while plan_fits(target, gpus, context, high, cache_mode, draft):
        low, high = high, high * 2
        if high > 1 << 20:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if plan_fits(target, gpus, context, middle, cache_mode, draft) else (low, middle)
    return low


def plan_fits(
    target: ModelSizes, gpus: list[Gpu], context: int, sequences: int, cache_mode: str, draft: ModelSizes | None
) -> bool:
    kv_layer, fixed, capacity = _budget(target, gpus, context, sequences, cache_mode, draft)
    if any(f > c for f, c in zip(fixed, capacity, strict=True)):
        return False
    return len(_fill(target.layer_bytes, kv_layer * sequences, fixed, capacity)) == target.shape.layers


def _budget(
    target: ModelSizes, gpus: list[Gpu], context: int, sequences: int, cache_mode: str, draft: ModelSizes | None
) -> tuple[float, list[float], list[float]]:
    """(KV bytes of one layer for one sequence, bytes every GPU holds before layers, capacities)."""
    last = len(gpus) - 1
    fixed = [CUDA_CONTEXT_GIB * GIB + scratch_bytes(target.shape, i == last) for i in range(len(gpus))]
    fixed[last] += target.head_bytes
    if draft is not None:
        fixed[0] += draft_bytes(draft, context, cache_mode, sequences)
    capacity = [g.memory_gib * GIB for g in gpus]
    return kv_bytes_per_layer(target.shape, context, cache_mode), fixed, capacity


def _gib(value: float) -> float:
    return round(value / GIB, 2)


def compare(
    model: str, gpus: list[Gpu], context: int, sequences: int, cache_mode: str, draft: ModelSizes | None
) -> dict[str, Any]:
    """The same plan at FP16 and 8 / 6 / 5 / 4 / 3 bits per weight."""
    plans = [plan(model_sizes(model, bits), gpus, context, sequences, cache_mode, draft) for bits in COMPARE_BITS]
    return {"model": model, "gpus": [g.name for g in gpus], "compare": plans}


def table(result: dict[str, Any]) -> str:
    """The plan (or the comparison) as a plain-text table."""
    plans = result.get("compare", [result])
    header = f"{'bits':>5} {'weights GiB':>11} {'KV/seq GiB':>10} {'fits':>5} {'max seqs':>8}  per GPU used/size GiB"
    lines = [
        f"model {result['model']}, GPUs {' + '.join(result['gpus'])}, context {plans[0]['context']}, "
        f"{plans[0]['sequences']} sequence(s), {plans[0]['cache_mode']} cache",
        header,
    ]
    for p in plans:
        label = "fp16" if p["bits"] >= 16 else f"{p['bits']:g}"
        per_gpu = ", ".join(f"{r['used_gib']:.1f}/{r['memory_gib']:g}" for r in p["per_gpu"])
        lines.append(
            f"{label:>5} {p['weights_gib']:>11.1f} {p['kv_cache_per_sequence_gib']:>10.2f} "
            f"{'yes' if p['fits'] else 'no':>5} {p['max_sequences']:>8}  {per_gpu}"
        )
        if not p["fits"]:
            lines.append(f"{'':>5} {p['message']}")
        elif "compare" not in result:
            lines.append(f"{'':>5} --gpu-split {','.join(f'{gb:g}' for gb in p['gpu_split'])}")
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"a known shape ({', '.join(s for s in SHAPES)}) or a checkpoint directory"
    )
    parser.add_argument("--draft", default="", help="draft model, as --model (placed on GPU 0)")
    parser.add_argument(
        "--bits", type=float, default=None, help="bits per weight (default: the checkpoint's, 4 for a shape)"
    )
    parser.add_argument("--draft-bits", type=float, default=None, help="draft bits per weight (default as --bits)")
    parser.add_argument("--gpus", default="2x24", help=f"GPUs: NxGiB or names ({', '.join(GPUS)}), comma-separated")
    parser.add_argument("--context", type=int, default=8192, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--sequences", type=int, default=1, help="concurrent sequences")
    parser.add_argument("--gpu-split", default="", help="place layers as serve --gpu-split does (GB per GPU)")
    parser.add_argument("--cache-mode", default="fp16", choices=sorted(CACHE_BYTES), help="KV cache mode")
    parser.add_argument("--compare", action="store_true", help="the same plan at fp16 / 8 / 6 / 5 / 4 / 3 bits")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_plan(args: argparse.Namespace) -> int:
    """`verispec plan`: exit 0 when the plan fits (every row of --compare counts as printed), 3 when not."""
    if args.context < 1 or args.sequences < 1:
        raise ValueError("--context and --sequences must be >= 1")
    from verispec.config import parse_split

    gpus = parse_gpus(args.gpus)
    draft = model_sizes(args.draft, args.draft_bits) if args.draft else None
    if args.compare:
        result = compare(args.model, gpus, args.context, args.sequences, args.cache_mode, draft)
    else:
        target = model_sizes(args.model, args.bits)
        split = list(parse_split("--gpu-split", args.gpu_split)) or None
        result = plan(target, gpus, args.context, args.sequences, args.cache_mode, draft, split)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if args.compare or result["fits"] else 3
