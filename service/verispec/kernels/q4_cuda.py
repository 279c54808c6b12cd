"""The CUDA 4-bit GEMMs for few rows (q4_cuda.cu): their launches, and which one serves a shape.

The Triton GEMM (q4_gemm.py) moves every dequantized tile through shared memory to reach the tensor cores,
which caps it near a third of the memory bandwidth. `q4_mma` keeps the weights in registers from the load
to the tensor-core MMA (ExLlamaV2's word order makes each thread's slice of an MMA tile one 16-byte load),
staged through shared memory or streamed through each warp's registers; `q4_gemv` multiplies on the CUDA
cores. Either `q4_mma` pipeline can also ask L2 for the weights a few batches past those it has loaded
(`l2_prefetch`). Which kernel serves a weight shape at a bucket of rows is measured by graph replays the
first time that pair is seen outside a CUDA-graph capture (`fastest`), never assumed.

The source is compiled by nvcc into a shared library (cuda_build.py), called through ctypes on the
current CUDA stream, so graph captures take its launches. Where it cannot be had the Triton GEMM serves
every row count, and `unavailable()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
import torch

from verispec.kernels import Q4Weights, device_index, num_sms, on_device
from verispec.kernels.cuda_build import loaded, raise_on, unavailable

log = structlog.get_logger(__name__)

MAX_MMA_ROWS = 64  # q4_mma: tiles of 8 rows, up to 8 of them
# Row counts the kernels are timed at: powers of two to 16, then q4_mma's tiles of 8 rows (3, 4, 6 and 8 of them).
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
MAX_GEMV_ROWS = 16
MAX_PARTS = 3  # products one launch takes (q4_cuda.cu's kMaxParts)
MMA_PIPELINES = (0, 2, 3, 4)  # q4_mma: 0 through shared memory, else through registers, batches ahead
REGISTER_PIPELINE = 3
L2_PREFETCH = 1  # batches of weights mma_registers_l2 asks L2 for past those loaded (bench gemm --variants)
_WAVE_FILL = 0.75  # q4_mma's grid fills the fewest waves of resident blocks it takes to at least this share
_BATCH_K = 128  # q4_mma's K positions per pipelined batch (q4_cuda.cu's kBatchK)
_MMA_BLOCK_COLUMNS = 128  # columns per q4_mma block (4 warps of 32)
_GEMV_WARPS = 4  # per block, each taking whole groups of K (kGemvWarps)
_GEMV_COLUMNS = 128  # per block (kGemvColumns)
_MAX_COLUMN_BLOCKS = 1 << 16  # arrival counts per device: N up to 8M columns
_TIMED_CALLS = 20


def covers(weights: Q4Weights, rows: int) -> bool:
    """Whether q4_mma takes these weights at this row count (groups in whole batches of 128, scale_max
    readable in 4-byte pairs); q4_gemv takes them up to MAX_GEMV_ROWS."""
    aligned = weights.scale_max is None or weights.scale_max.data_ptr() % 4 == 0
    return 1 <= rows <= MAX_MMA_ROWS and weights.group_size % _BATCH_K == 0 and aligned and unavailable() is None


def share_a_launch(weights: Sequence[Q4Weights]) -> bool:
    """Whether these products can run as the parts of one launch: at most MAX_PARTS, the same K, group size
    and layout (EXL2 or GPTQ)."""
    if not 1 <= len(weights) <= MAX_PARTS:
        return False
    first = weights[0]
    return all(
        (w.in_features, w.group_size, w.gptq) == (first.in_features, first.group_size, first.gptq) for w in weights
    )


def _column_blocks(out_features: Sequence[int], columns: int) -> int:
    return sum(-(-n // columns) for n in out_features)


def mma_slices(in_features: int, out_features: Sequence[int], sms: int, resident_blocks: int) -> int:
    """How many runs of K the register pipelines of q4_mma cut each block of columns of a launch of products
    of these widths into (a block each): enough blocks to fill the `sms` SMs' `resident_blocks` slots each, in
    the fewest waves of them that the grid fills to three quarters or more. A wave filled a little past its end
    leaves the GPU idle but for a few blocks (qkv at 1 row: 1.57 TB/s in 1.06 waves against 1.75 in 0.91,
    H100); each run also adds fp32 partial sums to write and add. By shape and pipeline only, so a row's sums
    never depend on its batch."""
    batches = in_features // _BATCH_K
    column_blocks = _column_blocks(out_features, _MMA_BLOCK_COLUMNS)
    slots = resident_blocks * sms
    for waves in itertools.count(1):
        slices = min(waves * slots // column_blocks, batches)
        if slices == batches or (slices and column_blocks * slices >= _WAVE_FILL * waves * slots):
            return slices
    raise AssertionError("unreachable")


def mma_grid(in_features: int, out_features: Sequence[int], sms: int, resident_blocks: int) -> int:
    """Blocks of the q4_mma grid through shared memory for a launch of products of these widths. Either every
    block of columns in mma_slices runs of K, a block each, or one wave of the blocks the `sms` SMs hold at once,
    each taking an even share of the launch's work (its blocks of columns times their batches of K), a share
    ending inside a block of columns going on in the next. Whichever has its busiest SM's blocks take the fewer
    batches, counting a share's move to another block of columns as one more (its pipeline drains and fills
    again): the even shares where the runs leave much of a wave idle (gate and up of a 70B layer: 448 blocks of
    columns for 528 places on an H100), the runs where they fill it (o and down: 512). By shape only, so a row's
    sums never depend on its batch."""
    batches = in_features // _BATCH_K
    column_blocks = _column_blocks(out_features, _MMA_BLOCK_COLUMNS)
    slots = resident_blocks * sms
    slices = mma_slices(in_features, out_features, sms, resident_blocks)
    by_runs = -(-column_blocks * slices // slots) * -(-batches // slices)
    units = batches * column_blocks
    shares = min(units, slots)
    return shares if -(-units // shares) + 1 <= by_runs else column_blocks * slices


@functools.cache
def most_runs(batches: int, column_blocks: int, blocks: int) -> int:
    """The most runs of K that a grid of `blocks` cuts one of `column_blocks` blocks of columns of `batches`
    batches each into (q4_cuda.cu's q4_mma_kernel: block b takes the units from b * units // blocks on)."""
    units = batches * column_blocks

    def holder(unit: int) -> int:  # the grid block whose share holds `unit`
        return ((unit + 1) * blocks - 1) // units

    return max(holder(c * batches + batches - 1) - holder(c * batches) + 1 for c in range(column_blocks))


def mma_resident_blocks(device: torch.device, pipeline: int, gptq: bool) -> int:
    """Blocks of a q4_mma pipeline per SM of `device` that its grid is cut for, as CUDA's occupancy
    calculator gives them: through shared memory, the count its kernel keeps resident at every tile of rows
    (a tile count takes fewer stages where more would cost a block); through registers, one tile's."""
    return _mma_resident_blocks(device_index(device), pipeline, gptq)


@functools.cache
def _mma_resident_blocks(index: int, pipeline: int, gptq: bool) -> int:
    library = loaded()
    blocks = ctypes.c_int(0)
    with torch.cuda.device(index):
        error = library.verispec_q4_mma_resident_blocks(int(gptq), pipeline, ctypes.byref(blocks))
    raise_on(library, "verispec_q4_mma_resident_blocks", error)
    return max(1, blocks.value)


def mma_occupancy(device: torch.device, rows: int, pipeline: int, gptq: bool) -> tuple[int, int]:
    """How the q4_mma kernel for `rows` launches on `device`: (stages through shared memory, 0 for the
    register pipelines; blocks of it one SM holds at once)."""
    library = loaded()
    stages, blocks = ctypes.c_int(0), ctypes.c_int(0)
    with torch.cuda.device(device_index(device)):
        error = library.verispec_q4_mma_occupancy(rows, int(gptq), pipeline, ctypes.byref(stages), ctypes.byref(blocks))
    raise_on(library, "verispec_q4_mma_occupancy", error)
    return stages.value, blocks.value


def gemv_slices(in_features: int, out_features: Sequence[int], group_size: int, sms: int) -> int:
    """How many runs of K a q4_gemv launch cuts the groups into: the fewest that give every one of `sms` SMs
    eight blocks, so that enough loads are in flight."""
    most = -(-in_features // (group_size * _GEMV_WARPS))  # a group per warp
    return min(most, -(-8 * sms // _column_blocks(out_features, _GEMV_COLUMNS)))


def _checked(
    xs: Sequence[torch.Tensor],
    weights: Sequence[Q4Weights],
    residuals: Sequence[torch.Tensor | None] | None,
    max_rows: int,
) -> tuple[ctypes.CDLL, list[torch.Tensor], list[torch.Tensor | None]]:
    """The library, each part's x as the kernels read it (16-byte aligned rows) and its residual, after
    checking every operand."""
    library = loaded()
    if len(xs) != len(weights) or (residuals is not None and len(residuals) != len(weights)):
        raise ValueError(f"{len(xs)} inputs, {len(weights)} weights and residuals for each: one per part")
    if not share_a_launch(weights):
        raise ValueError(f"1 to {MAX_PARTS} parts of the same K, group size and layout share a launch")
    rows = xs[0].shape[0]
    if not 1 <= rows <= max_rows or any(x.shape[0] != rows for x in xs):
        raise ValueError(f"this CUDA 4-bit kernel takes 1 to {max_rows} rows, the same in every part")
    if _column_blocks([w.out_features for w in weights], _MMA_BLOCK_COLUMNS) > _MAX_COLUMN_BLOCKS:
        raise ValueError(f"at most {_MAX_COLUMN_BLOCKS * _MMA_BLOCK_COLUMNS} output columns")
    checked = []
    for x, w, residual in zip(xs, weights, residuals or [None] * len(weights), strict=True):
        if x.shape[1] != w.in_features or x.dtype != torch.float16:
            raise ValueError(f"x must be fp16 [rows, {w.in_features}], not {x.dtype} {list(x.shape)}")
        if residual is not None and (
            residual.shape != (rows, w.out_features) or not residual.is_contiguous() or residual.dtype != x.dtype
        ):
            raise ValueError(f"residual must be contiguous fp16 [{rows}, {w.out_features}]")
        if w.scale_max is not None and w.scale_max.data_ptr() % 4:
            raise ValueError("scale_max must be 4-byte aligned (it is read in pairs)")
        aligned = x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
        checked.append(x if aligned else x.clone(memory_format=torch.contiguous_format))
    return library, checked, list(residuals) if residuals is not None else [None] * len(weights)


def _call(
    library: ctypes.CDLL,
    entry: str,
    xs: list[torch.Tensor],
    weights: Sequence[Q4Weights],
    residuals: list[torch.Tensor | None],
    slices: int,
    tail: list[int],
) -> list[torch.Tensor]:
    """One launch of the library's `entry` over every part on the current stream: their outputs, and where K
    is cut into `slices` > 1, one buffer of their fp32 partial sums and the device's arrival counts."""
    rows, device = xs[0].shape[0], xs[0].device
    outs = [torch.empty((rows, w.out_features), dtype=torch.float16, device=device) for w in weights]
    widths = [w.out_features for w in weights]
    partial = torch.empty(slices * rows * sum(widths), dtype=torch.float32, device=device) if slices > 1 else None
    arrivals = _arrivals(device) if slices > 1 else None
    pointers: list[int | None] = []
    sizes: list[int] = []
    offset = 0
    for x, w, residual, out in zip(xs, weights, residuals, outs, strict=True):
        part_partial = partial[offset:] if partial is not None else None
        offset += slices * rows * w.out_features
        for tensor in (x, w.qweight, w.scales, w.scale_max, w.zeros, residual, out, part_partial):
            pointers.append(tensor.data_ptr() if tensor is not None else None)
        sizes += [w.out_features, x.stride(0)]
    first = weights[0]
    with on_device(xs[0]):
        stream = torch.cuda.current_stream(device).cuda_stream
        error = getattr(library, entry)(
            len(weights), (ctypes.c_void_p * len(pointers))(*pointers), (ctypes.c_int * len(sizes))(*sizes),
            arrivals.data_ptr() if arrivals is not None else None, rows, first.in_features, first.group_size, slices,
            *tail, stream,
        )  # fmt: skip
    raise_on(library, entry, error)
    return outs


def q4_mma_parts(
    xs: Sequence[torch.Tensor],
    weights: Sequence[Q4Weights],
    residuals: Sequence[torch.Tensor | None] | None = None,
    slices: int | None = None,
    pipeline: int = 0,
    l2_prefetch: int = 0,
) -> list[torch.Tensor]:
    """Each x [rows, K] fp16 (columns in its weights' sorted order) @ its W (+ its residual) -> [rows, N]
    fp16, on the tensor cores, for 1 to MAX_MMA_ROWS rows and up to MAX_PARTS parts in one launch. `pipeline`
    0 stages the weights through shared memory (cp.async, the block in step) in a grid of mma_grid blocks; 2 to
    4 streams them through each warp's registers that many batches ahead (two past 16 rows), each block of
    columns cut into mma_slices runs of K. `slices` cuts every block of columns into that many runs of K
    instead, for either. `l2_prefetch` > 0 asks L2 for that many batches of weights past those. Same sums,
    same bits, for every pipeline and prefetch at the same slices."""
    if pipeline not in MMA_PIPELINES:
        raise ValueError(f"pipeline must be one of {MMA_PIPELINES}, not {pipeline}")
    if not 0 <= l2_prefetch <= 64:
        raise ValueError(f"l2_prefetch must be 0 to 64 batches, not {l2_prefetch}")
    library, checked, residual_list = _checked(xs, weights, residuals, MAX_MMA_ROWS)
    in_features = weights[0].in_features
    batches, widths = in_features // _BATCH_K, [w.out_features for w in weights]
    column_blocks = _column_blocks(widths, _MMA_BLOCK_COLUMNS)
    device = checked[0].device
    if slices is None and pipeline == 0:
        blocks = mma_grid(in_features, widths, num_sms(device), mma_resident_blocks(device, 0, weights[0].gptq))
    else:
        if slices is None:
            resident = mma_resident_blocks(device, pipeline, weights[0].gptq)
            slices = mma_slices(in_features, widths, num_sms(device), resident)
        blocks = column_blocks * max(1, min(slices, batches))
    # Room for the partial sums: the most runs of K of one block of columns.
    runs = most_runs(batches, column_blocks, blocks) if pipeline == 0 else blocks // column_blocks
    tail = [blocks, pipeline, l2_prefetch]
    return _call(library, "verispec_q4_mma", checked, weights, residual_list, runs, tail)


def q4_gemv_parts(
    xs: Sequence[torch.Tensor],
    weights: Sequence[Q4Weights],
    residuals: Sequence[torch.Tensor | None] | None = None,
    slices: int | None = None,
    prefetch: bool = True,
) -> list[torch.Tensor]:
    """The same products on the CUDA cores, for 1 to MAX_GEMV_ROWS rows; `prefetch` loads each chunk of
    weights while the one before it is multiplied."""
    library, checked, residual_list = _checked(xs, weights, residuals, MAX_GEMV_ROWS)
    first = weights[0]
    if slices is None:
        widths = [w.out_features for w in weights]
        slices = gemv_slices(first.in_features, widths, first.group_size, num_sms(checked[0].device))
    groups = first.in_features // first.group_size
    per_warp = -(-groups // (slices * _GEMV_WARPS))  # each warp takes a run of whole groups
    slices = -(-groups // (per_warp * _GEMV_WARPS))
    return _call(library, "verispec_q4_gemv", checked, weights, residual_list, slices, [per_warp, int(prefetch)])


def q4_mma(
    x: torch.Tensor,
    weights: Q4Weights,
    residual: torch.Tensor | None = None,
    slices: int | None = None,
    pipeline: int = 0,
    l2_prefetch: int = 0,
) -> torch.Tensor:
    """q4_mma_parts for one product."""
    return q4_mma_parts([x], [weights], [residual], slices, pipeline, l2_prefetch)[0]


def q4_gemv(
    x: torch.Tensor,
    weights: Q4Weights,
    residual: torch.Tensor | None = None,
    slices: int | None = None,
    prefetch: bool = True,
) -> torch.Tensor:
    """q4_gemv_parts for one product."""
    return q4_gemv_parts([x], [weights], [residual], slices, prefetch)[0]


class Kernel(Protocol):
    """A CUDA kernel's call: each x @ its W (+ its residual) in one launch, K cut into `slices` (None: by
    the shape)."""

    def __call__(
        self,
        xs: Sequence[torch.Tensor],
        weights: Sequence[Q4Weights],
        residuals: Sequence[torch.Tensor | None] | None = None,
        slices: int | None = None,
    ) -> list[torch.Tensor]: ...


# The CUDA kernels by the name `fastest` chooses them by. L2 prefetch changes no bits; it helps the register
# pipeline at few rows on some shapes and costs it at 16 on others, and never helped the staged one (H100).
KERNELS: dict[str, Kernel] = {
    "mma": q4_mma_parts,
    "mma_registers": functools.partial(q4_mma_parts, pipeline=REGISTER_PIPELINE),
    "mma_registers_l2": functools.partial(q4_mma_parts, pipeline=REGISTER_PIPELINE, l2_prefetch=L2_PREFETCH),
    "gemv": q4_gemv_parts,
}
MAX_ROWS = {name: MAX_GEMV_ROWS if name == "gemv" else MAX_MMA_ROWS for name in KERNELS}

_CHOICE: dict[tuple[int, int, tuple[int, ...], int, bool, int], str] = {}


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up in fp16, kept finite, in one kernel: the bits of torch's F.silu, mul_ and clamp_ to
    +-65504 (three kernels)."""
    library = loaded()
    if gate.shape != up.shape or gate.dtype != torch.float16 or up.dtype != torch.float16:
        shapes = f"{gate.dtype} {list(gate.shape)} and {up.dtype} {list(up.shape)}"
        raise ValueError(f"gate and up must be fp16 of one shape, not {shapes}")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    with on_device(gate):
        stream = torch.cuda.current_stream(gate.device).cuda_stream
        error = library.verispec_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), stream)
    raise_on(library, "verispec_silu_mul", error)
    return out


def rope_store(
    q: torch.Tensor,  # [rows, heads, head_dim] fp16, rotated in place
    k: torch.Tensor,  # [rows, kv_heads, head_dim] fp16, rotated in place
    v: torch.Tensor,  # [rows, kv_heads, head_dim] fp16
    sin: torch.Tensor,  # [..., positions, rotary] fp16 (ExLlamaV2's tables)
    cos: torch.Tensor,
    positions: torch.Tensor,  # [rows] int32
    slots: torch.Tensor,  # [rows] int64: where each row's key and value go
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] fp16
    v_cache: torch.Tensor,
    neox: bool,
) -> None:
    """RoPE on q and k at each row's position with the bits of ExLlamaV2's rope_ (NeoX or GPT-J pairs), then k
    and v into their cache slots: one kernel for the two rope_ calls and two index copies of a layer."""
    library = loaded()
    rows, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    rotary = cos.shape[-1]
    tensors = {"q": q, "k": k, "v": v, "sin": sin, "cos": cos, "k_cache": k_cache, "v_cache": v_cache}
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float16 or not tensor.is_contiguous() or tensor.device != q.device:
            raise ValueError(f"{name} must be a contiguous fp16 tensor on {q.device}")
    if k.shape != (rows, kv_heads, head_dim) or v.shape != k.shape or k_cache.shape[1:] != k.shape[1:]:
        raise ValueError(f"k {list(k.shape)}, v {list(v.shape)} and k_cache {list(k_cache.shape)} do not match q")
    if head_dim % 8 or rotary > head_dim or rotary % (4 if neox else 2) or sin.shape != cos.shape:
        raise ValueError(f"rotary dims {rotary} do not fit head_dim {head_dim} (NeoX: {neox})")
    if positions.dtype != torch.int32 or slots.dtype != torch.int64 or len(positions) != rows or len(slots) != rows:
        raise ValueError("positions must be int32 and slots int64, one per row")
    with on_device(q):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        error = library.verispec_rope_store(
            *(t.data_ptr() for t in (q, k, v, sin, cos, positions, slots, k_cache, v_cache)),
            rows, heads, kv_heads, head_dim, rotary, int(neox), stream,
        )  # fmt: skip
    raise_on(library, "verispec_rope_store", error)


def row_bucket(rows: int) -> int:
    """The smallest of ROW_BUCKETS that holds `rows`: the kernels are compiled per such bound, so a bucket's
    rows all cost about what its largest does."""
    return next(bucket for bucket in ROW_BUCKETS if bucket >= rows)


def fastest(weights: Sequence[Q4Weights], rows: int, triton: Callable[[Sequence[torch.Tensor]], object]) -> str:
    """A name in KERNELS, or "triton": the fastest kernel for these parts (one launch of them) at `rows`'
    bucket of rows, timed once per process at the bucket's size (GPU time of 20 calls replayed from a graph,
    the median of three), so that a shape is timed at nine buckets at most, all in the runner's start-up
    calibration; never once per ragged row count while serving. Inside a capture nothing can be timed: a pair
    not yet measured stays on Triton there (the runner's warm-up pass before each capture measures it)."""
    first = weights[0]
    device = first.qweight.device
    bucket = row_bucket(rows)
    widths = tuple(w.out_features for w in weights)
    key = (device.index or 0, first.in_features, widths, first.group_size, first.gptq, bucket)
    if key in _CHOICE:
        return _CHOICE[key]
    if torch.cuda.is_current_stream_capturing():
        return "triton"
    xs = [torch.randn((bucket, first.in_features), dtype=torch.float16, device=device)] * len(weights)
    candidates: dict[str, Callable[[], object]] = {
        name: functools.partial(run, xs, weights) for name, run in KERNELS.items() if bucket <= MAX_ROWS[name]
    }
    candidates["triton"] = lambda: triton(xs)
    times = {name: _median_ms(call, device) for name, call in candidates.items()}
    _CHOICE[key] = min(times, key=lambda name: times[name])
    log.debug("kernels.q4_chosen", shape=key[1:3], rows=bucket, choice=_CHOICE[key], ms=times)
    return _CHOICE[key]


def _median_ms(call: Callable[[], object], device: torch.device) -> float:
    return 1000 * sorted(replay_seconds(call, _TIMED_CALLS, 3, device))[1]


def replay_seconds(call: Callable[[], object], iterations: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call on the GPU alone, as a CUDA-graph pass sees it: `iterations` calls captured in one
    graph (after a call off the capture: compiled, loaded, the allocator primed), replayed `repeats`
    times. Launched from Python instead, a small GEMM is timed by its launch, not by its kernels."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()  # freeing an old graph while capturing would end the capture
        gc.disable()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                for _ in range(iterations):
                    call()
        finally:
            if collecting:
                gc.enable()
        graph.replay()
        torch.cuda.synchronize(device)
        seconds = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            seconds.append(float(start.elapsed_time(end)) / 1000 / iterations)
    return seconds


_ARRIVALS: dict[int, torch.Tensor] = {}


def _arrivals(device: torch.device) -> torch.Tensor:
    """The device's arrival counts (one per block of 128 columns), zero between launches: the last block of
    a column range to finish adds the slices of K (q4_cuda.cu's finish_slices). One buffer for every launch
    on the device, so its launches must not overlap in time, as those of one stream never do. Made on the
    device's first launch, which must not be inside a graph capture (the zeros would only be written when the
    graph replays); the runner's warm-up and `fastest` launch every kernel eagerly first."""
    index = device_index(device)
    if index not in _ARRIVALS:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the CUDA 4-bit kernels' first launch on a device cannot be inside a graph capture")
        _ARRIVALS[index] = torch.zeros(_MAX_COLUMN_BLOCKS, dtype=torch.int32, device=torch.device("cuda", index))
    return _ARRIVALS[index]
