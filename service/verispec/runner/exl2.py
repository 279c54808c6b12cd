"""Batched GPU runner over an ExLlamaV2 model: its loader, GPU split and kernels, our paged attention.

ExLlamaV2's own batched path needs flash-attn (not available for it here), so this runner drives the
loaded modules itself. Every new token of the batch is one row: the fused ExLlamaV2 kernels
(norm + q/k/v projections + RoPE with a per-row position, then o_proj + residual; the MLP) see
[sum of new tokens, hidden] at once, and attention reads each sequence's keys and values from the
paged cache, one fp16 tensor per layer on that layer's GPU. For passes of up to 64 rows the linears can
run on verispec's Triton 4-bit GEMM instead (runner/exl2_q4.py, kernels/q4_gemm.py): unfused norm, GEMMs
and RoPE, more launches but a cost that stays flat in rows; `--exl2-gemm auto` times both at start-up and
keeps the faster per row count. Only this module, runner/exl2_q4.py and backends/exl2.py touch exllamav2,
and only once an exl2 model is loaded.

The pages hold fp16 keys and values whatever --cache-mode says: ExLlamaV2's Q4/Q6/Q8 cache kernels
work on its own cache layout, not on these pages. A Q4 cache would need a quarter of the bytes per
token; ModelInfo reports the fp16 figure that is actually used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import structlog
import torch

from verispec.backends.exl2 import Exl2Backend
from verispec.errors import ModelLoadError
from verispec.kernels import MAX_Q4_ROWS
from verispec.kv.pages import PageTable, pages_for
from verispec.runner.attention import AttentionPlan, write_and_attend
from verispec.runner.base import (
    BatchEntry,
    KVLayout,
    kv_budget_bytes,
    logits_rows,
    plan_num_pages,
    scratch_entry,
    split_logits,
)
from verispec.runner.exl2_q4 import Q4Layer, head_forward, mlp_forward, o_forward, plan_layers, qkv_forward

log = structlog.get_logger(__name__)

ROW_BUCKETS = tuple(2**i for i in range(MAX_Q4_ROWS.bit_length()))  # 1, 2, 4 ... 64
CALIBRATION_CONTEXT = 16


class Exl2Runner:
    """One forward of ExLlamaV2's modules over a ragged batch, attention over our pages."""

    batched = True

    def __init__(
        self, backend: Exl2Backend, page_size: int, kv_share: float, max_tokens: int, gemm: str | None = None
    ) -> None:
        from exllamav2.architecture import RopeStyle
        from exllamav2.attn import ExLlamaV2Attention

        self.backend = backend
        self.info = backend.info
        self.model: Any = backend.model
        modules = self.model.modules
        self.modules = modules
        self.head_index = int(self.model.head_layer_idx)
        self.attention = [m for m in modules if isinstance(m, ExLlamaV2Attention)]
        if not self.attention or any(m.q_handle is None for m in self.attention):
            raise ModelLoadError("the paged exl2 runner needs quantized attention layers (EXL2/GPTQ)")
        first = self.attention[0]
        self.heads, self.kv_heads, self.head_dim = first.num_attention_heads, first.num_key_value_heads, first.head_dim
        self.neox_rope = first.archparams.rope_style == RopeStyle.NEOX
        # Module index -> the Triton 4-bit GEMM's weights, for batches of up to MAX_Q4_ROWS rows.
        mode = gemm or backend.gemm
        self.q4_layers, self.gemm_paths = plan_layers(modules, mode)
        # Row buckets (1, 2, 4 ... 64) -> whether the Triton GEMM runs a batch of that many rows. In
        # "auto" mode a measurement after the cache exists decides (see calibrate_gemm).
        self.q4_rows = dict.fromkeys(ROW_BUCKETS, bool(self.q4_layers))
        self.gemm_calibration: dict[str, dict[str, float]] = {}
        layer_bytes = 2 * self.kv_heads * self.head_dim * 2  # keys and values of one layer, fp16
        bytes_per_token = layer_bytes * len(self.attention)
        # Each GPU holds the pages of its own layers: the pool is as large as the tightest GPU allows.
        layers_on: dict[int, int] = {}
        for attn in self.attention:
            layers_on[attn.device_idx] = layers_on.get(attn.device_idx, 0) + 1
        num_pages = max_tokens // page_size + 1
        for device, count in layers_on.items():
            free, _total = torch.cuda.mem_get_info(device)
            budget = kv_budget_bytes(kv_share, free)
            num_pages = min(num_pages, plan_num_pages(layer_bytes * count, page_size, budget, max_tokens))
        self.kv = KVLayout(page_size, num_pages, bytes_per_token, "float16")
        shape = (num_pages * page_size, self.kv_heads, self.head_dim)
        self.k_cache = [torch.empty(shape, dtype=torch.half, device=f"cuda:{a.device_idx}") for a in self.attention]
        self.v_cache = [torch.empty(shape, dtype=torch.half, device=f"cuda:{a.device_idx}") for a in self.attention]
        if backend.cache_mode != "fp16":
            log.warning(
                "runner.kv_fp16",
                cache_mode=backend.cache_mode,
                detail="paged KV pages are fp16; the quantized cache mode applies to the sequential path only",
            )
        self.kv.log_ready("exl2_paged", layers_per_gpu={f"cuda:{d}": n for d, n in sorted(layers_on.items())})
        if mode == "auto" and self.q4_layers:
            self.calibrate_gemm()

    def calibrate_gemm(self, repeats: int = 5) -> None:
        """Times a decode pass of 1, 2, 4 ... 64 sequences with each GEMM and keeps the faster per row
        count: ExLlamaV2's fused kernels launch less and its q-gemm is quick at one row, the Triton
        kernel keeps its cost as rows grow (`verispec bench gemm` shows both). Runs before the engine."""
        pool = self.kv.new_pool()
        for rows in ROW_BUCKETS:
            if pool.num_pages < rows * pages_for(CALIBRATION_CONTEXT + 1, pool.page_size):
                break
            tables = [PageTable() for _ in range(rows)]
            batch = [scratch_entry(pool, t, [1], CALIBRATION_CONTEXT, 1, -1 - i) for i, t in enumerate(tables)]
            seconds = {}
            for use_q4 in (False, True):
                self.q4_rows[rows] = use_q4
                seconds["triton" if use_q4 else "exllamav2"] = median_seconds(partial(self.forward, batch), repeats)
            self.q4_rows[rows] = seconds["triton"] < seconds["exllamav2"]
            self.gemm_calibration[str(rows)] = {path: round(1000 * t, 3) for path, t in seconds.items()}
            for table in tables:
                pool.release(table)
        log.info(
            "runner.gemm_calibrated",
            triton_rows=[rows for rows, use in self.q4_rows.items() if use],
            pass_ms=self.gemm_calibration,
        )

    @torch.inference_mode()
    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        from exllamav2.attn import ExLlamaV2Attention
        from exllamav2.ext import exllamav2_ext as ext_c
        from exllamav2.ext import none_tensor

        plans: dict[int, AttentionPlan] = {}
        cpu_plan = AttentionPlan.build(batch, self.kv.page_size, torch.device("cpu"))
        ids = torch.tensor([[t for entry in batch for t in entry.token_ids]], dtype=torch.long)
        num_tokens = ids.shape[1]
        rows = torch.tensor(logits_rows(batch), dtype=torch.long)
        x: torch.Tensor = self.modules[0].forward(ids)  # embedding, [1, T, hidden]
        x = x.view(num_tokens, 1, -1)  # one row per token: each has its own RoPE position
        use_q4 = num_tokens <= MAX_Q4_ROWS and self.q4_rows[_bucket(num_tokens)]
        layer = 0
        for index in range(1, len(self.modules)):
            module = self.modules[index]
            device = module.device_idx
            if device is not None and device >= 0 and x.device != torch.device("cuda", device):
                x = x.to(f"cuda:{device}")
            if index == self.head_index - 1:  # the final norm: only the rows whose logits are wanted go on
                if rows.numel() == 0:
                    return split_logits(batch, torch.empty(0, self.info.vocab_size))
                x = x[rows.to(x.device)]
            q4 = self.q4_layers.get(index) if use_q4 else None
            if isinstance(module, ExLlamaV2Attention):
                plan = plans.get(device)
                if plan is None:
                    plan = plans[device] = cpu_plan.to(x.device)
                x = self._attention(module, layer, x, plan, q4, ext_c, none_tensor)
                layer += 1
            elif q4 is not None:
                flat = x.view(x.shape[0], -1)
                x = (head_forward(q4, flat) if index == self.head_index else mlp_forward(module, q4, flat)).unsqueeze(1)
            else:
                x = module.forward(x)
        logits = x.view(x.shape[0], -1)[:, : self.info.vocab_size].float()
        return split_logits(batch, logits)

    def _attention(
        self,
        attn: Any,
        layer: int,
        x: torch.Tensor,
        plan: AttentionPlan,
        q4: Q4Layer | None,
        ext_c: Any,
        none_tensor: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        context = self.model.get_device_context(attn.device_idx)
        sin, cos = context.sin[attn.rope_index], context.cos[attn.rope_index]
        # Norm, q/k/v projections and RoPE at each row's own position (batch = rows, q_len = 1).
        if q4 is None:
            q = torch.empty((num_tokens, 1, self.heads, self.head_dim), dtype=torch.half, device=x.device)
            k = torch.empty((num_tokens, 1, self.kv_heads, self.head_dim), dtype=torch.half, device=x.device)
            v = torch.empty_like(k)
            ext_c.q_attn_forward_1(
                attn.q_handle, x, num_tokens, 1, 0, plan.positions_int32, q, k, v, sin, cos, [], none_tensor
            )
        else:
            q, k, v = qkv_forward(attn, q4, x.view(num_tokens, -1))
            q = q.view(num_tokens, 1, self.heads, self.head_dim)
            k = k.view(num_tokens, 1, self.kv_heads, self.head_dim)
            ext_c.rope_(q, sin, cos, 0, self.heads, self.head_dim, plan.positions_int32, self.neox_rope)
            ext_c.rope_(k, sin, cos, 0, self.kv_heads, self.head_dim, plan.positions_int32, self.neox_rope)
        attended = write_and_attend(
            q.view(num_tokens, self.heads, self.head_dim),
            k.view(num_tokens, self.kv_heads, self.head_dim),
            v.view(num_tokens, self.kv_heads, self.head_dim),
            self.k_cache[layer],
            self.v_cache[layer],
            plan,
            attn.scaling,
        )
        if q4 is not None:  # o_proj added to the residual stream
            return o_forward(q4, attended.view(num_tokens, -1), x.view(num_tokens, -1)).unsqueeze(1)
        # o_proj, added to the residual stream x in place.
        ext_c.q_attn_forward_2(attn.q_handle, x, attended.view(num_tokens, 1, -1), num_tokens, 1, [], none_tensor)
        return x

    def free(self, seq_id: int) -> None:
        return None  # everything a sequence has here lives in its pages

    def memory(self) -> list[tuple[str, int, int]]:
        return self.backend.memory()


def _bucket(rows: int) -> int:
    """The smallest row bucket that holds `rows` (rows <= MAX_Q4_ROWS)."""
    return 1 << (rows - 1).bit_length()


def median_seconds(call: Any, repeats: int) -> float:
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
