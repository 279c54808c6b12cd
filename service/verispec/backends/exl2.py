"""ExLlamaV2 backend: a 4-bit EXL2/GPTQ model over one or more GPUs, driven one forward at a time.

Only this module imports exllamav2, and only when the backend is built, so verispec installs and runs
without CUDA. The speculative loop, sampling and spans stay the engine's own: this backend runs
`model.forward` on k+1 tokens and rolls back by moving the cache's `current_seq_len`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from verispec.backends.base import BackendInfo
from verispec.errors import ConfigError, ModelLoadError

log = structlog.get_logger(__name__)

GIB = 1024**3
CACHE_MODES = ("fp16", "q8", "q6", "q4")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class Exl2Cache:
    """One sequence's ExLlamaV2 cache; `length` is its current_seq_len."""

    cache: Any

    @property
    def length(self) -> int:
        return int(self.cache.current_seq_len)


def plan_split(layer_bytes: list[int], fixed_bytes: int, split_gb: list[float]) -> list[int]:
    """GPU index of each layer when layers fill GPUs in order, each up to its share of GB.

    `fixed_bytes` (embedding, head, norms) is charged to the first and last GPU as ExLlamaV2 places
    them. Raises ConfigError naming the GPU that overflows and by how many GB, or the total shortfall.
    """
    budgets = [gb * GIB for gb in split_gb]
    used = [0.0] * len(budgets)
    used[0] += fixed_bytes / 2
    used[-1] += fixed_bytes / 2
    placement: list[int] = []
    gpu = 0
    for size in layer_bytes:
        while gpu < len(budgets) and used[gpu] + size > budgets[gpu]:
            gpu += 1
        if gpu == len(budgets):
            total = sum(layer_bytes) + fixed_bytes
            short = (total - sum(budgets)) / GIB
            raise ConfigError(
                "--gpu-split",
                f"the model needs {total / GIB:.1f} GB of weights but the split gives {sum(split_gb):.1f} GB "
                f"({', '.join(f'GPU {i}: {gb:g}' for i, gb in enumerate(split_gb))}); "
                f"{max(short, 0.0) + 0.05:.1f} GB short before any KV cache "
                f"(GPU {len(budgets) - 1} overflows at layer {len(placement)} of {len(layer_bytes)})",
            )
        used[gpu] += size
        placement.append(gpu)
    return placement


def tensor_bytes(model_dir: Path) -> Iterator[tuple[str, int, int | None]]:
    """(tensor name, bytes, decoder layer index or None) of every tensor, from the safetensors headers."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                info = handle.get_slice(key)
                parts = key.split(".")
                layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else None
                yield key, _numel(info.get_shape()) * _dtype_bytes(info.get_dtype()), layer


def checkpoint_sizes(model_dir: Path) -> tuple[list[int], int]:
    """(bytes per decoder layer, bytes of everything else) from the safetensors headers."""
    per_layer: dict[int, int] = {}
    other = 0
    for _, size, layer in tensor_bytes(model_dir):
        if layer is None:
            other += size
        else:
            per_layer[layer] = per_layer.get(layer, 0) + size
    return [per_layer[i] for i in sorted(per_layer)], other


def _checkpoint_bytes(model_dir: Path) -> int:
    """The checkpoint's tensor bytes: what ExLlamaV2 holds of the weights (on GPUs and, the embedding, host)."""
    per_layer, other = checkpoint_sizes(model_dir)
    return sum(per_layer) + other


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _dtype_bytes(dtype: str) -> int:
    return {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "F64": 8, "I64": 8}.get(dtype, 4)


class Exl2Backend:
    """ExLlamaV2 model with one cache per sequence; logits come back as float32."""

    def __init__(
        self,
        model_dir: Path,
        model_id: str,
        gpu_split: tuple[float, ...] = (),
        reserve_gb: float = 1.0,
        cache_mode: str = "fp16",
        max_context_length: int = 0,
        gemm: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        if not torch.cuda.is_available():
            raise ModelLoadError("the exl2 backend needs a CUDA device, and none is visible")
        if cache_mode not in CACHE_MODES:
            raise ConfigError("--cache-mode", f"{cache_mode!r} is not one of {', '.join(CACHE_MODES)}")
        _check_checkpoint(model_dir)
        if gpu_split:
            if len(gpu_split) > torch.cuda.device_count():
                raise ConfigError(
                    "--gpu-split", f"{len(gpu_split)} shares given, {torch.cuda.device_count()} GPUs visible"
                )
            layer_sizes, fixed = checkpoint_sizes(model_dir)
            plan_split(layer_sizes, fixed, list(gpu_split))
        try:
            from exllamav2 import ExLlamaV2, ExLlamaV2Config
        except ImportError as exc:
            raise ModelLoadError(f"the exl2 backend needs exllamav2 (pip install 'verispec[exl2]'): {exc}") from exc
        _use_causal_attention()
        config = ExLlamaV2Config(str(model_dir))
        if max_context_length:
            config.max_seq_len = max_context_length
        config.max_input_len = max(config.max_input_len, 2048)
        # ExLlamaV2 records a CUDA graph per module and (rows, batch) shape it sees. Driven by the paged
        # runner, whose batches change shape every step, those graphs broke as soon as a second model
        # (the draft) was loaded: q_attn/q_mlp forwards raised std::bad_alloc on the H200 (all GPU tests
        # pass with graphs off). The runner's own graphs are the place for launch savings.
        config.no_graphs = True
        self.config = config
        self.model = ExLlamaV2(config)
        self.cache_mode = cache_mode
        self.gemm = gemm  # the paged runner's 4-bit GEMM: auto, verispec or exllamav2
        self.cuda_graphs = cuda_graphs  # the paged runner replays few-token passes as CUDA graphs
        log.info("model.load.start", model=model_id, backend="exl2", gpu_split=list(gpu_split) or "auto")
        if gpu_split:
            self.model.load(list(gpu_split), progress=True)
        else:
            warmup = self._make_cache(lazy=True)
            self.model.load_autosplit(
                warmup, reserve_vram=[int(reserve_gb * GIB)] * torch.cuda.device_count(), progress=True
            )
        devices = sorted(
            {
                f"cuda:{m.device_idx}"
                for m in self.model.modules
                if isinstance(getattr(m, "device_idx", None), int) and m.device_idx >= 0
            }
        )
        self.info = BackendInfo(
            model_id=model_id,
            backend="exl2",
            vocab_size=int(config.vocab_size),
            max_context_length=int(config.max_seq_len),
            dtype="float16",
            devices=tuple(devices),
            quantization=_quantization(model_dir),
            bits_per_weight=_bits_per_weight(model_dir),
            cache_mode=cache_mode,
            gpu_split_gb=tuple(gpu_split),
            weight_bytes=_checkpoint_bytes(model_dir),
        )
        log.info("model.load.done", model=model_id, devices=devices, vram=self.memory())

    def _make_cache(self, lazy: bool = False) -> Any:
        from exllamav2 import ExLlamaV2Cache, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8

        kind = {"fp16": ExLlamaV2Cache, "q8": ExLlamaV2Cache_Q8, "q6": ExLlamaV2Cache_Q6, "q4": ExLlamaV2Cache_Q4}[
            self.cache_mode
        ]
        return kind(self.model, max_seq_len=self.config.max_seq_len, lazy=lazy)

    def new_cache(self) -> Exl2Cache:
        return Exl2Cache(self._make_cache())

    @torch.inference_mode()
    def forward(self, cache: Exl2Cache, token_ids: list[int], num_logits: int) -> torch.Tensor:
        ids = torch.tensor([token_ids], dtype=torch.long)
        logits = self.model.forward(ids, cache.cache, last_id_only=num_logits == 1)
        rows: torch.Tensor = logits[0, -num_logits:, :].float()
        return rows

    def rollback(self, cache: Exl2Cache, length: int) -> None:
        cache.cache.current_seq_len = min(cache.length, length)

    def free(self, cache: Exl2Cache) -> None:
        cache.cache = None

    def memory(self) -> list[tuple[str, int, int]]:
        result = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            result.append((f"cuda:{index}", int(total - free), int(total)))
        return result


def _use_causal_attention() -> None:
    """Keeps multi-token forwards causal when flash-attn is absent.

    In exllamav2 0.3.2 the torch SDPA path asks for a block-diagonal mask whenever `causal` is set, and
    that mask is None outside paged batches, so prefill and k+1 verify passes attend to later tokens.
    Measured on an H200 against the dequantized torch reference: logits differ by 6% of their range at
    2 tokens and 120% at 40. Its matmul path builds the causal mask; turning the SDPA flag off selects it.
    """
    import exllamav2.attn

    exllamav2.attn.has_lower_right_sdpa = False


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return loaded


def _check_checkpoint(model_dir: Path) -> None:
    config = _read_config(model_dir)
    architectures = config.get("architectures") or ["?"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{model_dir}: architecture {architectures[0]} is not supported by the exl2 backend "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    method = _quantization(model_dir)
    if method not in ("exl2", "gptq"):
        raise ModelLoadError(f"{model_dir}: quantization {method!r} is not EXL2 or 4-bit GPTQ")
    bits = config.get("quantization_config", {}).get("bits")
    if method == "gptq" and bits != 4:
        raise ModelLoadError(f"{model_dir}: GPTQ with {bits} bits; the exl2 backend takes 4-bit GPTQ only")


def _quantization(model_dir: Path) -> str:
    quantization = _read_config(model_dir).get("quantization_config") or {}
    return str(quantization.get("quant_method", "none"))


def _bits_per_weight(model_dir: Path) -> float:
    quantization = _read_config(model_dir).get("quantization_config") or {}
    return float(quantization.get("bits", 0.0))
