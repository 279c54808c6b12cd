"""`verispec bench gemm`: effective weight bandwidth of 4-bit GEMMs at decode and verify row counts.

On the 70B shapes (qkv 8192x10240, o 8192x8192, gate/up 8192x28672, down 28672x8192) and m = 1, 2, 4,
8, 16, 32 rows it times, in one run: verispec's Triton kernel (its default tiles, and the best of a
sweep of tiles), its CUDA kernels (tensor-core `q4_mma`, CUDA-core `q4_gemv` up to 16 rows) and
`q4_matmul` (the fastest, as the runner calls it), ExLlamaV2's q-gemm on the same random EXL2 tensors,
torch's int4 kernel (`aten._weight_int4pack_mm`) and fp16 cuBLAS as the bandwidth reference. Effective bandwidth is the
bytes of the weights (4 bits each, 16 for fp16) over the GPU time of one call: `--iterations` calls
captured in a CUDA graph and replayed `--repeats` times (median, min, max); the time per call with
Python launching each one is reported beside it (`us_with_launch`). The device's copy bandwidth is
measured in the same run.

Light at import: torch, triton and exllamav2 are imported by `run_gemm`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from verispec.tools.common import concurrency_list

SHAPES_70B = {"qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 28672), "down": (28672, 8192)}
ROWS = (1, 2, 4, 8, 16, 32)


def _sweep() -> list[Any]:
    """The tiles and variants tried at m <= 16 (one compiled row tile)."""
    from verispec.kernels.q4_gemm import LaunchConfig

    return [
        LaunchConfig(n, 128, s, w, 3, half2, swap, interleave)
        for n in (128, 256)
        for s in (4, 8, 16)
        for w in (4, 8)
        for half2 in (False, True)
        for swap, interleave in ((False, False), (True, False), (False, True))
    ]


def _variants(config: Any) -> dict[str, Any]:
    """The kernel's dequantize and MMA variants at one launch's tiles, by name."""
    return {
        "half2": replace(config, half2=True),
        "swap_ab": replace(config, swap_ab=True),
        "interleave": replace(config, interleave=True),
        "interleave_half2": replace(config, interleave=True, half2=True),
    }


def add_gemm_arguments(kinds: Any) -> None:
    gemm = kinds.add_parser(
        "gemm",
        help="weight bandwidth of verispec's 4-bit GEMMs vs ExLlamaV2, torch int4 and fp16 cuBLAS (CUDA)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gemm.add_argument("--rows", type=concurrency_list, default=ROWS, help="row counts m, comma-separated")
    gemm.add_argument("--iterations", type=int, default=50, help="calls per timing")
    gemm.add_argument("--repeats", type=int, default=5, help="timings per point; the median is reported")
    gemm.add_argument("--no-sweep", action="store_true", help="time only the Triton kernel's default tiles")
    gemm.add_argument(
        "--variants",
        action="store_true",
        help="instead of the Triton tile sweep, time its dequantize/MMA variants at the default tiles, and the CUDA "
        "kernels at each register-pipeline depth, L2 prefetch distance and count of slices of K (every m)",
    )
    gemm.add_argument("--output", type=Path, default=None, help="also write the JSON here")


def _progress(message: str) -> None:
    print(f"[bench gemm] {message}", file=sys.stderr, flush=True)


def _event_seconds(run: Callable[[], object], per_run: int, repeats: int) -> dict[str, float]:
    """Seconds per call when `run` makes `per_run` calls, by CUDA events: median, min and max of `repeats`."""
    import torch

    seconds = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000 / per_run)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def _time(call: Callable[[], object], iterations: int, repeats: int) -> dict[str, float]:
    """Seconds per call, launches included: `iterations` back-to-back calls per timing."""
    import torch

    call()
    torch.cuda.synchronize()

    def run() -> None:
        for _ in range(iterations):
            call()

    return _event_seconds(run, iterations, repeats)


def _time_graph(call: Callable[[], object], iterations: int, repeats: int) -> dict[str, float]:
    """Seconds per call on the GPU alone: `iterations` calls captured in one CUDA graph, replayed."""
    import torch

    from verispec.kernels.q4_cuda import replay_seconds

    seconds = replay_seconds(call, iterations, repeats, torch.device("cuda", torch.cuda.current_device()))
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def _bandwidth(weight_bytes: int, seconds: dict[str, float]) -> dict[str, float]:
    """TB/s from seconds: the median's, and the spread (the fastest timing gives the max)."""
    return {
        "tb_per_s": round(weight_bytes / seconds["median"] / 1e12, 3),
        "tb_per_s_min": round(weight_bytes / seconds["max"] / 1e12, 3),
        "tb_per_s_max": round(weight_bytes / seconds["min"] / 1e12, 3),
        "us": round(seconds["median"] * 1e6, 2),
    }


def _random_exl2(k: int, n: int, generator: Any) -> dict[str, Any]:
    """EXL2 tensors of one 4-bit linear on the GPU, as `verispec synth` writes them."""
    import torch

    from verispec.tools.synth import exl2_linear

    tensors = exl2_linear(k, n, 4, generator, "cuda")
    tensors["q_perm"] = torch.argsort(tensors["q_invperm"]).to(torch.int16)
    tensors["q_invperm"] = tensors["q_invperm"].to(torch.int16)
    return {name: tensor.cuda() for name, tensor in tensors.items()}


@dataclass(frozen=True)
class _Operands:
    """One shape's weights in every kernel's format (random values: only the time is measured)."""

    k: int
    n: int
    q4: Any  # Q4Weights over ExLlamaV2's tensors
    exllamav2_handle: int
    fp16: Any  # [k, n]
    int4: Any  # torch's packed int4
    scales_zeros: Any  # torch int4's [k/128, n, 2] bf16


def _operands(k: int, n: int) -> _Operands:
    import torch
    from exllamav2.ext import make_q_matrix

    from verispec.kernels import Q4Weights

    generator = torch.Generator(device="cuda").manual_seed(0)
    tensors = _random_exl2(k, n, generator)
    temp_dq = torch.empty(k * n, dtype=torch.half, device="cuda")
    handle = make_q_matrix(tensors, temp_dq)
    _TEMP.append((tensors, temp_dq))  # ExLlamaV2's QMatrix points into these: keep them alive
    q4 = Q4Weights(tensors["q_weight"], tensors["q_scale"], tensors["q_scale_max"], None, None, 128, k, n)
    unpacked = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    return _Operands(
        k=k,
        n=n,
        q4=q4,
        exllamav2_handle=handle,
        fp16=torch.randn((k, n), dtype=torch.half, device="cuda") * 0.01,
        int4=torch._convert_weight_to_int4pack(unpacked, 8),
        scales_zeros=torch.rand((k // 128, n, 2), dtype=torch.bfloat16, device="cuda"),
    )


_TEMP: list[object] = []


def _row_point(ops: _Operands, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every kernel at m rows of one shape."""
    import torch
    from exllamav2.ext import exllamav2_ext as ext_c

    from verispec.kernels import num_sms
    from verispec.kernels.q4_gemm import LaunchConfig, default_config, q4_matmul
    from verispec.runner.exl2_graphs import EXLLAMAV2_AUTOTUNE_CALLS

    x = torch.randn((m, ops.k), dtype=torch.half, device="cuda")
    x_bf16 = x.to(torch.bfloat16)
    out = torch.empty((m, ops.n), dtype=torch.half, device="cuda")
    q4_bytes, fp16_bytes = ops.k * ops.n // 2, ops.k * ops.n * 2
    config = default_config(ops.q4, num_sms(x.device))

    def timed(call: Callable[[], object], repeats: int = args.repeats) -> dict[str, Any]:
        """GPU time from a graph replay (the kernel's own bandwidth), and the time with Python launches."""
        launched_us = round(_time(call, args.iterations, repeats)["median"] * 1e6, 2)
        return {"graph": _time_graph(call, args.iterations, repeats), "launched_us": launched_us}

    def settled(call: Callable[[], object]) -> Callable[[], object]:
        """ExLlamaV2's q-gemm autotunes a shape over its first calls with host waits a graph cannot hold:
        those calls are made here, whatever --iterations and --repeats are."""
        for _ in range(EXLLAMAV2_AUTOTUNE_CALLS):
            call()
        return call

    def kernel(weight_bytes: int, call: Callable[[], object]) -> dict[str, Any]:
        timing = timed(call)
        return {**_bandwidth(weight_bytes, timing["graph"]), "us_with_launch": timing["launched_us"]}

    point: dict[str, Any] = {
        "triton": kernel(q4_bytes, lambda: q4_matmul(x, ops.q4, config=config)),
        "triton_config": asdict(config),
        "exllamav2": kernel(q4_bytes, settled(lambda: ext_c.gemm_half_q_half(x, ops.exllamav2_handle, out, False))),
        "torch_int4": kernel(q4_bytes, lambda: torch._weight_int4pack_mm(x_bf16, ops.int4, 128, ops.scales_zeros)),
        "fp16_cublas": kernel(fp16_bytes, lambda: x @ ops.fp16),
    }
    point.update(_cuda_points(ops, x, m, args.variants, kernel))
    if args.variants:
        for name, variant in _variants(config).items():
            point[f"triton_{name}"] = kernel(q4_bytes, partial(q4_matmul, x, ops.q4, config=variant))
        return point
    if args.no_sweep or m > 16:
        return point
    best: tuple[float, LaunchConfig] | None = None
    for tiles in _sweep():
        if ops.k % (tiles.block_k * tiles.split_k) or ops.k // tiles.split_k < tiles.block_k:
            continue
        try:
            seconds = _time_graph(partial(q4_matmul, x, ops.q4, config=tiles), args.iterations, 3)
        except Exception as exc:  # a variant that does not compile here is reported, not fatal
            point.setdefault("sweep_errors", {})[str(asdict(tiles))] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if best is None or seconds["median"] < best[0]:
            best = (seconds["median"], tiles)
    if best is not None:
        fastest = {"median": best[0], "min": best[0], "max": best[0]}
        point["triton_best_of_sweep"] = {**_bandwidth(q4_bytes, fastest), "config": asdict(best[1])}
    return point


def _cuda_points(
    ops: _Operands, x: Any, m: int, sweep: bool, kernel: Callable[[int, Callable[[], object]], dict[str, Any]]
) -> dict[str, Any]:
    """Each CUDA kernel `q4_matmul` can choose (q4_cuda.KERNELS) at its default cut of K, with the grid (through
    shared memory) or slices (through registers) and the resident blocks per SM that cut comes from, and the
    blocks (and stages) its kernel for m holds; with --variants also each count of slices, each
    register-pipeline depth, each distance of L2 prefetch and the CUDA-core kernel without prefetching. And
    q4_matmul as the runner calls it (the fastest kernel at m)."""
    import torch

    from verispec.kernels import cuda_build, num_sms, q4_cuda
    from verispec.kernels.q4_gemm import q4_matmul

    q4_bytes = ops.k * ops.n // 2
    if not q4_cuda.covers(ops.q4, m):
        reason = cuda_build.unavailable()
        return {"cuda_unavailable": reason} if reason else {}
    device = torch.device("cuda", 0)
    point: dict[str, Any] = {"q4_matmul": kernel(q4_bytes, lambda: q4_matmul(x, ops.q4))}
    kernels = {name: run for name, run in q4_cuda.KERNELS.items() if m <= q4_cuda.MAX_ROWS[name]}
    for name, run in kernels.items():
        point[f"cuda_{name}"] = kernel(q4_bytes, partial(run, [x], [ops.q4]))
    pipelines = {"mma": 0, "mma_registers": q4_cuda.REGISTER_PIPELINE}  # the q4_mma pipelines by kernel name
    for name, pipeline in pipelines.items():
        resident = q4_cuda.mma_resident_blocks(device, pipeline, ops.q4.gptq)
        point[f"cuda_{name}_resident_blocks"] = resident
        if pipeline == 0:  # one wave of blocks, each an even share of the work
            point[f"cuda_{name}_grid_blocks"] = q4_cuda.mma_grid(ops.k, [ops.n], num_sms(device), resident)
        else:
            point[f"cuda_{name}_slices"] = q4_cuda.mma_slices(ops.k, [ops.n], num_sms(device), resident)
        stages, blocks = q4_cuda.mma_occupancy(device, m, pipeline, ops.q4.gptq)
        point[f"cuda_{name}_blocks_at_m"] = blocks
        if stages:
            point[f"cuda_{name}_stages_at_m"] = stages
    if "gemv" in kernels:
        point["cuda_gemv_slices"] = q4_cuda.gemv_slices(ops.k, [ops.n], ops.q4.group_size, num_sms(device))
    if not sweep:
        return point
    if "gemv" in kernels:
        point["cuda_gemv_no_prefetch"] = kernel(q4_bytes, partial(q4_cuda.q4_gemv, x, ops.q4, prefetch=False))
    for depth in q4_cuda.MMA_PIPELINES[1:]:
        point[f"cuda_mma_registers_{depth}"] = kernel(q4_bytes, partial(q4_cuda.q4_mma, x, ops.q4, pipeline=depth))
    for name, pipeline in pipelines.items():
        point[f"cuda_{name}_by_l2_prefetch"] = {
            str(ahead): kernel(q4_bytes, partial(q4_cuda.q4_mma, x, ops.q4, pipeline=pipeline, l2_prefetch=ahead))[
                "tb_per_s"
            ]
            for ahead in (1, 2, 4, 8, 16)
        }
    for name, run in kernels.items():
        point[f"cuda_{name}_by_slices"] = {
            str(slices): kernel(q4_bytes, partial(run, [x], [ops.q4], None, slices))["tb_per_s"]
            for slices in (1, 2, 3, 4, 6, 8, 12, 16, 32)
        }
    return point


def copy_bandwidth(repeats: int) -> float:
    """The first GPU's copy bandwidth in TB/s (a 1 GiB device-to-device copy, read + write), the median of
    `repeats` timings of 10 copies."""
    import torch

    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = _time(lambda: target.copy_(source), 10, repeats)
    return round(2 * source.numel() / seconds["median"] / 1e12, 3)


def run_gemm(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from verispec.errors import ModelLoadError

    if not torch.cuda.is_available():
        raise ModelLoadError("bench gemm needs a CUDA device, and none is visible")
    rows = list(args.rows)
    result: dict[str, Any] = {
        "benchmark": "gemm",
        "device": torch.cuda.get_device_name(0),
        "copy_tb_per_s": copy_bandwidth(args.repeats),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "shapes": {},
    }
    for name, (k, n) in SHAPES_70B.items():
        ops = _operands(k, n)
        points = {}
        for m in rows:
            _progress(f"{name} {k}x{n}, m={m}")
            points[str(m)] = _row_point(ops, m, args)
        result["shapes"][name] = {"k": k, "n": n, "points": points}
        del ops
    result["summary"] = _summary(result, rows)
    return result


def _summary(result: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """Per kernel and m: the lowest effective bandwidth over the four shapes (the goal is a floor)."""
    from verispec.kernels.q4_cuda import KERNELS, MMA_PIPELINES

    summary: dict[str, Any] = {}
    variants = [f"triton_{name}" for name in ("half2", "swap_ab", "interleave", "interleave_half2")]
    kernels = (
        "q4_matmul",
        *(f"cuda_{name}" for name in KERNELS),
        *(f"cuda_mma_registers_{depth}" for depth in MMA_PIPELINES[1:]),
        "cuda_gemv_no_prefetch",
        "triton",
        "triton_best_of_sweep",
        *variants,
        "exllamav2",
        "torch_int4",
    )
    for kernel in (*kernels, "fp16_cublas"):
        floors = {}
        for m in rows:
            values = [
                shape["points"][str(m)][kernel]["tb_per_s"]
                for shape in result["shapes"].values()
                if kernel in shape["points"][str(m)]
            ]
            if values:
                floors[str(m)] = min(values)
        if floors:
            summary[f"{kernel}_min_tb_per_s_over_shapes"] = floors
    return summary
