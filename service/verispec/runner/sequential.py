"""The fallback runner: any Backend, one sequence after another, each in the backend's own cache.

For architectures the batched runners do not cover. Pages are then a budget only (the backend keeps
its own per-sequence caches), so admission and preemption behave the same, but nothing is shared
between the sequences of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verispec.backends.base import Backend
from verispec.runner.base import BatchEntry, KVLayout


class SequentialRunner:
    """Runs each entry of a batch as its own forward of `backend`."""

    batched = False
    asynchronous = False  # a backend's forward returns its logits
    cost_breaks: tuple[int, ...] = ()

    def __init__(self, backend: Backend, page_size: int, num_pages: int) -> None:
        self.backend = backend
        self.info = backend.info
        self.kv = KVLayout(page_size, num_pages, bytes_per_token=0, dtype=backend.info.cache_mode)
        self._caches: dict[int, Any] = {}

    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        return [self._forward_one(entry) for entry in batch]

    def _forward_one(self, entry: BatchEntry) -> torch.Tensor:
        cache = self._caches.get(entry.seq_id)
        if cache is None or cache.length < entry.start:
            if entry.start:
                raise RuntimeError(f"sequence {entry.seq_id}: cache holds fewer than {entry.start} positions")
            cache = self._caches[entry.seq_id] = self.backend.new_cache()
        self.backend.rollback(cache, entry.start)
        logits = self.backend.forward(cache, list(entry.token_ids), max(entry.num_logits, 1))
        return logits[logits.shape[0] - entry.num_logits :]

    def free(self, seq_id: int) -> None:
        cache = self._caches.pop(seq_id, None)
        if cache is not None:
            self.backend.free(cache)

    def memory(self) -> list[tuple[str, int, int]]:
        return self.backend.memory()

    def close(self) -> None:
        for seq_id in list(self._caches):
            self.free(seq_id)
