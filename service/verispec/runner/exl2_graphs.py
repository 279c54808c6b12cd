"""CUDA graphs of the exl2 runner's few-token passes: decode, verify, draft steps and short prompts.

A 70B decode pass launches ~1,500 kernels; launched from Python they cost more host time than the GPU
spends running them. So a pass of up to 64 rows whose entries each bring at most GRAPH_MAX_NEW_TOKENS
new tokens runs as the replay of a graph captured at start-up for the smallest row bucket that holds it.
Before a replay the host writes into static buffers the pass's token embeddings and, per row, its
position, the slot its key and value go to, how many keys it sees and its sequence's page table; each
GPU of the split replays its own graph over its layers (the hidden state hops between them). Rows that
pad a bucket sit at position 0 of the spare page past the pool (runner/exl2.py), so they write and read
nothing of a sequence. Attention is the Triton paged kernel (kernels/paged_attention.py), whose grid
depends on the number of rows only, so one capture serves every context length.

Each bucket is captured with ExLlamaV2's fused kernels and, where the Triton 4-bit GEMM covers the
layers, with it; `--exl2-gemm auto` keeps the faster replay per bucket (timed at capture). ExLlamaV2's
own `forward` cannot be captured (it switches streams); its module kernels can.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import structlog
import torch

from verispec.kernels import MAX_Q4_ROWS
from verispec.kv.pages import pages_for
from verispec.runner.base import (
    CALIBRATION_CONTEXT,
    BatchEntry,
    KVLayout,
    calibration_batch,
    logits_rows,
    median_seconds,
    split_logits,
)

log = structlog.get_logger(__name__)

GRAPH_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)  # rows a captured pass holds
GRAPH_MAX_NEW_TOKENS = 16  # new tokens of one entry in a captured pass; longer prefill chunks launch eagerly
# ExLlamaV2's q-gemm autotunes each (rows, in, out) shape over its first 200 calls, timing each with CUDA
# events it waits on; call 201 settles it. A capture cannot contain those waits.
EXLLAMAV2_AUTOTUNE_CALLS = 201
assert GRAPH_BUCKETS[-1] <= MAX_Q4_ROWS


class GraphedRunner(Protocol):
    """What the graphs need of the runner whose passes they capture (runner/exl2.py's Exl2Runner)."""

    modules: list[Any]  # ExLlamaV2's modules: the embedding, then layers, final norm and head
    model: Any  # the ExLlamaV2 model (its config)
    kv: KVLayout
    q4_layers: dict[int, Any]  # module index -> the Triton GEMM's weights
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
    """Why this runner's passes cannot be captured, or "" when they can."""
    try:
        from verispec.kernels.paged_attention import supports
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    return supports(runner.heads, runner.kv_heads, runner.head_dim)


@dataclass(frozen=True)
class _Segment:
    """Modules start .. stop-1, all on one GPU: one graph each."""

    device: int
    start: int
    stop: int


class _StaticRows:
    """The rows of a captured pass on one GPU: views into that GPU's copy of the host's metadata
    (positions | slots | lengths | page tables, int32), which every replay reads."""

    def __init__(self, runner: GraphedRunner, meta: torch.Tensor, rows: int, max_pages: int) -> None:
        self.runner = runner
        self.positions_int32 = meta[:rows]
        self.slots = meta[rows : 2 * rows]
        self.lengths = meta[2 * rows : 3 * rows]
        self.tables = meta[3 * rows :].view(rows, max_pages)
        self.slots_long = self.slots.long()  # recomputed inside each graph (see begin)

    def begin(self) -> None:
        """Inside a capture: the write slots as the int64 index index_copy_ takes, once per graph."""
        self.slots_long = self.slots.long()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from verispec.kernels.paged_attention import paged_decode_attention

        k_cache, v_cache = self.runner.k_cache[layer], self.runner.v_cache[layer]
        k_cache.index_copy_(0, self.slots_long, k)
        v_cache.index_copy_(0, self.slots_long, v)
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
        self.outputs: list[torch.Tensor] = []  # per segment; the last is the logits [rows, vocab] float32
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
        context = int(runner.model.config.max_seq_len) + GRAPH_MAX_NEW_TOKENS
        self.max_pages = min(runner.kv.num_pages, pages_for(context, self.page_size))
        self.segments = segments(runner.modules)
        self.pools = {segment.device: torch.cuda.graph_pool_handle() for segment in self.segments}
        self.captured: dict[int, _Captured] = {}
        self.calibration: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        variants = {"exllamav2": [False], "triton": [True], "auto": [False, True]}[gemm]
        if not runner.q4_layers:
            variants = [False]
        for rows in GRAPH_BUCKETS:
            if rows * pages_for(CALIBRATION_CONTEXT + 1, self.page_size) > runner.kv.num_pages:
                break
            self._capture_bucket(rows, variants)
        log.info(
            "runner.cuda_graphs",
            buckets=sorted(self.captured),
            triton_rows=[rows for rows, c in sorted(self.captured.items()) if c.use_q4],
            segments=len(self.segments),
            replay_ms=self.calibration,
            seconds=round(time.perf_counter() - started, 2),
        )

    def _capture_bucket(self, rows: int, variants: list[bool]) -> None:
        """Captures `rows` with each GEMM variant; keeps the fastest replay (a failed capture is logged and
        leaves the bucket to the variants that did capture, or to eager passes)."""
        seconds: dict[str, float] = {}
        best: tuple[float, _Captured] | None = None
        for use_q4 in variants:
            name = "triton" if use_q4 else "exllamav2"
            if not use_q4:
                self._settle_autotune(rows)
            try:
                captured = self._capture(rows, use_q4)
            except RuntimeError as exc:
                self._recover()
                log.warning("runner.cuda_graph_failed", rows=rows, gemm=name, error=str(exc)[:300])
                continue
            if len(variants) == 1:
                self.captured[rows] = captured
                return
            self.captured[rows] = captured  # forward() replays it for the timing
            batch = calibration_batch(self.runner.kv.new_pool(), rows)
            assert batch is not None  # the caller checked the pool holds `rows` sequences
            seconds[name] = median_seconds(partial(self.forward, batch), 5)
            if best is None or seconds[name] < best[0]:
                best = (seconds[name], captured)
        if best is None:
            self.captured.pop(rows, None)
            return
        self.captured[rows] = best[1]
        self.calibration[str(rows)] = {name: round(1000 * t, 3) for name, t in seconds.items()}

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
                device = f"cuda:{linear.device_idx}"
                x = torch.zeros((rows, linear.in_features), dtype=torch.half, device=device)
                out = torch.empty((rows, linear.out_features), dtype=torch.half, device=device)
                for _ in range(EXLLAMAV2_AUTOTUNE_CALLS):
                    ext_c.gemm_half_q_half(x, handle, out, False)
        torch.cuda.synchronize()

    def _recover(self) -> None:
        """After a capture that failed: torch leaves the capture's stream current and its memory pool
        recording (the failure is raised while the capture ends), so put both back and take fresh pools."""
        for segment in self.segments:
            with torch.cuda.device(segment.device):
                torch.cuda.set_stream(torch.cuda.default_stream())
                with contextlib.suppress(RuntimeError):
                    torch._C._cuda_endAllocateToPool(segment.device, self.pools[segment.device])
                torch.cuda.synchronize()
        self.pools = {segment.device: torch.cuda.graph_pool_handle() for segment in self.segments}

    @torch.inference_mode()
    def _capture(self, rows: int, use_q4: bool) -> _Captured:
        runner = self.runner
        host = torch.zeros(rows * (3 + self.max_pages), dtype=torch.int32).pin_memory()
        self._pad(host, rows, 0)
        meta = {segment.device: host.to(f"cuda:{segment.device}") for segment in self.segments}
        captured = _Captured(rows, use_q4, host, meta)
        hidden = int(runner.model.config.hidden_size)
        for n, segment in enumerate(self.segments):
            with torch.cuda.device(segment.device):
                static = _StaticRows(runner, meta[segment.device], rows, self.max_pages)
                x = torch.zeros((rows, 1, hidden), dtype=torch.half, device=f"cuda:{segment.device}")
                body = partial(self._segment_pass, segment, x, static, use_q4, n == len(self.segments) - 1)
                # Warm up on a side stream first: kernels compile and load, the allocator sees the shapes.
                side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    body()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: only this thread's calls are checked while capturing (the server answers
                # health checks on others). No garbage collection inside: freeing an old graph or CUDA
                # memory while capturing would end the capture.
                collecting = gc.isenabled()
                gc.collect()
                gc.disable()
                try:
                    with torch.cuda.graph(graph, pool=self.pools[segment.device], capture_error_mode="thread_local"):
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
        """What one graph runs: its modules over the static rows; the last segment ends in logits."""
        static.begin()
        out = self.runner.run_modules(x, segment.start, segment.stop, lambda _device: static, use_q4)
        return self.runner.logits(out) if last else out

    def _pad(self, host: torch.Tensor, rows: int, first: int) -> None:
        """Rows first .. rows-1 of the host buffer become padding: position 0 of the spare page."""
        host[first:rows] = 0
        host[rows + first : 2 * rows] = self.spare_page * self.page_size
        host[2 * rows + first : 3 * rows] = 1
        host[3 * rows :].view(rows, self.max_pages)[first:, 0] = self.spare_page

    def accepts(self, batch: Sequence[BatchEntry]) -> int | None:
        """The bucket whose graphs run `batch`, or None when it launches eagerly."""
        num_rows = 0
        for entry in batch:
            n = len(entry.token_ids)
            if n > GRAPH_MAX_NEW_TOKENS or len(entry.pages) > self.max_pages:
                return None
            num_rows += n
        return bucket_for(num_rows, self.captured)

    @torch.inference_mode()
    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor] | None:
        """The logits of `batch` from a replay, or None when no captured bucket takes it."""
        bucket = self.accepts(batch)
        if bucket is None:
            return None
        captured = self.captured[bucket]
        token_ids = [t for entry in batch for t in entry.token_ids]
        num_rows = len(token_ids)
        self._write_rows(captured, batch, num_rows)
        first = captured.inputs[0]
        first[:num_rows].copy_(self.runner.embed(token_ids))
        first[num_rows:].zero_()
        for n, graph in enumerate(captured.graphs):
            if n:  # the hidden state hops to the next GPU of the split
                captured.inputs[n].copy_(captured.outputs[n - 1])
            graph.replay()
        logits = captured.outputs[-1]
        wanted = logits_rows(batch)
        if len(wanted) == num_rows:  # every row: copied out, the next replay overwrites the static output
            return split_logits(batch, logits[:num_rows].clone())
        index = torch.tensor(wanted, dtype=torch.long, device=logits.device)
        return split_logits(batch, logits.index_select(0, index))

    def _write_rows(self, captured: _Captured, batch: Sequence[BatchEntry], num_rows: int) -> None:
        """Fills the bucket's host metadata for `batch` and copies it to each GPU."""
        rows, size = captured.rows, self.page_size
        for event in captured.copied.values():  # the previous pass's copies have left the host buffer
            event.synchronize()
        host = captured.host
        tables = host[3 * rows :].view(rows, self.max_pages)
        positions: list[int] = []
        slots: list[int] = []
        row = 0
        for entry in batch:
            n, pages = len(entry.token_ids), entry.pages
            span = range(entry.start, entry.start + n)
            positions.extend(span)
            slots.extend(pages[p // size] * size + p % size for p in span)
            tables[row : row + n, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            row += n
        values = torch.tensor(positions + slots + [p + 1 for p in positions], dtype=torch.int32)
        host[:num_rows] = values[:num_rows]
        host[rows : rows + num_rows] = values[num_rows : 2 * num_rows]
        host[2 * rows : 2 * rows + num_rows] = values[2 * num_rows :]
        self._pad(host, rows, num_rows)
        for device, meta in captured.meta.items():
            with torch.cuda.device(device):
                meta.copy_(host, non_blocking=True)
                captured.copied[device].record()


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
