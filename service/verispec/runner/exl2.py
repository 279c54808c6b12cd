"""Batched GPU runner over an ExLlamaV2 model: its loader, GPU split and kernels, our paged attention.

ExLlamaV2's own batched path needs flash-attn (not available for it here), so this runner drives the
loaded modules itself. Every new token of the batch is one row: the fused ExLlamaV2 kernels
(norm + q/k/v projections + RoPE with a per-row position, then o_proj + residual; the MLP) see
[sum of new tokens, hidden] at once, and attention reads each sequence's keys and values from the
paged cache, one fp16 tensor per layer on that layer's GPU. For passes of up to 64 rows the linears can
run on verispec's own 4-bit GEMMs instead (runner/exl2_q4.py; kernels/q4_gemm.py picks, per shape and
bucket of rows, the fastest of its CUDA kernels and its Triton one): the norm apart, q, k and v in one
launch, RoPE with the KV-cache write in one kernel where verispec's CUDA library is built, gate and up in one
launch; more launches than ExLlamaV2's fused kernels but a cost that grows slowly with rows. `--exl2-gemm
auto` times both at start-up and keeps the faster per row bucket. Only this module, runner/exl2_q4.py and
backends/exl2.py touch exllamav2, and only once an exl2 model is loaded.

Passes of up to 64 rows (decodes, verifies, draft steps and prefill chunks in any mix) replay
CUDA graphs captured at start-up (runner/exl2_graphs.py, `--cuda-graphs`); the rest launch their
kernels one by one. Both go through the same module loop (`run_modules`).

The pages hold fp16 keys and values whatever --cache-mode says: ExLlamaV2's Q4/Q6/Q8 cache kernels
work on its own cache layout, not on these pages. A Q4 cache would need a quarter of the bytes per
token; ModelInfo reports the fp16 figure that is actually used. One spare page past the pool's pages
takes the rows that pad a captured pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import torch

from verispec.backends.exl2 import Exl2Backend
from verispec.errors import ModelLoadError
from verispec.kernels import MAX_Q4_ROWS, cuda_build
from verispec.kernels.q4_cuda import rope_store
from verispec.runner.attention import AttentionPlan, paged_attention, write_kv
from verispec.runner.base import (
    BatchEntry,
    KVLayout,
    calibration_batch,
    kv_budget_bytes,
    logits_rows,
    median_seconds,
    plan_num_pages,
    queued_copy,
    split_logits,
)
from verispec.runner.exl2_q4 import Q4Layer, head_forward, mlp_forward, o_forward, plan_layers, qkv_forward

if TYPE_CHECKING:
    from verispec.runner.exl2_graphs import DecodeGraphs

log = structlog.get_logger(__name__)

ROW_BUCKETS = tuple(2**i for i in range(MAX_Q4_ROWS.bit_length()))  # 1, 2, 4 ... 64


class Rows(Protocol):
    """What the layers of one pass need to know about its rows on one GPU."""

    @property
    def positions_int32(self) -> torch.Tensor:
        """[T] each row's position in its sequence (the offsets RoPE kernels take)."""
        ...

    @property
    def write_slots(self) -> torch.Tensor:
        """[T] int64: the cache slot each row's key and value go to."""
        ...

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes the rows' keys and values [T, kv_heads, head_dim] into layer `layer`'s pages."""
        ...

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """The rows' attention over layer `layer`'s pages (their own keys written); [T, heads * head_dim]."""
        ...


@dataclass(frozen=True)
class _PlanRows:
    """Rows of a pass launched eagerly: torch attention over the pages (runner/attention.py)."""

    runner: Exl2Runner
    plan: AttentionPlan

    @property
    def positions_int32(self) -> torch.Tensor:
        return self.plan.positions_int32

    @property
    def write_slots(self) -> torch.Tensor:
        return self.plan.write_slots

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(k, v, self.runner.k_cache[layer], self.runner.v_cache[layer], self.plan.write_slots)

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        return paged_attention(q, self.runner.k_cache[layer], self.runner.v_cache[layer], self.plan, scale)


class Exl2Runner:
    """One forward of ExLlamaV2's modules over a ragged batch, attention over our pages."""

    batched = True
    asynchronous = True  # kernels and graph replays queue on the GPU; the logits are read after

    def __init__(
        self,
        backend: Exl2Backend,
        page_size: int,
        kv_share: float,
        max_tokens: int,
        gemm: str | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        from exllamav2.architecture import RopeStyle
        from exllamav2.attn import ExLlamaV2Attention

        self.backend = backend
        self.info = backend.info
        self.model: Any = backend.model
        modules = self.model.modules
        self.modules = modules
        self.head_index = int(self.model.head_layer_idx)
        indices = [i for i, m in enumerate(modules) if isinstance(m, ExLlamaV2Attention)]
        self.attention = [modules[i] for i in indices]
        if not self.attention or any(m.q_handle is None for m in self.attention):
            raise ModelLoadError("the paged exl2 runner needs quantized attention layers (EXL2/GPTQ)")
        self.layer_of = {index: layer for layer, index in enumerate(indices)}  # module -> its k_cache / v_cache
        first = self.attention[0]
        self.heads, self.kv_heads, self.head_dim = first.num_attention_heads, first.num_key_value_heads, first.head_dim
        self.neox_rope = first.archparams.rope_style == RopeStyle.NEOX
        self.rotates = first.archparams.rope_style in (RopeStyle.NEOX, RopeStyle.GPTJ)
        # Module index -> the 4-bit weights verispec's GEMMs read, for batches of up to MAX_Q4_ROWS rows.
        mode = gemm or backend.gemm
        self.q4_layers, self.gemm_paths = plan_layers(modules, mode)
        # Row buckets (1, 2, 4 ... 64) -> whether verispec's GEMMs run an eager pass of that many rows. In
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
            spare = layer_bytes * count * page_size
            num_pages = min(num_pages, plan_num_pages(layer_bytes * count, page_size, budget - spare, max_tokens))
        self.kv = KVLayout(page_size, num_pages, bytes_per_token, "float16")
        shape = ((num_pages + 1) * page_size, self.kv_heads, self.head_dim)  # + the spare page
        self.k_cache = [torch.empty(shape, dtype=torch.half, device=f"cuda:{a.device_idx}") for a in self.attention]
        self.v_cache = [torch.empty(shape, dtype=torch.half, device=f"cuda:{a.device_idx}") for a in self.attention]
        if backend.cache_mode != "fp16":
            log.warning(
                "runner.kv_fp16",
                cache_mode=backend.cache_mode,
                detail="paged KV pages are fp16; the quantized cache mode applies to the sequential path only",
            )
        self.kv.log_ready("exl2_paged", layers_per_gpu={f"cuda:{d}": n for d, n in sorted(layers_on.items())})
        use_graphs = backend.cuda_graphs if cuda_graphs is None else cuda_graphs
        self.graphs = self._capture_graphs(mode) if use_graphs else None  # few-token passes replay these
        if mode == "auto" and self.q4_layers:  # eager passes (those past the largest graph) measured too
            self.calibrate_gemm()

    def _capture_graphs(self, gemm: str) -> DecodeGraphs | None:
        """CUDA graphs of this runner's few-token passes, or None (logged) where they cannot run."""
        from verispec.runner.exl2_graphs import DecodeGraphs, unavailable

        reason = unavailable(self)
        if reason:
            log.warning("runner.cuda_graphs_off", reason=reason)
            return None
        return DecodeGraphs(self, gemm)

    def calibrate_gemm(self, repeats: int = 5) -> None:
        """Times an eager decode pass of 1, 2, 4 ... 64 sequences with each GEMM and keeps the faster per
        row count: ExLlamaV2's fused kernels launch less and its q-gemm is quick at one row, verispec's keep
        their cost as rows grow (`verispec bench gemm` shows both; on an H100 a 32-row eager pass took 232 ms
        with ExLlamaV2's, 64 with verispec's). Row counts that a captured CUDA graph holds never launch
        eagerly and are not timed. Runs before the engine."""
        graphed = self.graphs.largest if self.graphs is not None else 0
        for rows in ROW_BUCKETS:
            if rows <= graphed:
                continue
            batch = calibration_batch(self.kv.new_pool(), rows)
            if batch is None:
                break
            seconds = {}
            for use_q4 in (False, True):
                self.q4_rows[rows] = use_q4
                seconds["verispec" if use_q4 else "exllamav2"] = median_seconds(
                    partial(self._forward_eager, batch), repeats
                )
            self.q4_rows[rows] = seconds["verispec"] < seconds["exllamav2"]
            self.gemm_calibration[str(rows)] = {path: round(1000 * t, 3) for path, t in seconds.items()}
        log.info(
            "runner.gemm_calibrated",
            verispec_rows=[rows for rows, use in self.q4_rows.items() if use],
            pass_ms=self.gemm_calibration,
        )

    @property
    def cost_breaks(self) -> tuple[int, ...]:
        """Every captured bucket: a pass of one row more replays the next bucket (a 17-row pass costs a
        24-row one), and one past the largest launches eagerly, ~1,500 kernel launches from Python."""
        return tuple(sorted(self.graphs.captured)) if self.graphs is not None else ()

    @torch.inference_mode()
    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        if self.graphs is not None:
            logits = self.graphs.forward(batch)
            if logits is not None:
                return logits
        return self._forward_eager(batch)

    def _forward_eager(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        cpu_plan = AttentionPlan.build(batch, self.kv.page_size, torch.device("cpu"))
        plans: dict[torch.device, _PlanRows] = {}

        def rows_on(device: torch.device) -> Rows:
            if device not in plans:
                plans[device] = _PlanRows(self, cpu_plan.to(device))
            return plans[device]

        token_ids = [t for entry in batch for t in entry.token_ids]
        rows = logits_rows(batch)
        x = self.embed(token_ids)
        use_q4 = len(token_ids) <= MAX_Q4_ROWS and self.q4_rows[_bucket(len(token_ids))]
        if not rows:  # prefill chunks that want no logits stop before the final norm
            self.run_modules(x, 1, self.head_index - 1, rows_on, use_q4)
            return split_logits(batch, torch.empty(0, self.info.vocab_size))
        x = self.run_modules(x, 1, len(self.modules), rows_on, use_q4, torch.tensor(rows, dtype=torch.long))
        return split_logits(batch, self.logits(x))

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """The token embeddings [T, 1, hidden] (in host memory, where ExLlamaV2 keeps the table): one row
        per token, each with its own RoPE position."""
        x: torch.Tensor = self.modules[0].forward(torch.tensor([token_ids], dtype=torch.long))
        return x.view(len(token_ids), 1, -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output [rows, padded vocab] as float32 logits [rows, vocab]."""
        return x.view(x.shape[0], -1)[:, : self.info.vocab_size].float()

    def run_modules(
        self,
        x: torch.Tensor,  # [T, 1, hidden] fp16
        start: int,
        stop: int,
        rows_on: Callable[[torch.device], Rows],
        use_q4: bool,
        keep: torch.Tensor | None = None,  # [R] rows that go on past the final norm (None: all), in host memory
    ) -> torch.Tensor:
        """Runs modules start .. stop-1 over x, moving it to each module's GPU; returns the last output."""
        from exllamav2.attn import ExLlamaV2Attention

        for index in range(start, stop):
            module = self.modules[index]
            device = module.device_idx
            if device is not None and device >= 0 and x.device != torch.device("cuda", device):
                x = queued_copy(x, torch.device("cuda", device))
            if index == self.head_index - 1 and keep is not None:  # the final norm: only rows with logits
                x = x[queued_copy(keep, x.device)]
            q4 = self.q4_layers.get(index) if use_q4 else None
            if isinstance(module, ExLlamaV2Attention):
                x = self._attention(module, self.layer_of[index], x, rows_on(x.device), q4)
            elif q4 is not None:
                flat = x.view(x.shape[0], -1)
                x = (head_forward(q4, flat) if index == self.head_index else mlp_forward(module, q4, flat)).unsqueeze(1)
            else:
                x = module.forward(x)
        return x

    def _attention(self, attn: Any, layer: int, x: torch.Tensor, rows: Rows, q4: Q4Layer | None) -> torch.Tensor:
        from exllamav2.ext import exllamav2_ext as ext_c
        from exllamav2.ext import none_tensor

        num_tokens = x.shape[0]
        context = self.model.get_device_context(attn.device_idx)
        sin, cos = context.sin[attn.rope_index], context.cos[attn.rope_index]
        positions = rows.positions_int32
        # Norm, q/k/v projections and RoPE at each row's own position (batch = rows, q_len = 1), and the rows'
        # keys and values into the layer's pages.
        if q4 is None:
            q = torch.empty((num_tokens, self.heads, self.head_dim), dtype=torch.half, device=x.device)
            k = torch.empty((num_tokens, self.kv_heads, self.head_dim), dtype=torch.half, device=x.device)
            v = torch.empty_like(k)
            ext_c.q_attn_forward_1(
                attn.q_handle, x, num_tokens, 1, 0, positions, q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), sin,
                cos, [], none_tensor,
            )  # fmt: skip
            rows.write(layer, k, v)
        else:
            q, k, v = (t.view(num_tokens, -1, self.head_dim) for t in qkv_forward(attn, q4, x.view(num_tokens, -1)))
            if self._rope_store:
                rope_store(q, k, v, sin, cos, positions, rows.write_slots, self.k_cache[layer], self.v_cache[layer],
                           self.neox_rope)  # fmt: skip
            else:
                ext_c.rope_(q, sin, cos, 0, self.heads, self.head_dim, positions, self.neox_rope)
                ext_c.rope_(k, sin, cos, 0, self.kv_heads, self.head_dim, positions, self.neox_rope)
                rows.write(layer, k, v)
        attended = rows.attend(layer, q, attn.scaling)
        if q4 is not None:  # o_proj added to the residual stream
            return o_forward(q4, attended.view(num_tokens, -1), x.view(num_tokens, -1)).unsqueeze(1)
        # o_proj, added to the residual stream x in place.
        ext_c.q_attn_forward_2(attn.q_handle, x, attended.view(num_tokens, 1, -1), num_tokens, 1, [], none_tensor)
        return x

    @cached_property
    def _rope_store(self) -> bool:
        """Whether verispec's 4-bit path rotates q and k and writes the KV pages in one kernel of its CUDA
        library (q4_cuda.rope_store, ExLlamaV2's rope bits), where nvcc built it; else rope_ twice and a write."""
        return self.rotates and cuda_build.unavailable() is None

    def free(self, seq_id: int) -> None:
        return None  # everything a sequence has here lives in its pages

    def memory(self) -> list[tuple[str, int, int]]:
        return self.backend.memory()

    def close(self) -> None:
        # The graphs refer back to this runner. The server freezes start-up's objects out of the cyclic
        # collector (api/server.py), so only dropping the graphs here lets the pair go.
        self.graphs = None
        self.k_cache, self.v_cache = [], []


def _bucket(rows: int) -> int:
    """The smallest row bucket that holds `rows` (rows <= MAX_Q4_ROWS)."""
    return 1 << (rows - 1).bit_length()
