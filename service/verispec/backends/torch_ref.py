"""PyTorch/transformers backend: any causal-LM directory, DynamicCache cropped for rollback."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from verispec.backends.base import BackendInfo
from verispec.errors import ModelLoadError

log = structlog.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TorchCache:
    """A transformers DynamicCache for one sequence."""

    past: Any = field(default=None)

    @property
    def length(self) -> int:
        return 0 if self.past is None else int(self.past.get_seq_length())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return _DTYPES[dtype]


class TorchRefBackend:
    """Runs a transformers causal LM; the reference every other backend is checked against."""

    def __init__(
        self,
        model_dir: Path,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        max_context_length: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        log.info(
            "model.load.start",
            model=model_id,
            backend="torch_ref",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {model_dir} with transformers: {exc}") from exc
        self.model: Any = model.to(self.device).eval()
        if self.device.type == "cpu":
            num_routed = route_small_linears(self.model)
            log.info("model.cpu_small_gemm", linears=num_routed)
        config = self.model.config
        native = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        context = min(max_context_length, native) if max_context_length else native
        self.generation_eos = _generation_eos(self.model)
        # transformers >= 5.24 names the KV-cache argument `cache`; older releases, `past_key_values`
        # (and silently ignore an unknown keyword, which would leave the cache empty).
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self.info = BackendInfo(
            model_id=model_id,
            backend="torch_ref",
            vocab_size=int(config.vocab_size),
            max_context_length=context,
            dtype=str(self.dtype).removeprefix("torch."),
            devices=(str(self.device),),
            quantization="none",
            bits_per_weight=float(torch.finfo(self.dtype).bits),
            cache_mode=str(self.dtype).removeprefix("torch."),
        )
        log.info("model.load.done", model=model_id, vocab_size=self.info.vocab_size, max_context_length=context)

    def new_cache(self) -> TorchCache:
        return TorchCache()

    @torch.inference_mode()
    def forward(self, cache: TorchCache, token_ids: list[int], num_logits: int) -> torch.Tensor:
        from transformers import DynamicCache

        if cache.past is None:
            cache.past = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=num_logits, **{self._cache_kwarg: cache.past}
        )
        logits: torch.Tensor = out.logits[0, -num_logits:, :]
        return logits.float()

    def rollback(self, cache: TorchCache, length: int) -> None:
        excess = cache.length - length
        if excess > 0:
            cache.past.crop(-excess)

    def free(self, cache: TorchCache) -> None:
        cache.past = None

    def memory(self) -> list[tuple[str, int, int]]:
        if self.device.type == "cuda":
            _free, total = torch.cuda.mem_get_info(self.device)
            return [(str(self.device), int(torch.cuda.memory_allocated(self.device)), int(total))]
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return [("cpu", int(params), 0)]


class SmallBatchLinear(torch.nn.Linear):
    """nn.Linear that computes few-row inputs as W @ x^T on CPU.

    Decode and verify passes multiply 1 to 9 rows by each weight. torch's CPU F.linear takes a slow
    path for so few rows: on 2 cores, SmolLM2's 49152x576 head costs 11 ms for 1 row, 24 ms for 2 and
    37 ms for 3, while W @ x^T costs 4-5 ms for 2-4 rows. A single row is duplicated, since the
    one-row product is slow in both forms. A whole forward drops from 61 to 30 ms for 1 token and
    from 102 to 45 ms for 2 (`verispec bench spec` prints the current figures).
    """

    MAX_ROWS = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n > self.MAX_ROWS:
            return super().forward(x)
        source = torch.cat([rows, rows]) if n == 1 else rows
        y = torch.mm(self.weight, source.T).T[:n]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def route_small_linears(model: torch.nn.Module) -> int:
    """Makes every nn.Linear of `model` a SmallBatchLinear (same weights); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = SmallBatchLinear
            count += 1
    return count


def _generation_eos(model: Any) -> list[int]:
    """End-of-sequence ids from the model's generation config (may list several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
