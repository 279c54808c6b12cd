"""Attention of few-token rows over the paged KV cache in Triton: decode, verify and short prefill rows.

Each row is one new token of a sequence whose keys and values are already written to the pages; it
attends causally over keys 0 .. its own position, read straight from its sequence's pages through the
row's page table. There is no gather of keys into a padded tensor and no mask tensor, and the grid is
fixed by the number of rows, not by how long the sequences are: a launch captured in a CUDA graph
replays correctly as sequences grow (lengths and page tables are read from device memory).

One program takes one row and one KV head together with every query head that shares it (grouped-query
attention), so each key tile is read once per row; the softmax is kept online in float32 over tiles of
BLOCK_N keys, as flash attention does, and the probabilities meet the values in fp16 on the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from verispec.kernels import on_device

BLOCK_N = 64  # keys per tile
MIN_DOT = 16  # the tensor-core dot's smallest side: query-head groups are padded up to it


@triton.jit  # type: ignore[untyped-decorator]
def _decode_kernel(  # type: ignore[no-untyped-def]  # Triton reads pointers and sizes untyped
    q_ptr,  # fp16 [rows, heads, head_dim]
    k_ptr,  # fp16 [slots, kv_heads, head_dim]
    v_ptr,
    out_ptr,  # fp16 [rows, heads, head_dim]
    tables_ptr,  # int32 [rows, max_pages]: the page table of each row's sequence
    lengths_ptr,  # int32 [rows]: keys each row sees (its position + 1)
    scale,
    stride_qr,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_or,
    stride_oh,
    stride_tr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP padded to the dot's smallest side
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lengths_ptr + row)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    real = (g < GROUP)[:, None]
    q = tl.load(q_ptr + row * stride_qr + heads[:, None] * stride_qh + d[None, :], mask=real, other=0.0)
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(0, length, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < length
        page = tl.load(tables_ptr + row * stride_tr + n // PAGE, mask=valid, other=0)
        slot = (page.to(tl.int64) * PAGE + n % PAGE)[:, None]
        k = tl.load(k_ptr + slot * stride_ks + kv_head * stride_kh + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_N] float32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # Online softmax: rescale what was summed so far to the new running maximum.
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        p = tl.exp(scores - new_max[:, None])
        alpha = tl.exp(running_max - new_max)
        running_sum = running_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + slot * stride_ks + kv_head * stride_kh + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + row * stride_or + heads[:, None] * stride_oh + d[None, :], out.to(tl.float16), mask=real)


def supports(heads: int, kv_heads: int, head_dim: int) -> str:
    """Why the kernel cannot run this attention shape, or "" when it can."""
    if head_dim < MIN_DOT or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two >= {MIN_DOT}"
    if heads % kv_heads:
        return f"{heads} query heads do not group over {kv_heads} KV heads"
    return ""


def paged_decode_attention(
    q: torch.Tensor,  # [rows, heads, head_dim] fp16, rotary applied
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] fp16, this pass's keys already written
    v_cache: torch.Tensor,  # [slots, kv_heads, head_dim] fp16
    tables: torch.Tensor,  # [rows, max_pages] int32: each row's sequence's pages
    lengths: torch.Tensor,  # [rows] int32: keys each row sees (its position + 1, at least 1)
    scale: float,
    page_size: int,
) -> torch.Tensor:
    """Causal attention of every row over its own sequence's pages; returns [rows, heads, head_dim]."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if q.stride(2) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1:
        raise ValueError("q, k_cache and v_cache need contiguous head_dim and keys laid out as values")
    group = heads // kv_heads
    out = torch.empty_like(q)
    with on_device(q):
        _decode_kernel[(rows, kv_heads)](
            q,
            k_cache,
            v_cache,
            out,
            tables,
            lengths,
            scale,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            out.stride(0),
            out.stride(1),
            tables.stride(0),
            GROUP=group,
            BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)),
            HEAD_DIM=head_dim,
            PAGE=page_size,
            BLOCK_N=BLOCK_N,
            num_warps=4,
            num_stages=2,  # two K/V tiles in flight: 64 KB of shared memory at head_dim 128 (sm_89 has 99 KB)
        )
    return out


def trial(heads: int, kv_heads: int, head_dim: int, page_size: int, device: int) -> None:
    """One launch over a page of zeros on `device`: compiles the kernel there, or raises why it cannot."""
    where = f"cuda:{device}"
    q = torch.zeros((1, heads, head_dim), dtype=torch.float16, device=where)
    cache = torch.zeros((page_size, kv_heads, head_dim), dtype=torch.float16, device=where)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=where)
    lengths = torch.ones(1, dtype=torch.int32, device=where)
    paged_decode_attention(q, cache, cache, tables, lengths, 1.0, page_size)
    torch.cuda.synchronize(device)
