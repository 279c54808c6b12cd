"""A weight-only 4-bit GEMM in Triton whose cost stays flat in the number of rows (1 to 64).

Decode and verify put 1 to ~40 rows through each weight matrix; at those sizes the work is reading the
weights, so the kernel streams each 4-bit tile from memory once, turns it into fp16 in registers and
hands it to the tensor cores (`tl.dot`) against every row at once. The weights are read as ExLlamaV2
loaded them (no copy, nothing re-quantized):

- `qweight` int32 [K/8, N]: eight 4-bit codes of consecutive rows (of the sorted order) per word, in
  ExLlamaV2's load-time nibble order: rows 0, 2, 4, 6 in nibbles 0-3 and rows 1, 3, 5, 7 in nibbles 4-7.
- EXL2 scales: `scale_codes` int32 [G, N/8] (4-bit codes, plain nibble order) and `scale_max` fp16 [G];
  the scale of group g, column n is fp16((code + 1)^2) * scale_max[g], and the zero point is 8.
- GPTQ scales: `scales` fp16 [G, N] and `zeros` int32 [G, N/8] (4-bit, plain order); zero = code + 1.

Every weight is dequantized as fp16(q - zero) * fp16 scale, one rounding, the arithmetic of ExLlamaV2's
`reconstruct`, so the matrix the kernel multiplies by is the one `get_weight_tensor_dq()` returns, bit
for bit (the GPU tests check it through this kernel). Products accumulate in fp32.

Rows of the matrix are in ExLlamaV2's sorted order; `perm` (int64 [K]) gathers the input's columns into
that order when the checkpoint has one that is not the identity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
import triton
import triton.language as tl

from verispec.kernels import MAX_Q4_ROWS, Q4Weights, cuda_build, num_sms, on_device, q4_cuda


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one launch; `split_k` > 1 sums partial products over K slices in a second step."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    half2: bool = False  # two weights per dequantize instruction (CUDA only: inline PTX)
    swap_ab: bool = False  # weights as the MMA's left operand
    interleave: bool = False  # the eight row sub-tiles rebuilt into one [BLOCK_K, BLOCK_N] tile: one MMA per tile

    def __post_init__(self) -> None:
        if self.interleave and self.swap_ab:
            raise ValueError("interleave and swap_ab are different MMA layouts: choose one")


@triton.jit
def _dequant_pair(words, offset2, scale2):  # type: ignore[no-untyped-def]
    """Two weights per instruction, as ExLlamaV2 does: codes in bits 0-3 and 16-19 of `words` become the
    fp16 pair (1024 + q) by OR-ing in the exponent, minus (1024 + zero) (exact), times the scale."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 t; lop3.b32 t, $2, 0x000f000f, 0x64006400, 0xea; "
        "sub.rn.f16x2 t, t, $3; mul.rn.f16x2 t, t, $4; mov.b32 {$0, $1}, t; }",
        constraints="=h,=h,r,r,r",
        args=[words, offset2, scale2],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _fp16_pairs(values):  # type: ignore[no-untyped-def]
    """An fp16 vector as int32 words holding each value twice (the operand of the f16x2 instructions)."""
    bits = values.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit  # type: ignore[untyped-decorator]
def _rows_of_pair(packed, pair, offset, scale, offset2, scale2, HALF2: tl.constexpr):  # type: ignore[no-untyped-def]
    """Rows 2 * pair and 2 * pair + 1 of each word's eight, dequantized: (q - zero) * scale in fp16."""
    if HALF2:
        low, high = _dequant_pair(packed >> (4 * pair), offset2, scale2)
    else:
        low = ((packed >> (4 * pair)) & 0xF) | 0x6400  # fp16 bits of 1024 + q
        high = ((packed >> (4 * pair + 16)) & 0xF) | 0x6400
        low = (low.to(tl.int16).to(tl.float16, bitcast=True) - offset[None, :]) * scale[None, :]
        high = (high.to(tl.int16).to(tl.float16, bitcast=True) - offset[None, :]) * scale[None, :]
    return low, high


@triton.jit  # type: ignore[untyped-decorator]
def _q4_gemm_kernel(  # type: ignore[no-untyped-def]  # Triton reads pointers and sizes untyped
    x_ptr,  # fp16 [M, K], row stride stride_xm, columns already in sorted order
    qweight_ptr,  # int32 [K/8, N]
    scales_ptr,  # EXL2 int32 [G, N/8] / GPTQ fp16 [G, N]
    scale_max_ptr,  # EXL2 fp16 [G]
    zeros_ptr,  # GPTQ int32 [G, N/8]
    residual_ptr,  # fp16 [M, N] added to the result (HAS_RESIDUAL)
    out_ptr,  # fp16 [M, N], or fp32 [SPLIT_K, M, N] partials when SPLIT_K > 1
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_om,
    GPTQ: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HALF2: tl.constexpr,  # dequantize two weights per instruction (inline PTX)
    SWAP_AB: tl.constexpr,  # weights as the MMA's left operand: acc is [BLOCK_N, BLOCK_M]
    INTERLEAVE: tl.constexpr,  # one [BLOCK_K, BLOCK_N] tile and one MMA per K step (not with SWAP_AB)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    scale_shift = (offs_n % 8) * 4
    k_per_split = K // SPLIT_K
    k_begin = pid_k * k_per_split
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        packed = tl.load(
            qweight_ptr + (k0 // 8 + offs_word)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0
        )  # [BLOCK_K/8, BLOCK_N]: word i holds rows k0 + 8i .. k0 + 8i + 7
        group = k0 // group_size  # BLOCK_K divides group_size: one group per tile
        if GPTQ:
            scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0)
            zero_word = tl.load(zeros_ptr + group * (N // 8) + offs_n // 8, mask=mask_n, other=0)
            zero = ((zero_word >> scale_shift) & 0xF) + 1
        else:
            code_word = tl.load(scales_ptr + group * (N // 8) + offs_n // 8, mask=mask_n, other=0)
            code = ((code_word >> scale_shift) & 0xF) + 1
            scale = (code * code).to(tl.float16) * tl.load(scale_max_ptr + group)
            zero = tl.full((BLOCK_N,), 8, tl.int32)
        offset = (zero + 1024).to(tl.float16)  # exact: integers below 2048
        offset2 = offset  # the f16x2 operands of HALF2, else unused
        scale2 = scale
        if HALF2:
            offset2 = tl.broadcast_to(_fp16_pairs(offset)[None, :], (BLOCK_K // 8, BLOCK_N))
            scale2 = tl.broadcast_to(_fp16_pairs(scale)[None, :], (BLOCK_K // 8, BLOCK_N))
        # Row r of the eight in a word sits in nibble r // 2 + 4 * (r % 2) (ExLlamaV2's shuffled order).
        if INTERLEAVE:
            # The sub-tiles of rows 8i + r stacked back into tile rows k0 .. k0 + BLOCK_K - 1: joined as
            # [i, n, half, pair bit 0, pair bit 1] (r = 4 * bit1 + 2 * bit0 + half), then put in row order.
            low0, high0 = _rows_of_pair(packed, 0, offset, scale, offset2, scale2, HALF2)
            low1, high1 = _rows_of_pair(packed, 1, offset, scale, offset2, scale2, HALF2)
            low2, high2 = _rows_of_pair(packed, 2, offset, scale, offset2, scale2, HALF2)
            low3, high3 = _rows_of_pair(packed, 3, offset, scale, offset2, scale2, HALF2)
            stacked = tl.join(
                tl.join(tl.join(low0, high0), tl.join(low1, high1)),
                tl.join(tl.join(low2, high2), tl.join(low3, high3)),
            )
            tile = tl.reshape(tl.permute(stacked, (0, 4, 3, 2, 1)), (BLOCK_K, BLOCK_N))
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :],
                mask=mask_m[:, None],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            acc += tl.dot(a, tile)
        else:  # one sub-tile per r, multiplying the input columns k0 + 8i + r
            for pair in tl.static_range(4):
                low, high = _rows_of_pair(packed, pair, offset, scale, offset2, scale2, HALF2)
                for half in tl.static_range(2):
                    weights = low if half == 0 else high  # rows 8i + 2 * pair + half: (q - zero) * scale
                    a = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + (k0 + 8 * offs_word + 2 * pair + half)[None, :],
                        mask=mask_m[:, None],
                        other=0.0,
                    )  # [BLOCK_M, BLOCK_K/8]
                    if SWAP_AB:
                        acc += tl.dot(tl.trans(weights), tl.trans(a))  # fp32 sums
                    else:
                        acc += tl.dot(a, weights)
    if SWAP_AB:
        result = tl.trans(acc)
    else:
        result = acc
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        out_offsets = offs_m[:, None] * stride_om + offs_n[None, :]
        if HAS_RESIDUAL:
            result += tl.load(residual_ptr + out_offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offsets, result.to(tl.float16), mask=mask)
    else:
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], result, mask=mask)


def default_config(weights: Q4Weights, num_sms: int) -> LaunchConfig:
    """The tiles that measured fastest on the 70B shapes (`verispec bench gemm` sweeps them): wide N
    tiles, and K cut into up to eight slices so that every SM streams several tiles at once."""
    return _default_tiles(weights.in_features, weights.out_features, num_sms)


@functools.cache
def _default_tiles(in_features: int, out_features: int, num_sms: int) -> LaunchConfig:
    """default_config by shape, worked out once per shape rather than on every call of a pass."""
    block_n = 256 if out_features >= 32 * num_sms else 128 if out_features >= 8 * num_sms else 64
    split_k = 8
    while split_k > 1 and (in_features % (128 * split_k) or in_features // split_k < 512):
        split_k //= 2
    return LaunchConfig(block_n=block_n, block_k=128, split_k=split_k)


@triton.jit  # type: ignore[untyped-decorator]
def _sum_slices_kernel(  # type: ignore[no-untyped-def]
    partial_ptr,  # fp32 [SPLIT_K, M * N]
    residual_ptr,  # fp16 [M * N] (HAS_RESIDUAL)
    out_ptr,  # fp16 [M * N]
    size,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for index in tl.static_range(SPLIT_K):  # a fixed order: a row's sums do not depend on its batch
        total += tl.load(partial_ptr + index * size + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        total += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(tl.float16), mask=mask)


def check_weights(weights: Q4Weights) -> str | None:
    """Why the kernel cannot take these weights, or None when it can."""
    if weights.group_size < 128 or weights.group_size & (weights.group_size - 1):
        return f"group size {weights.group_size}: the kernel takes power-of-two groups of 128 rows or more"
    if weights.in_features % weights.group_size != 0:
        return f"in_features {weights.in_features} is not a multiple of group size {weights.group_size}"
    if weights.out_features % 8 != 0:
        return f"out_features {weights.out_features} is not a multiple of 8"
    return None


def q4_matmul(
    x: torch.Tensor,
    weights: Q4Weights,
    residual: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """x [M, K] fp16 @ W [K, N] (+ residual [M, N]) -> [M, N] fp16, for M <= MAX_Q4_ROWS. Without a
    `config`, the rows go to a CUDA kernel (q4_cuda.py) where one measured faster for this shape."""
    if config is not None:
        return _triton_matmul(_sorted_inputs(x, [weights])[0], weights, residual, config)
    return q4_matmul_parts(x, [weights], [residual])[0]


def q4_matmul_parts(
    x: torch.Tensor,
    weights: Sequence[Q4Weights],
    residuals: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """x [M, K] fp16 @ each of `weights` (+ its residual [M, N]) -> [M, N] fp16 each: q, k and v of one
    input, or gate and up. Where a CUDA kernel measured faster takes them all (q4_cuda.share_a_launch), they
    run as the parts of one launch; otherwise one Triton launch each."""
    xs = _sorted_inputs(x, weights)
    residual_list = list(residuals) if residuals is not None else [None] * len(weights)
    if x.is_cuda and q4_cuda.share_a_launch(weights) and all(q4_cuda.covers(w, x.shape[0]) for w in weights):
        choice = q4_cuda.fastest(weights, x.shape[0], functools.partial(_triton_parts, weights=weights))
        if choice in q4_cuda.KERNELS:
            return q4_cuda.KERNELS[choice](xs, weights, residual_list)
    return _triton_parts(xs, weights, residual_list)


def _sorted_inputs(x: torch.Tensor, weights: Sequence[Q4Weights]) -> list[torch.Tensor]:
    """x with its columns in each weight's sorted order, contiguous: one tensor for the parts that share an
    order (the same `perm` tensor, or none)."""
    by_perm: dict[int, torch.Tensor] = {}
    inputs = []
    for w in weights:
        key = id(w.perm)
        if key not in by_perm:
            by_perm[key] = (x.index_select(1, w.perm) if w.perm is not None else x).contiguous()
        inputs.append(by_perm[key])
    return inputs


def _triton_parts(
    xs: Sequence[torch.Tensor],
    weights: Sequence[Q4Weights],
    residuals: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    return [_triton_matmul(x, w, r) for x, w, r in zip(xs, weights, residuals or [None] * len(weights), strict=True)]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up in fp16, kept finite as ExLlamaV2 keeps it: one CUDA kernel where the library is
    built, else torch's three (the same bits)."""
    if gate.is_cuda and cuda_build.unavailable() is None:
        return q4_cuda.silu_mul(gate, up)
    return F.silu(gate).mul_(up).clamp_(min=-65504.0, max=65504.0)


def _triton_matmul(
    x: torch.Tensor, weights: Q4Weights, residual: torch.Tensor | None = None, config: LaunchConfig | None = None
) -> torch.Tensor:
    """q4_matmul on the Triton kernel: x contiguous, its columns already in the weights' sorted order."""
    rows = x.shape[0]
    n = weights.out_features
    if config is None:
        config = default_config(weights, num_sms(x.device))
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    grid = (triton.cdiv(n, config.block_n), config.split_k, triton.cdiv(rows, block_m))
    if config.split_k == 1:
        out = torch.empty((rows, n), dtype=torch.float16, device=x.device)
    else:
        out = torch.empty((config.split_k, rows, n), dtype=torch.float32, device=x.device)
    with on_device(x):
        _q4_gemm_kernel[grid](
            x,
            weights.qweight,
            weights.scales,
            weights.scale_max if weights.scale_max is not None else weights.scales,
            weights.zeros if weights.zeros is not None else weights.qweight,
            residual if residual is not None and config.split_k == 1 else x,
            out,
            rows,
            n,
            weights.in_features,
            weights.group_size,
            x.stride(0),
            n,
            GPTQ=weights.gptq,
            HAS_RESIDUAL=residual is not None and config.split_k == 1,
            HALF2=config.half2,
            SWAP_AB=config.swap_ab,
            INTERLEAVE=config.interleave,
            BLOCK_M=block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            SPLIT_K=config.split_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if config.split_k == 1:
            return out
        result = torch.empty((rows, n), dtype=torch.float16, device=x.device)
        size = rows * n
        _sum_slices_kernel[(triton.cdiv(size, 1024),)](
            out,
            residual if residual is not None else result,
            result,
            size,
            HAS_RESIDUAL=residual is not None,
            SPLIT_K=config.split_k,
            BLOCK=1024,
        )
        return result


def dequantize(weights: Q4Weights, config: LaunchConfig | None = None, kernel: str = "triton") -> torch.Tensor:
    """The fp16 matrix [K, N] in the input's own row order, as a kernel itself sees it (`kernel`: "triton",
    the Triton one at `config`, or a name in q4_cuda.KERNELS): the product with an identity matrix is exact
    (one nonzero fp16 term per sum), so this is the kernel's weights."""
    size = weights.in_features
    eye = torch.eye(size, dtype=torch.float16, device=weights.qweight.device)
    in_order = dataclasses.replace(weights, perm=None)
    step = MAX_Q4_ROWS if kernel == "triton" else q4_cuda.MAX_ROWS[kernel]

    def run(rows: torch.Tensor) -> torch.Tensor:
        if kernel == "triton":
            return _triton_matmul(rows, in_order, config=config)
        return q4_cuda.KERNELS[kernel]([rows], [in_order])[0]

    sorted_rows = torch.cat([run(eye[i : i + step]) for i in range(0, size, step)])
    if weights.perm is None:
        return sorted_rows
    result = torch.empty_like(sorted_rows)
    result[weights.perm] = sorted_rows
    return result
