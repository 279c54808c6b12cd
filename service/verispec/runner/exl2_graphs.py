"""CUDA graphs of the exl2 runner's passes of up to 64 rows: decodes, verifies, draft steps, prompts.

A 70B decode pass launches ~1,500 kernels; launched from Python they cost more host time than the GPU
spends running them. So a pass of up to 64 rows (decodes, verifies, draft catch-ups and prefill chunks in
any mix) runs as the replay of a graph captured at start-up for the smallest row bucket that holds it.
Before a replay the host writes into static buffers the pass's token embeddings and, per row, its
position, the slot its key and value go to, how many keys it sees and its sequence's page table; each
GPU of the split replays its own graph over its layers (the hidden state hops between them). Rows that
pad a bucket sit at position 0 of the spare page past the pool (runner/exl2.py), so they write and read
nothing of a sequence. Attention is the Triton paged kernel (kernels/paged_attention.py), whose grid
depends on the number of rows only, so one capture serves every context length.

Each bucket is captured with ExLlamaV2's fused kernels and, where verispec's 4-bit GEMMs cover the
layers, with them; `--exl2-gemm auto` keeps the faster replay per bucket (timed at capture). ExLlamaV2's
own `forward` cannot be captured (it switches streams); its module kernels can.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import structlog
import torch

from verispec.backends.base import BackendInfo
from verispec.kernels import MAX_Q4_ROWS
from verispec.kv.pages import pages_for
from verispec.runner.base import (
    CALIBRATION_CONTEXT,
    BatchEntry,
    KVLayout,
    calibration_batch,
    logits_rows,
    median_seconds,
    queued_copy,
    split_logits,
)

log = structlog.get_logger(__name__)

GRAPH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)  # rows a captured pass holds
GRAPH_LOOKAHEAD = 16  # positions past the model's context a captured pass's page tables reach (a verify's drafts)
# ExLlamaV2's q-gemm autotunes each (rows, in, out) shape of up to 4 rows over its first 200 calls, timing
# each with CUDA events it waits on; call 201 settles it. A capture cannot contain those waits.
EXLLAMAV2_AUTOTUNED_ROWS = 4
EXLLAMAV2_AUTOTUNE_CALLS = 201
assert GRAPH_BUCKETS[-1] <= MAX_Q4_ROWS


class GraphedRunner(Protocol):
    """What the graphs need of the runner whose passes they capture (runner/exl2.py's Exl2Runner)."""

    info: BackendInfo
    modules: list[Any]  # ExLlamaV2's modules: the embedding, then layers, final norm and head
    model: Any  # the ExLlamaV2 model (its config)
    kv: KVLayout
    q4_layers: dict[int, Any]  # module index -> the 4-bit weights verispec's GEMMs read
    k_cache: list[torch.Tensor]  # per layer [slots, kv_heads, head_dim]
    v_cache: list[torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int

    def embed(self, token_ids: list[int]) -> torch.Tensor: ...

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...

    def run_modules(
        self,
        x: torch.Tensor,
        start: int,
        stop: int,
        rows_on: Callable[[torch.device], Any],
        use_q4: bool,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def unavailable(runner: GraphedRunner) -> str:
    """Why this runner's passes cannot be captured, or "" when they can: Triton is there, the paged
    attention kernel takes the model's heads, and it compiles and runs on each GPU of the model."""
    try:
        from verispec.kernels.paged_attention import supports, trial
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    reason = supports(runner.heads, runner.kv_heads, runner.head_dim)
    if reason:
        return reason
    for device in sorted({cache.device.index or 0 for cache in runner.k_cache}):
        try:
            trial(runner.heads, runner.kv_heads, runner.head_dim, runner.kv.page_size, device)
        except Exception as exc:  # a compile or resource failure on this GPU: eager passes only
            return f"the paged attention kernel fails on cuda:{device}: {type(exc).__name__}: {str(exc)[:200]}"
    return ""


@dataclass(frozen=True)
class _Segment:
    """Modules start .. stop-1, all on one GPU: one graph each."""

    device: int
    start: int
    stop: int


class _Meta(NamedTuple):
    """Views of one metadata buffer, int32 [3 * rows + rows * max_pages]: per row its position, the slot
    its key and value go to, the keys it sees (position + 1) and its sequence's page table."""

    positions: torch.Tensor  # [rows]
    slots: torch.Tensor  # [rows]
    lengths: torch.Tensor  # [rows]
    tables: torch.Tensor  # [rows, max_pages]

    @staticmethod
    def of(buffer: torch.Tensor, rows: int, max_pages: int) -> _Meta:
        tables = buffer[3 * rows :].view(rows, max_pages)
        return _Meta(buffer[:rows], buffer[rows : 2 * rows], buffer[2 * rows : 3 * rows], tables)


class _StaticRows:
    """The rows of a captured pass on one GPU: views into that GPU's copy of the host's metadata, which
    every replay reads."""

    def __init__(self, runner: GraphedRunner, meta: torch.Tensor, rows: int, max_pages: int) -> None:
        self.runner = runner
        self.positions_int32, self.slots, self.lengths, self.tables = _Meta.of(meta, rows, max_pages)
        self.slots_long: torch.Tensor  # set by begin() inside each graph

    def begin(self) -> None:
        """Inside a capture: the write slots as the int64 index index_copy_ takes, once per graph (made in
        the graph, so every replay converts the slots it was given)."""
        self.slots_long = self.slots.long()

    @property
    def write_slots(self) -> torch.Tensor:
        return self.slots_long

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.runner.k_cache[layer].index_copy_(0, self.slots_long, k)
        self.runner.v_cache[layer].index_copy_(0, self.slots_long, v)

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        from verispec.kernels.paged_attention import paged_decode_attention

        k_cache, v_cache = self.runner.k_cache[layer], self.runner.v_cache[layer]
        out = paged_decode_attention(q, k_cache, v_cache, self.tables, self.lengths, scale, self.runner.kv.page_size)
        return out.view(q.shape[0], -1)


class _Captured:
    """One bucket's graphs: host metadata, each GPU's copy of it, and per segment a graph with its
    static input and output."""

    def __init__(self, rows: int, use_q4: bool, host: torch.Tensor, meta: dict[int, torch.Tensor]) -> None:
        self.rows = rows
        self.use_q4 = use_q4
        self.host = host  # pinned int32 [3 * rows + rows * max_pages]
        self.meta = meta  # GPU -> its copy
        self.inputs: list[torch.Tensor] = []  # per segment [rows, 1, hidden] fp16
        self.outputs: list[torch.Tensor] = []  # per segment; the last is a view of DecodeGraphs.logits
        self.graphs: list[torch.cuda.CUDAGraph] = []
        # Per GPU: its copy of the host buffer for the last pass has been made (the buffer may change).
        self.copied = {device: torch.cuda.Event() for device in meta}  # type: ignore[no-untyped-call]


class DecodeGraphs:
    """Captures the few-token passes of one exl2 runner and replays them."""

    def __init__(self, runner: GraphedRunner, gemm: str) -> None:
        self.runner = runner
        self.page_size = runner.kv.page_size
        self.spare_page = runner.kv.num_pages  # the cache holds one page more than the pool hands out
        # Page-table width: a sequence never holds more than the model's context plus a verify's lookahead.
        context = int(runner.model.config.max_seq_len) + GRAPH_LOOKAHEAD
        self.max_pages = min(runner.kv.num_pages, pages_for(context, self.page_size))
        self.segments = segments(runner.modules)
        devices = sorted({segment.device for segment in self.segments})
        # Per GPU one capture stream and one memory pool: a segment is captured on its own GPU's stream
        # (torch's default capture stream lives on the GPU current at its first use).
        self.streams = {device: _stream(device) for device in devices}
        self.pools = {device: torch.cuda.graph_pool_handle() for device in devices}
        # One logits buffer on the head's GPU for every bucket: the last graph of a pass writes its rows here.
        head = f"cuda:{self.segments[-1].device}"
        self.logits = torch.empty((GRAPH_BUCKETS[-1], runner.info.vocab_size), dtype=torch.float32, device=head)
        self.captured: dict[int, _Captured] = {}
        self.calibration: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        names = {"exllamav2": ["exllamav2"], "verispec": ["verispec"], "auto": ["exllamav2", "verispec"]}[gemm]
        if not runner.q4_layers:
            names = ["exllamav2"]
        for rows in GRAPH_BUCKETS:
            if rows * pages_for(CALIBRATION_CONTEXT + 1, self.page_size) > runner.kv.num_pages:
                break
            try:
                self._capture_bucket(rows, names)
            except torch.OutOfMemoryError as exc:  # larger buckets need more: stop here
                self._recover()
                log.warning("runner.cuda_graphs_out_of_memory", rows=rows, error=str(exc)[:300])
                break
        log.info(
            "runner.cuda_graphs",
            buckets=sorted(self.captured),
            verispec_rows=[rows for rows, c in sorted(self.captured.items()) if c.use_q4],
            segments=len(self.segments),
            replay_ms=self.calibration,
            seconds=round(time.perf_counter() - started, 2),
        )

    def _capture_bucket(self, rows: int, names: list[str]) -> None:
        """Captures `rows` with each GEMM and keeps the faster replay (timed when there are two). A capture
        that fails is logged and leaves the bucket to the other GEMM, or its passes to the next bucket."""
        if rows <= EXLLAMAV2_AUTOTUNED_ROWS:  # any layer may run ExLlamaV2's q-gemm, covered or not
            self._settle_autotune(rows)
        candidates: list[tuple[float, str, _Captured]] = []
        for name in names:
            try:
                captured = self._capture(rows, name == "verispec")
                seconds = 0.0
                if len(names) > 1:
                    batch = calibration_batch(self.runner.kv.new_pool(), rows)
                    assert batch is not None  # the caller checked the pool holds `rows` sequences
                    seconds = median_seconds(partial(self._replay, captured, batch), 5)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # a kernel that cannot be captured or compiled here
                self._recover()
                log.warning("runner.cuda_graph_failed", rows=rows, gemm=name, error=str(exc)[:300])
                continue
            candidates.append((seconds, name, captured))
        if not candidates:
            return
        self.captured[rows] = min(candidates, key=lambda c: c[0])[2]
        if len(candidates) > 1:
            self.calibration[str(rows)] = {name: round(1000 * t, 3) for t, name, _ in candidates}

    @torch.inference_mode()
    def _settle_autotune(self, rows: int) -> None:
        """Makes ExLlamaV2's q-gemm settle its tile choice for `rows` on every linear shape of the model,
        on scratch inputs, so that a capture of its kernels contains no autotune timing."""
        from exllamav2.ext import exllamav2_ext as ext_c
        from exllamav2.linear import ExLlamaV2Linear

        shapes: set[tuple[int, int, int]] = set()
        for module in self.runner.modules:
            for linear in [module, *getattr(module, "submodules", [])]:
                if not isinstance(linear, ExLlamaV2Linear) or linear.q_handle is None or linear.device_idx is None:
                    continue
                handle = linear.q_handle
                shape = (linear.device_idx, linear.in_features, linear.out_features)
                if shape in shapes:
                    continue
                shapes.add(shape)
                where = f"cuda:{linear.device_idx}"
                x = torch.zeros((rows, linear.in_features), dtype=torch.half, device=where)
                out = torch.empty((rows, linear.out_features), dtype=torch.half, device=where)
                for _ in range(EXLLAMAV2_AUTOTUNE_CALLS):
                    ext_c.gemm_half_q_half(x, handle, out, False)
        for device in self.streams:
            torch.cuda.synchronize(device)

    def _recover(self) -> None:
        """After a capture that failed: torch may leave the capture stream current and its memory pool
        recording (the failure is raised while the capture ends). Each GPU gets its default stream back
        and a fresh capture stream and pool."""
        for device in self.streams:
            with torch.cuda.device(device):
                torch.cuda.set_stream(torch.cuda.default_stream(device))
                with contextlib.suppress(RuntimeError):
                    torch._C._cuda_endAllocateToPool(device, self.pools[device])
                with contextlib.suppress(RuntimeError):
                    torch.cuda.synchronize(device)
        self.streams = {device: _stream(device) for device in self.streams}
        self.pools = {device: torch.cuda.graph_pool_handle() for device in self.streams}

    @torch.inference_mode()
    def _capture(self, rows: int, use_q4: bool) -> _Captured:
        runner = self.runner
        host = torch.zeros(rows * (3 + self.max_pages), dtype=torch.int32).pin_memory()
        self._pad(host, rows, 0)
        meta = {device: host.to(f"cuda:{device}") for device in self.streams}
        captured = _Captured(rows, use_q4, host, meta)
        hidden = int(runner.model.config.hidden_size)
        for n, segment in enumerate(self.segments):
            device, stream = segment.device, self.streams[segment.device]
            with torch.cuda.device(device):
                static = _StaticRows(runner, meta[device], rows, self.max_pages)
                x = torch.zeros((rows, 1, hidden), dtype=torch.half, device=f"cuda:{device}")
                last = n == len(self.segments) - 1
                body = partial(self._segment_pass, segment, x, static, use_q4, last)
                # Warm up first: kernels compile and load, the allocator sees the shapes.
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    body()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                # thread_local: only this thread's calls are checked while capturing (the server answers
                # health checks on others). No garbage collection inside: freeing an old graph or CUDA
                # memory while capturing would end the capture.
                collecting = gc.isenabled()
                gc.collect()
                gc.disable()
                try:
                    with torch.cuda.graph(graph, self.pools[device], stream, capture_error_mode="thread_local"):
                        out = body()
                finally:
                    if collecting:
                        gc.enable()
                captured.inputs.append(x)
                captured.outputs.append(out)
                captured.graphs.append(graph)
        return captured

    def _segment_pass(
        self, segment: _Segment, x: torch.Tensor, static: _StaticRows, use_q4: bool, last: bool
    ) -> torch.Tensor:
        """What one graph runs: its modules over the static rows; the last segment writes the logits."""
        static.begin()
        out = self.runner.run_modules(x, segment.start, segment.stop, lambda _device: static, use_q4)
        if not last:
            return out
        logits = self.logits[: x.shape[0]]
        logits.copy_(self.runner.logits(out))
        return logits

    def _pad(self, host: torch.Tensor, rows: int, first: int) -> None:
        """Rows first .. rows-1 of the host buffer become padding: position 0 of the spare page."""
        meta = _Meta.of(host, rows, self.max_pages)
        meta.positions[first:] = 0
        meta.slots[first:] = self.spare_page * self.page_size
        meta.lengths[first:] = 1
        meta.tables[first:, 0] = self.spare_page

    def accepts(self, batch: Sequence[BatchEntry]) -> int | None:
        """The bucket whose graphs run `batch`, or None when it launches eagerly (more rows than the largest
        bucket, or a page table wider than the captured one)."""
        if any(len(entry.pages) > self.max_pages for entry in batch):
            return None
        return bucket_for(sum(len(entry.token_ids) for entry in batch), self.captured)

    @property
    def largest(self) -> int:
        """Rows of the largest captured bucket (0: none captured)."""
        return max(self.captured, default=0)

    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor] | None:
        """The logits of `batch` from a replay, or None when no captured bucket takes it."""
        bucket = self.accepts(batch)
        return None if bucket is None else self._replay(self.captured[bucket], batch)

    @torch.inference_mode()
    def _replay(self, captured: _Captured, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        token_ids = [t for entry in batch for t in entry.token_ids]
        num_rows = len(token_ids)
        self._write_rows(captured, batch, num_rows)
        first = captured.inputs[0]
        first[:num_rows].copy_(queued_copy(self.runner.embed(token_ids), first.device))
        first[num_rows:].zero_()
        for n, (segment, graph) in enumerate(zip(self.segments, captured.graphs, strict=True)):
            with torch.cuda.device(segment.device):  # each graph replays on its own GPU's stream
                if n:  # the hidden state hops to the next GPU of the split
                    captured.inputs[n].copy_(captured.outputs[n - 1])
                graph.replay()
        wanted = logits_rows(batch)
        if len(wanted) == num_rows:  # every row: copied out, the next replay overwrites the buffer
            return split_logits(batch, self.logits[:num_rows].clone())
        index = queued_copy(torch.tensor(wanted, dtype=torch.long), self.logits.device)
        return split_logits(batch, self.logits.index_select(0, index))

    def _write_rows(self, captured: _Captured, batch: Sequence[BatchEntry], num_rows: int) -> None:
        """Fills the bucket's host metadata for `batch` and copies it to each GPU."""
        rows, size = captured.rows, self.page_size
        for event in captured.copied.values():  # the previous pass's copies have left the host buffer
            event.synchronize()
        host = captured.host
        fields = _Meta.of(host, rows, self.max_pages)
        positions: list[int] = []
        slots: list[int] = []
        row = 0
        for entry in batch:
            n, pages = len(entry.token_ids), entry.pages
            span = range(entry.start, entry.start + n)
            positions.extend(span)
            slots.extend(pages[p // size] * size + p % size for p in span)
            fields.tables[row : row + n, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            row += n
        fields.positions[:num_rows] = torch.tensor(positions, dtype=torch.int32)
        fields.slots[:num_rows] = torch.tensor(slots, dtype=torch.int32)
        fields.lengths[:num_rows] = fields.positions[:num_rows] + 1
        self._pad(host, rows, num_rows)
        for device, meta in captured.meta.items():
            with torch.cuda.device(device):
                meta.copy_(host, non_blocking=True)
                captured.copied[device].record()


def _stream(device: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]


def bucket_for(num_rows: int, captured: Container[int]) -> int | None:
    """The smallest captured bucket that holds `num_rows` rows (None: none does, or no rows)."""
    if num_rows < 1:
        return None
    return next((rows for rows in GRAPH_BUCKETS if rows >= num_rows and rows in captured), None)


def segments(modules: Sequence[Any]) -> list[_Segment]:
    """Runs of consecutive modules after the embedding on one GPU (a module of no GPU of its own, device
    index None or -1, joins the run it sits in)."""
    found: list[_Segment] = []
    device = None
    start = 1
    for index in range(1, len(modules)):
        module_device = modules[index].device_idx
        if module_device is None or module_device < 0:
            continue
        if device is not None and module_device != device:
            found.append(_Segment(device, start, index))
            start = index
        device = module_device
    if device is None:
        raise ValueError("no module after the embedding is on a GPU")
    found.append(_Segment(device, start, len(modules)))
    return found
