"""GGUF tensors into Int4Linear layers without float32 in between (Q4_0, Q4_1, Q4_K, Q8_0); others stay dense.

Each mapped tensor's blocks are split into 4-bit codes and per-group parameters that reproduce gguf-py's
float32 dequantization exactly (which is what the converted safetensors hold). Tensors of other types
(Q5_K, Q6_K, F16, ...) keep the dequantized float32 weights the model was loaded with and are counted at
that size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from verispec.quant.int4 import GROUP, Int4Embedding, Int4Linear, PackedLayout, tensor_bytes

log = structlog.get_logger(__name__)

MAPPED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")


@dataclass(frozen=True)
class WeightsReport:
    """What the loaded weights are, for ModelInfo, Health and the benchmarks."""

    quantization: str  # e.g. "gguf-q4_1"; "gguf-q4_1-dequantized" for the float32 reference
    bits_per_weight: float  # mean stored bits per weight of the decoder's linear layers (head excluded)
    weight_bytes: int  # bytes of every distinct weight tensor resident in the model
    native: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors on the int4 kernel
    dense: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors kept dequantized


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: its name, shape (fastest dimension first), type and raw bytes."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    data: np.ndarray  # uint8, memory-mapped

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class GGUFFile:
    """The scalar metadata and tensor table of a GGUF file (arrays such as the vocabulary are skipped)."""

    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]


# GGUF value types: struct format of the scalars; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf(path: Path) -> GGUFFile:
    """Parses the header with struct (gguf-py's reader builds every vocabulary entry, seconds per load)."""
    import struct

    import gguf

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(raw)  # type: ignore[arg-type]
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, buffer, offset)
        offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def text() -> str:
        nonlocal offset
        length = take("Q")
        value = bytes(buffer[offset : offset + length]).decode("utf-8", errors="replace")
        offset += length
        return value

    def value(kind: int) -> Any:
        nonlocal offset
        if kind == 8:
            return text()
        if kind == 9:
            item, count = take("I"), take("Q")
            if item in _SCALARS:
                offset += count * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(count):
                    value(item)
            return None
        return take(_SCALARS[kind])

    magic, version = take("I"), take("I")
    if magic != gguf.GGUF_MAGIC or version < 2:
        raise ValueError(f"{path}: not a GGUF v2+ file")
    num_tensors, num_kv = take("Q"), take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = text()
        metadata[key] = value(take("I"))
    infos = []
    for _ in range(num_tensors):
        name = text()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, dims, take("I"), take("Q")))
    alignment = int(metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
    start = -(-offset // alignment) * alignment
    tensors = []
    for name, dims, kind, data_offset in infos:
        qtype = gguf.GGMLQuantizationType(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims)) // block * size
        tensors.append(GGUFTensorInfo(name, dims, qtype.name, raw[start + data_offset : start + data_offset + nbytes]))
    return GGUFFile(metadata, tensors)


def file_quantization(file: GGUFFile) -> str:
    """'gguf-q4_1' from general.file_type (MOSTLY_Q4_1), or 'gguf' when the file does not say."""
    import gguf

    try:
        name = gguf.LlamaFileType(int(file.metadata["general.file_type"])).name
    except (KeyError, ValueError):
        return "gguf"
    return "gguf-" + name.removeprefix("MOSTLY_").lower()


def apply_gguf(model: Any, gguf_path: Path) -> WeightsReport:
    """Replaces `model`'s linear layers and embedding with Int4Linear / Int4Embedding read from the file's
    blocks wherever a type maps exactly; the rest keep their float32 weights."""
    if PackedLayout.detect() is None:
        raise RuntimeError("torch's int4 CPU packing layout is unknown on this build")
    file = read_gguf(gguf_path)
    mapping = _name_map(model, file)
    processor = _processor(model, file)
    native: Counter[str] = Counter()
    dense: Counter[str] = Counter()
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {t.name for t in file.tensors}
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and "output.weight" not in names
    bits = numel = 0
    for tensor in file.tensors:
        hf_name = mapping.get(tensor.name)
        if hf_name is None:
            continue
        path = hf_name.removesuffix(".weight")
        module = model.get_submodule(path)
        if not isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            continue
        if isinstance(module, torch.nn.Linear) and module is not head:
            bits += 8 * tensor.data.size
            numel += tensor.n_elements
        layer = _layer(tensor, processor, module, hf_name) if tensor.type_name in MAPPED_TYPES else None
        if layer is None:
            dense[tensor.type_name] += 1
            continue
        native[tensor.type_name] += 1
        if module is embeddings:
            _set(model, path, Int4Embedding(layer, getattr(module, "embed_scale", None)))
            if tied and head is not None:
                _set(model, _path_of(model, head), layer)
        else:
            _set(model, path, layer)
    report = WeightsReport(
        file_quantization(file),
        round(bits / numel, 4) if numel else 0.0,
        tensor_bytes(model),
        dict(native),
        dict(dense),
    )
    log.info(
        "model.weights.native",
        quantization=report.quantization,
        bits_per_weight=report.bits_per_weight,
        weight_mib=round(report.weight_bytes / 2**20, 1),
        native=report.native,
        dense=report.dense,
    )
    return report


# transformers' model_type -> gguf-py's architecture name, where they differ.
_ARCHITECTURES = {"cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}


def _name_map(model: Any, file: GGUFFile) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name (transformers' own map rebuilds gguf-py's name table
    once per submodule: seconds)."""
    import gguf

    model_type = _ARCHITECTURES.get(model.config.model_type, model.config.model_type)
    arch = next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == model_type), None)
    if arch is None:
        return {}
    table = gguf.get_tensor_name_map(arch, int(model.config.num_hidden_layers))
    mapping: dict[str, str] = {}
    for hf_name, _ in model.named_parameters():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(stem)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = hf_name
    return mapping


def _processor(model: Any, file: GGUFFile) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    architecture = str(file.metadata.get("general.architecture", ""))
    processor: Any = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    return processor(config=model.config.to_dict())


def _path_of(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return str(name)
    raise KeyError("module not in model")


def _set(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _row_order(processor: Any, name: str, rows: int) -> np.ndarray | None:
    """The row permutation transformers applies to this tensor (Llama's q/k), or None when its processor
    changes values rather than reordering rows."""
    index = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    result = processor.process(weights=index.copy(), name=name, tensor_key_mapping={}, parsed_parameters={})
    order = np.asarray(result.weights).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        return None
    return order


def _layer(tensor: GGUFTensorInfo, processor: Any, module: torch.nn.Module, hf_name: str) -> Int4Linear | None:
    if len(tensor.shape) != 2:
        return None
    k, n = tensor.shape  # GGUF lists the fastest dimension first
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    layout = PackedLayout.detect()
    assert layout is not None
    if tuple(weight.shape) != (n, k) or k % GROUP or n % layout.block_n:
        return None
    order = _row_order(processor, tensor.name, n)
    if order is None:
        return None
    blocks = tensor.data.reshape(n, -1)[order]
    bias = getattr(module, "bias", None)
    bias = bias.detach().clone() if bias is not None else None
    codes, scale, offset = _decode(blocks, tensor.type_name, n, k)
    kind = "int8" if tensor.type_name == "Q8_0" else "int4"
    return Int4Linear(kind, codes, scale, offset, bias, source=f"{tensor.type_name} {hf_name}")


def _f16(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32))


def _compact(values: torch.Tensor) -> torch.Tensor:
    """float16 when that holds every value exactly, else float32."""
    half = values.half()
    return half if torch.equal(half.float(), values) else values


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of a block of 32 -> [..., 32] codes: low nibbles are elements 0-15, high 16-31."""
    return np.concatenate((qs & 15, qs >> 4), axis=-1)


def _decode(
    blocks: np.ndarray, type_name: str, n: int, k: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Row-major blocks [n, bytes] -> (codes [n, k] per part, scale [n, k/32], offset [n, k/32])."""
    groups = k // GROUP
    if type_name == "Q8_0":  # 34 bytes: d (f16), 32 x int8; w = q * d
        b = blocks.reshape(n, groups, 34)
        d = _f16(b[..., :2]).reshape(n, groups)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k).astype(np.int16) + 128  # 0..255
        hi, lo = torch.from_numpy((q >> 4).astype(np.uint8)), torch.from_numpy((q & 15).astype(np.uint8))
        return [hi, lo], _compact(d), None
    if type_name == "Q4_0":  # 18 bytes: d, 16 bytes of codes; w = (c - 8) * d = c * d - 8d
        b = blocks.reshape(n, groups, 18)
        d = _f16(b[..., :2]).reshape(n, groups)
        codes = _nibble_codes(b[..., 2:]).reshape(n, k)
        return [torch.from_numpy(codes)], _compact(d), _compact(8 * d)
    if type_name == "Q4_1":  # 20 bytes: d, m, 16 bytes of codes; w = c * d + m
        b = blocks.reshape(n, groups, 20)
        d, m = _f16(b[..., :2]).reshape(n, groups), _f16(b[..., 2:4]).reshape(n, groups)
        codes = _nibble_codes(b[..., 4:]).reshape(n, k)
        return [torch.from_numpy(codes)], _compact(d), _compact(-m)
    if type_name == "Q4_K":  # 144 bytes per 256: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of codes
        from gguf.quants import Q4_K

        supers = groups // 8
        b2 = blocks.reshape(n * supers, 144)
        d, dmin = _f16(b2[:, :2]), _f16(b2[:, 2:4])
        sc, mins = Q4_K.get_scale_min(b2[:, 4:16])
        scale = d * torch.from_numpy(sc.astype(np.float32))  # exact: f16 x 6-bit integer
        offset = dmin * torch.from_numpy(mins.astype(np.float32))
        qs = b2[:, 16:].reshape(n * supers, 4, 32)  # each 32 bytes: low nibbles sub-block 2j, high 2j+1
        codes = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(n, k)
        return [torch.from_numpy(codes)], _compact(scale.reshape(n, groups)), _compact(offset.reshape(n, groups))
    raise ValueError(type_name)
