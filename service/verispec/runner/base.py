"""The ModelRunner protocol: one forward pass over a ragged batch of sequences in the paged KV cache."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
import torch

from verispec.backends.base import BackendInfo
from verispec.kv.pages import PagePool, PageTable, pages_for

log = structlog.get_logger(__name__)
GIB = 1024**3
CALIBRATION_CONTEXT = 16  # positions each sequence of a calibration pass holds before its token


@dataclass(frozen=True)
class BatchEntry:
    """One sequence's share of a batched forward: new tokens at positions start .. start+n-1."""

    seq_id: int
    token_ids: Sequence[int]  # [n] new tokens
    start: int  # positions already in the cache (earlier ones are kept, later ones overwritten)
    pages: Sequence[int]  # the sequence's page table, covering at least start + n positions
    num_logits: int  # logits wanted for the last num_logits new tokens (0 for a non-final prefill chunk)


@dataclass(frozen=True)
class KVLayout:
    """The shape of the runner's paged KV memory."""

    page_size: int  # token positions per page
    num_pages: int
    bytes_per_token: int  # keys and values of every layer for one position
    dtype: str

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.page_size * self.bytes_per_token

    def new_pool(self) -> PagePool:
        """A page pool over this layout's pages (the engine's, a drafter's, or a scratch one)."""
        return PagePool(self.num_pages, self.page_size)

    def log_ready(self, runner: str, **extra: object) -> None:
        """One start-up line saying how large the pool came out."""
        log.info(
            "runner.ready",
            runner=runner,
            kv_pages=self.num_pages,
            page_size=self.page_size,
            kv_bytes_per_token=self.bytes_per_token,
            kv_gib=round(self.total_bytes / GIB, 3),
            **extra,
        )


class ModelRunner(Protocol):
    """Scores every sequence of a batch in one pass; the engine owns pages, sampling and speculation."""

    info: BackendInfo
    kv: KVLayout
    batched: bool  # False: the fallback that runs entries one after another
    asynchronous: bool  # forward returns while the device still computes (the logits are read later)

    @property
    def cost_breaks(self) -> tuple[int, ...]:
        """Pass sizes (tokens) past which a pass costs a step more than the tokens it adds (exl2: its CUDA-graph
        buckets); calibration measures both sides of each, so the scheduler sees the step."""
        ...

    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        """Writes each entry's keys and values into its pages; returns float32 logits
        [num_logits, vocab] per entry, in batch order."""
        ...

    def free(self, seq_id: int) -> None:
        """Forgets anything the runner keeps for a sequence besides its pages."""
        ...

    def memory(self) -> list[tuple[str, int, int]]:
        """(device, used bytes, total bytes) per device, measured now (call on the engine thread)."""
        ...

    def close(self) -> None:
        """Lets go of the memory the runner holds (KV pages, CUDA graphs): no pass runs after. Its owner
        calls it, so that the memory goes back even where something still refers to the runner."""
        ...


def plan_num_pages(bytes_per_token: int, page_size: int, budget_bytes: int, max_tokens: int) -> int:
    """Pages that fit in budget_bytes, but no more than max_tokens positions need (at least one)."""
    by_memory = budget_bytes // (bytes_per_token * page_size)
    by_need = -(-max_tokens // page_size)
    return max(1, min(by_memory, by_need))


def kv_budget_bytes(setting: float, free_bytes: int) -> int:
    """--kv-cache-memory: a share of free memory when <= 1, else GiB."""
    if setting <= 1.0:
        return int(setting * free_bytes)
    return int(setting * GIB)


def available_cpu_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the host can give without swapping); 8 GiB if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def logits_rows(batch: Sequence[BatchEntry]) -> list[int]:
    """Indices into the flattened [sum of n] token axis of the rows whose logits are wanted."""
    rows: list[int] = []
    offset = 0
    for entry in batch:
        n = len(entry.token_ids)
        rows.extend(range(offset + n - entry.num_logits, offset + n))
        offset += n
    return rows


def queued_copy(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, copied from pinned memory behind the work already queued there. A plain copy
    from pageable memory (`torch.tensor(values, device=...)`, `.to(device)`) waits for the device's queue
    to drain first, so an asynchronous runner that made one after its pass's kernels would return only
    once the pass was done, and the engine would hand the last step's tokens out a pass late."""
    if device.type == "cpu" or host.device == device:
        return host.to(device)
    if host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def split_logits(batch: Sequence[BatchEntry], logits: torch.Tensor) -> list[torch.Tensor]:
    """Cuts the stacked logits of logits_rows(batch) back into one tensor per entry."""
    result: list[torch.Tensor] = []
    offset = 0
    for entry in batch:
        result.append(logits[offset : offset + entry.num_logits])
        offset += entry.num_logits
    return result


def scratch_entry(
    pool: PagePool, table: PageTable, tokens: list[int], start: int, num_logits: int, seq_id: int = -1
) -> BatchEntry:
    """An entry of a negative sequence id in pages of a scratch pool: calibration and benchmarks drive a
    runner directly, before its engine runs or while it is idle (pages are rewritten before they are read)."""
    pool.reserve(table, start + len(tokens))
    return BatchEntry(seq_id, tokens, start, table.pages, num_logits)


def calibration_batch(pool: PagePool, rows: int) -> list[BatchEntry] | None:
    """`rows` scratch sequences decoding one token after CALIBRATION_CONTEXT positions, or None when
    the pool cannot hold them."""
    if pool.num_pages < rows * pages_for(CALIBRATION_CONTEXT + 1, pool.page_size):
        return None
    return [scratch_entry(pool, PageTable(), [1], CALIBRATION_CONTEXT, 1, -1 - i) for i in range(rows)]


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `call` on the GPU (synchronized around each), after one untimed call that
    compiles and allocates."""
    call()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
