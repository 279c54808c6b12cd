"""`verispec synth`: write a random-weight checkpoint of a real model's shape (EXL2 4-bit or fp16).

Nobody needs real weights to qualify hardware for speed and memory: the shapes decide both. Each linear
layer is stored in ExLlamaV2's EXL2 layout with uniform groups: `q_weight` int32 [in*bits/32, out],
`q_scale` int32 [groups, out/8] (4-bit scale codes), `q_scale_max` fp16 [groups], `q_groups` int16
[2*groups] (bits, first q_weight row of the group) and `q_invperm` int32 [in] (identity here).
Norms and the embedding stay fp16. A byte-level BPE tokenizer of the shape's vocabulary size comes along.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GROUP_SIZE = 128
SCALE_MAX = 0.0045  # with random codes this keeps activations, and so logits, finite


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama-architecture model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 8192
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self, layer: int) -> list[tuple[str, int, int]]:
        """(key, in_features, out_features) of one decoder layer's linears."""
        prefix = f"model.layers.{layer}"
        kv = self.kv_heads * self.head_dim
        return [
            (f"{prefix}.self_attn.q_proj", self.hidden, self.hidden),
            (f"{prefix}.self_attn.k_proj", self.hidden, kv),
            (f"{prefix}.self_attn.v_proj", self.hidden, kv),
            (f"{prefix}.self_attn.o_proj", self.hidden, self.hidden),
            (f"{prefix}.mlp.gate_proj", self.hidden, self.intermediate),
            (f"{prefix}.mlp.up_proj", self.hidden, self.intermediate),
            (f"{prefix}.mlp.down_proj", self.intermediate, self.hidden),
        ]


SHAPES = {
    "llama-70b": Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
    "llama-8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "llama-1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    # Small enough to check every logit against the torch reference in a test.
    "tiny": Shape(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=8192, max_positions=2048),
}


def linear_bytes(in_features: int, out_features: int, bits: int) -> int:
    """Stored bytes of one EXL2 linear with uniform groups."""
    groups = in_features // GROUP_SIZE
    return (
        in_features * bits // 32 * out_features * 4
        + groups * out_features // 8 * 4
        + groups * 2
        + groups * 2 * 2
        + in_features * 4
    )


def layer_bytes(shape: Shape, bits: int) -> list[int]:
    """Bytes per decoder layer (linears plus two fp16 norms), in load order."""
    return [
        sum(linear_bytes(i, o, bits) for _, i, o in shape.linears(n)) + 2 * shape.hidden * 2
        for n in range(shape.layers)
    ]


def exl2_linear(in_features: int, out_features: int, bits: int, generator: Any, device: Any) -> dict[str, Any]:
    """Random EXL2 tensors of one linear layer (uniform `bits`, groups of 128)."""
    import torch

    groups = in_features // GROUP_SIZE
    rows_per_group = GROUP_SIZE * bits // 32
    info = torch.iinfo(torch.int32)
    q_groups = torch.empty(groups * 2, dtype=torch.int16)
    q_groups[0::2] = bits
    q_groups[1::2] = torch.arange(groups, dtype=torch.int16) * rows_per_group
    return {
        "q_weight": torch.randint(
            info.min,
            info.max,
            (in_features * bits // 32, out_features),
            dtype=torch.int32,
            generator=generator,
            device=device,
        ).cpu(),
        "q_scale": torch.randint(
            info.min, info.max, (groups, out_features // 8), dtype=torch.int32, generator=generator, device=device
        ).cpu(),
        "q_scale_max": torch.full((groups,), SCALE_MAX, dtype=torch.float16),
        "q_groups": q_groups,
        "q_invperm": torch.arange(in_features, dtype=torch.int32),
    }


def _tensors(shape: Shape, bits: int, seed: int, device: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(shard name, tensors) in load order: embedding, each layer, final norm and head."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    embed = (torch.randn((shape.vocab, shape.hidden), generator=generator, device=device) * 0.02).half().cpu()
    yield "embed", {"model.embed_tokens.weight": embed}
    for n in range(shape.layers):
        tensors: dict[str, Any] = {
            f"model.layers.{n}.input_layernorm.weight": torch.ones(shape.hidden, dtype=torch.float16),
            f"model.layers.{n}.post_attention_layernorm.weight": torch.ones(shape.hidden, dtype=torch.float16),
        }
        for key, i, o in shape.linears(n):
            for name, tensor in exl2_linear(i, o, bits, generator, device).items():
                tensors[f"{key}.{name}"] = tensor
        yield f"layer{n}", tensors
    head = {f"lm_head.{k}": v for k, v in exl2_linear(shape.hidden, shape.vocab, bits, generator, device).items()}
    head["model.norm.weight"] = torch.ones(shape.hidden, dtype=torch.float16)
    yield "head", head


def hf_config(shape: Shape, bits: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "exl2",
            "bits": float(bits),
            "head_bits": bits,
            "group_size": GROUP_SIZE,
            "note": "random weights (verispec synth)",
        },
    }


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (256 bytes, 3 specials, filler merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(byte_chars):
        vocab[char] = len(vocab)
    merges: list[tuple[str, str]] = []
    letters = sorted(byte_chars)
    tokens = list(letters)  # grows as merges add longer symbols
    left_index = 0
    while len(vocab) < vocab_size:  # merge each symbol with each byte, shortest symbols first
        left = tokens[left_index]
        left_index += 1
        for right in letters:
            if len(vocab) >= vocab_size:
                break
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
                tokens.append(left + right)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 1 << 20,
            },
            indent=2,
        )
    )


def synth(
    shape_name: str, out: Path, bits: int = 4, seed: int = 0, device: str = "cpu", shard_bytes: int = 4 << 30
) -> dict[str, Any]:
    """Writes the checkpoint; returns a summary. Progress goes to stderr."""
    from safetensors.torch import save_file

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits must be 2, 3, 4, 5, 6 or 8, got {bits}")
    shape = SHAPES[shape_name]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    shard: dict[str, Any] = {}
    shard_size = 0
    index: dict[str, str] = {}
    files = 0
    total = 0

    def flush() -> None:
        nonlocal shard, shard_size, files
        if shard:
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            files += 1
            shard, shard_size = {}, 0

    for step, (label, tensors) in enumerate(_tensors(shape, bits, seed, device)):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard_size and shard_size + size > shard_bytes:
            flush()
        shard.update(tensors)
        shard_size += size
        total += size
        print(
            f"[synth] {shape_name}: {step + 1}/{shape.layers + 2} {label}, {total / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(hf_config(shape, bits), indent=2))
    write_tokenizer(out, shape.vocab)
    return {
        "shape": shape_name,
        "bits": bits,
        "files": files,
        "bytes": total,
        "gib": round(total / 2**30, 2),
        "seconds": round(time.monotonic() - started, 1),
        "path": str(out),
    }


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shape", choices=sorted(SHAPES), help="model shape to copy")
    parser.add_argument("out", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight of every linear layer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--device", default="cpu", help="where random numbers are drawn (cuda is faster)")
