"""The Backend protocol every runtime implements, and what it reports about itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class BackendInfo:
    """What a loaded model is, for ModelInfo and telemetry."""

    model_id: str
    backend: str
    vocab_size: int
    max_context_length: int
    dtype: str
    devices: tuple[str, ...]
    quantization: str = "none"
    bits_per_weight: float = 0.0
    cache_mode: str = ""
    gpu_split_gb: tuple[float, ...] = ()
    weight_bytes: int = 0  # resident bytes of the weights as held (quantized layers at their packed size)


class SequenceCache(Protocol):
    """One sequence's KV cache; `length` is the number of tokens it holds."""

    @property
    def length(self) -> int: ...


class Backend(Protocol):
    """A causal LM that scores tokens into a per-sequence cache and can roll that cache back.

    The engine owns the speculative loop; a backend only runs forward passes. A verify pass
    is one `forward` of the last accepted token plus k drafts (k+1 positions).
    """

    info: BackendInfo

    def new_cache(self) -> SequenceCache:
        """An empty cache for one sequence."""
        ...

    def forward(self, cache: Any, token_ids: list[int], num_logits: int) -> torch.Tensor:
        """Appends `token_ids` to `cache`; returns float32 logits [num_logits, vocab] of the last ones."""
        ...

    def rollback(self, cache: Any, length: int) -> None:
        """Truncates `cache` to its first `length` tokens (drops rejected drafts)."""
        ...

    def free(self, cache: Any) -> None:
        """Releases the cache's memory; the cache must not be used afterwards."""
        ...

    def memory(self) -> list[tuple[str, int, int]]:
        """(device, used bytes, total bytes) per device the model lives on."""
        ...
