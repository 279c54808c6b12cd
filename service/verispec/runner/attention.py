"""Attention over the paged KV cache for a ragged batch, in torch (SDPA), shared by every runner.

A batch mixes decode/verify entries (1..k+1 new tokens) and prefill chunks (many). The few-token
entries go through one padded SDPA call (on CPU, one per set of similar shape): queries [B, Qmax], keys
gathered from each sequence's pages [B, Lmax], a mask that is causal with each sequence's own offset.
Prefill chunks, whose padding would cost more than it saves, each get an SDPA call of their own. The
index tensors are built once per forward (AttentionPlan) and reused by every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch.nn.attention import SDPBackend, sdpa_kernel

from verispec.runner.base import BatchEntry, queued_copy

PADDED_MAX_TOKENS = 16  # entries with at most this many new tokens share the padded call
WASTE_MAX = 2  # on CPU, a padded call computes at most this many times the query-key pairs its entries need
_Member = tuple[int, BatchEntry, torch.Tensor]  # (offset in the flat axis, entry, slots of all its positions)


@dataclass(frozen=True)
class _Group:
    """Entries attended together: where their queries sit in the flat token axis and which slots they read."""

    query_rows: torch.Tensor  # [B, Q] index into the flat [T] axis (padding repeats a real row)
    key_slots: torch.Tensor  # [B, L] slot index into the cache (padding repeats slot of position 0)
    mask: torch.Tensor  # [B, 1, Q, L] bool, True where a query may attend
    # The real (not padding) queries: where they sit in the flattened [B * Q] output, and their rows in
    # the flat [T] axis. Index tensors rather than a boolean mask: a mask's result size would make
    # the host wait for the device in every layer.
    valid_flat: torch.Tensor  # [n] index into B * Q
    valid_rows: torch.Tensor  # [n] index into T
    whole: bool = False  # CPU: the plan's only group, its [B, Q] queries the pass's tokens in order, none padding


@dataclass(frozen=True)
class AttentionPlan:
    """Slots to write this forward's keys and values to, and the attention groups to read them."""

    write_slots: torch.Tensor  # [T] slot of each new token
    positions: torch.Tensor  # [T] position of each new token in its sequence
    positions_int32: torch.Tensor  # [T] the same, as the int32 offsets RoPE kernels take
    groups: tuple[_Group, ...]

    def to(self, device: torch.device) -> AttentionPlan:
        """The same plan with its tensors on `device` (each GPU of a split reads its own copy)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return queued_copy(t, device)

        groups = tuple(
            _Group(move(g.query_rows), move(g.key_slots), move(g.mask), move(g.valid_flat), move(g.valid_rows), g.whole)
            for g in self.groups
        )
        return AttentionPlan(move(self.write_slots), move(self.positions), move(self.positions_int32), groups)

    @staticmethod
    def build(batch: Sequence[BatchEntry], page_size: int, device: torch.device, cpu: bool = False) -> AttentionPlan:
        """The plan of one forward; `cpu`: attention runs on the CPU (the torch runner there), so few-token
        entries of unlike shape get padded calls of their own and a group that is the whole pass is marked
        (a plan built on the CPU for a GPU, as the ExLlamaV2 runner's, keeps one padded call)."""
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        padded: list[_Member] = []
        groups: list[_Group] = []
        offset = 0
        for entry in batch:
            n = len(entry.token_ids)
            table = torch.tensor(list(entry.pages), dtype=torch.long)
            all_positions = torch.arange(entry.start + n)
            all_slots = table[all_positions // page_size] * page_size + all_positions % page_size
            positions.append(all_positions[entry.start :])
            slots.append(all_slots[entry.start :])
            if n <= PADDED_MAX_TOKENS:
                padded.append((offset, entry, all_slots))
            else:
                groups.append(_group([(offset, entry, all_slots)], device))
            offset += n
        if padded and cpu:
            groups[:0] = [_group(members, device) for members in _similar(padded)]
            if len(groups) == 1 and groups[0].valid_flat.numel() == groups[0].query_rows.numel() == offset:
                groups[0] = dataclasses.replace(groups[0], whole=True)  # members in batch order: rows 0..T-1
        elif padded:
            groups.insert(0, _group(padded, device))
        flat_positions = torch.cat(positions)
        return AttentionPlan(
            write_slots=torch.cat(slots).to(device),
            positions=flat_positions.to(device),
            positions_int32=flat_positions.to(device, torch.int32),
            groups=tuple(groups),
        )


def _similar(members: list[_Member]) -> list[list[_Member]]:
    """Few-token entries split into padded calls of similar shape (CPU): every entry of a call is padded to
    its most new tokens and most keys, so one 16-token prefill chunk deep in a long prompt beside 8 decodes
    would make all 9 attend 16 x its length (2-core CI machine, per layer: 18.9 ms in one call, 1.7 in two),
    and a verify of k+1 tokens beside decodes of 1 pads them all to k+1. A new call starts where padding
    would exceed WASTE_MAX times the pairs the entries need, going by new tokens, then keys; each call keeps
    its entries in batch order."""
    ordered = sorted(members, key=lambda m: (len(m[1].token_ids), len(m[2])))
    calls: list[list[_Member]] = []
    for member in ordered:
        call = [*calls[-1], member] if calls else [member]
        needed = sum(len(e.token_ids) * len(slots) for _, e, slots in call)
        padded = len(call) * max(len(e.token_ids) for _, e, _ in call) * max(len(slots) for _, _, slots in call)
        if calls and padded <= WASTE_MAX * needed:
            calls[-1].append(member)
        else:
            calls.append([member])
    return [sorted(call, key=lambda m: m[0]) for call in calls]


def _group(members: list[_Member], device: torch.device) -> _Group:
    q_max = max(len(entry.token_ids) for _, entry, _ in members)
    l_max = max(len(slots) for _, _, slots in members)
    query_rows = torch.empty(len(members), q_max, dtype=torch.long)
    key_slots = torch.empty(len(members), l_max, dtype=torch.long)
    valid = torch.zeros(len(members), q_max, dtype=torch.bool)
    # Query i of an entry sits at position start + i and may see keys 0 .. start + i.
    limit = torch.empty(len(members), q_max, 1, dtype=torch.long)
    for b, (offset, entry, slots) in enumerate(members):
        n = len(entry.token_ids)
        rows = torch.arange(q_max).clamp_max(n - 1)
        query_rows[b] = offset + rows
        valid[b, :n] = True
        limit[b, :, 0] = entry.start + rows
        key_slots[b, : len(slots)] = slots
        key_slots[b, len(slots) :] = slots[0]
    mask = torch.arange(l_max).view(1, 1, l_max) <= limit  # [B, Q, L]
    valid_flat = valid.flatten().nonzero().flatten()
    return _Group(
        query_rows=query_rows.to(device),
        key_slots=key_slots.to(device),
        mask=mask.unsqueeze(1).to(device),
        valid_flat=valid_flat.to(device),
        valid_rows=query_rows.flatten()[valid_flat].to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim], rotary already applied
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim], this forward's keys already written
    v_cache: torch.Tensor,  # [slots, kv_heads, head_dim]
    plan: AttentionPlan,
    scale: float,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its own sequence; returns [T, heads * head_dim].

    compute_dtype float64 (the torch runner of an int4-kernel model uses it) makes a token's result
    independent of the batch around it: how many queries and keys share the call changes SDPA's reduction
    order, which in float32 moves last bits, and the bfloat16 linear layer after it can turn a last bit into
    a rounding step, so a verify pass, a batch or another prefill chunking would not reproduce plain
    decoding. In float64 those differences (~1e-16) vanish when the result is rounded back to float32.
    """
    num_tokens, heads, head_dim = q.shape
    out = q.new_empty(num_tokens, heads, head_dim)
    dtype = compute_dtype or q.dtype
    for group in plan.groups:
        if dtype == torch.float64 and group.query_rows.shape == (1, 1) and not q.is_cuda:
            # One sequence decoding one token: every key is visible, so two batched products in float64
            # (faster here than a masked SDPA call, and the same to float32 precision after rounding).
            out[group.valid_rows] = _attend_one(q[group.query_rows[0]], k_cache, v_cache, group.key_slots[0], scale)
            continue
        # A whole group (decodes only, say) reads its queries as a view and is the output: no gather, no scatter.
        grouped = q.view(*group.query_rows.shape, heads, head_dim) if group.whole else q[group.query_rows]
        queries = grouped.transpose(1, 2).to(dtype)  # [B, heads, Q, D]
        # Converted before the transpose: a contiguous copy, where a transposing one took 55 us a layer for
        # 8 decodes' keys on the 2-core CI machine (the transpose is then a view SDPA takes as it is).
        keys = _gather(k_cache, group.key_slots).to(dtype).transpose(1, 2)  # [B, kv_heads, L, D]
        values = _gather(v_cache, group.key_slots).to(dtype).transpose(1, 2)
        attended = _attend(queries, keys, values, group.mask, scale).to(q.dtype)
        attended = attended.transpose(1, 2).reshape(-1, heads, head_dim)  # [B * Q, heads, D]
        if group.whole:
            return attended.reshape(num_tokens, heads * head_dim)
        out[group.valid_rows] = attended[group.valid_flat]
    return out.reshape(num_tokens, heads * head_dim)


def write_and_attend(
    q: torch.Tensor,  # [T, heads, head_dim], rotary applied
    k: torch.Tensor,  # [T, kv_heads, head_dim], rotary applied
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] of one layer
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Writes this pass's keys and values into their slots of one layer's pages, then attends over them
    (paged_attention); returns [T, heads * head_dim]."""
    write_kv(k, v, k_cache, v_cache, plan.write_slots)
    return paged_attention(q, k_cache, v_cache, plan, scale, compute_dtype)


def write_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, kv_heads, head_dim] of one layer
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T] int64
) -> None:
    """Puts the pass's keys and values in their slots of one layer's pages."""
    k_cache[slots] = k
    v_cache[slots] = v


# On CUDA, a masked call with grouped heads went to a kernel whose host-side set-up is paid once per new
# shape (measured on the H200, 70B shape: ~60 ms more engine CPU per pass, every pass of a request's
# first 32 tokens, as each step brings a new key length; 30 ms a pass once the shapes had been seen).
# The memory-efficient kernel takes a mask and has no such set-up, but no grouped heads: keys and
# values are expanded to the query heads first.
_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots]: [*slots.shape, kv_heads, D]. On CPU through index_select over the flattened slots, the
    same values at a third of the time of advanced indexing for a decode batch's keys (2-core CI machine,
    8 sequences of 68 positions: 9 against 26 us, twice a layer)."""
    if cache.is_cuda:
        return cache[slots]
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def _attend_one(
    query: torch.Tensor,  # [1, heads, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [L]
    scale: float,
) -> torch.Tensor:
    """One query over its sequence's L keys, in float64; returns [1, heads, D] in the query's dtype."""
    heads, head_dim = query.shape[1:]
    keys, values = _gather(k_cache, slots).double(), _gather(v_cache, slots).double()  # [L, kv_heads, D]
    kv_heads = keys.shape[1]
    grouped = query[0].double().view(kv_heads, heads // kv_heads, head_dim)  # GQA: query heads per KV head
    weights = (torch.bmm(grouped, keys.permute(1, 2, 0)) * scale).softmax(-1)  # [kv_heads, group, L]
    return torch.bmm(weights, values.transpose(0, 1)).view(1, heads, head_dim).to(query.dtype)


def _attend(
    queries: torch.Tensor,  # [B, heads, Q, D]
    keys: torch.Tensor,  # [B, kv_heads, L, D]
    values: torch.Tensor,  # [B, kv_heads, L, D]
    mask: torch.Tensor,  # [B, 1, Q, L] bool
    scale: float,
) -> torch.Tensor:
    group_size = queries.shape[1] // keys.shape[1]
    if not queries.is_cuda:
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=group_size > 1
        )
    if group_size > 1:
        keys, values = keys.repeat_interleave(group_size, dim=1), values.repeat_interleave(group_size, dim=1)
    with sdpa_kernel(_CUDA_BACKENDS):
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
