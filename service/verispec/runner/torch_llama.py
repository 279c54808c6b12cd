"""Batched torch runner for the Llama family over the paged KV cache (CPU default, any torch device).

It reuses a loaded transformers model's modules (embedding, norms, projections, MLP, rotary table,
head) and replaces only what needs the whole batch: the flattened token axis and paged attention.
transformers' own forward (TorchRefBackend) stays the reference it is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

from verispec.backends.base import BackendInfo
from verispec.quant.int4 import Int4Linear
from verispec.runner.attention import AttentionPlan, write_and_attend
from verispec.runner.base import BatchEntry, KVLayout, logits_rows, plan_num_pages, queued_copy, split_logits

# Decoder-only models whose layers are exactly: RMSNorm -> attention (q/k/v/o, rotary, GQA) -> residual
# -> RMSNorm -> gated MLP -> residual. Sliding-window variants are excluded (checked on the config).
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def supports(model: Any) -> bool:
    """Whether `model` (a transformers causal LM) is one this runner reproduces exactly."""
    config = model.config
    if getattr(config, "model_type", "") not in LLAMA_FAMILY:
        return False
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotary embedding, half-split layout (as transformers' Llama): x*cos + rotate_half(x)*sin.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # The same in fewer ops: rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2], exactly (a sign moved).
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass(frozen=True)
class _NativeLayer:
    """What one decoder layer on native weights reads each pass, looked up once."""

    input_norm: torch.Tensor  # [hidden] RMSNorm weight before attention
    input_eps: float
    qkv: Int4Linear  # q|k|v fused
    o_proj: Int4Linear
    scaling: float
    post_norm: torch.Tensor  # [hidden] RMSNorm weight before the MLP
    post_eps: float
    gate_up: Int4Linear  # gate|up fused
    down_proj: Int4Linear

    @staticmethod
    def of(layer: Any, fused: Any) -> _NativeLayer:
        attn, mlp = layer.self_attn, layer.mlp
        return _NativeLayer(
            input_norm=layer.input_layernorm.weight,
            input_eps=layer.input_layernorm.variance_epsilon,
            qkv=fused[0],
            o_proj=attn.o_proj,
            scaling=attn.scaling,
            post_norm=layer.post_attention_layernorm.weight,
            post_eps=layer.post_attention_layernorm.variance_epsilon,
            gate_up=fused[1],
            down_proj=mlp.down_proj,
        )


class TorchLlamaRunner:
    """One forward over all scheduled sequences: linears see [sum of new tokens, hidden] at once."""

    batched = True
    cost_breaks: tuple[int, ...] = ()  # a pass costs by its tokens: no step

    def __init__(self, model: Any, info: BackendInfo, page_size: int, kv_budget_bytes: int, max_tokens: int) -> None:
        self.model = model
        self.info = info
        config = model.config
        self.num_layers = int(config.num_hidden_layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.asynchronous = self.device.type == "cuda"  # on a GPU the kernels queue; on a CPU they run
        bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * parameter.element_size()
        num_pages = plan_num_pages(bytes_per_token, page_size, kv_budget_bytes, max_tokens)
        self.kv = KVLayout(page_size, num_pages, bytes_per_token, str(self.dtype).removeprefix("torch."))
        slots = num_pages * page_size
        # Uninitialised on purpose: a slot is read only after this forward or an earlier one wrote it
        # (padding reads a sequence's own position 0), so untouched pages cost no resident memory.
        shape = (slots, self.kv_heads, self.head_dim)
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        # Int4-kernel models attend in float64 (see paged_attention): batch-invariant tokens.
        quantized = any(isinstance(m, Int4Linear) for m in model.modules())
        self.attention_dtype = torch.float64 if quantized and self.dtype == torch.float32 else None
        if getattr(model, "verispec_fused", None) is None:  # once per model, whichever runner comes first
            fuse_projections(model)
        fused = getattr(model, "verispec_fused", None)
        self.native = (
            [_NativeLayer.of(layer, pair) for layer, pair in zip(model.model.layers, fused, strict=True)]
            if fused is not None
            else None
        )
        self.kv.log_ready("torch_llama", fused_int4_projections=self.native is not None)

    @torch.inference_mode()
    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        inner = self.model.model
        plan = AttentionPlan.build(batch, self.kv.page_size, self.device, cpu=self.device.type == "cpu")
        ids = torch.tensor([t for entry in batch for t in entry.token_ids], dtype=torch.long, device=self.device)
        x = inner.embed_tokens(ids)  # [T, hidden]
        cos, sin = inner.rotary_emb(x.unsqueeze(0), plan.positions.unsqueeze(0))  # [1, T, head_dim]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim], broadcast over heads
        half = self.head_dim // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        for index, layer in enumerate(inner.layers):
            if self.native is not None:
                x = self._native_layer(self.native[index], index, x, plan, cos, signed_sin)
            else:
                x = self._reference_layer(layer, index, x, plan, cos, sin)
        rows = logits_rows(batch)
        if not rows:
            return split_logits(batch, x.new_empty(0, self.info.vocab_size))
        hidden = inner.norm(x[queued_copy(torch.tensor(rows), self.device)])  # behind the layers' kernels
        logits: torch.Tensor = self.model.lm_head(hidden).float()
        return split_logits(batch, logits)

    def _native_layer(
        self,
        layer: _NativeLayer,
        index: int,
        x: torch.Tensor,  # [T, hidden]
        plan: AttentionPlan,
        cos: torch.Tensor,  # [T, 1, head_dim]
        signed_sin: torch.Tensor,  # [T, 1, head_dim]
    ) -> torch.Tensor:
        """One decoder layer on native weights: one kernel call for q|k|v, one rotary over q and k together,
        torch's fused RMSNorm, and the layer's parts read once at start-up (fewer ops and attribute look-ups
        a layer; Python's per-op cost is a large share of a decode step)."""
        num_tokens = x.shape[0]
        h = F.rms_norm(x, x.shape[-1:], layer.input_norm, layer.input_eps)
        # Kernel outputs stay bfloat16 where the next op promotes them exactly (rotary, residual adds).
        qkv = layer.qkv.forward_bf16(h).view(num_tokens, -1, self.head_dim)
        qk = _rotate_signed(qkv[:, : self.heads + self.kv_heads], cos, signed_sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, self.heads + self.kv_heads :].to(self.dtype)
        attended = write_and_attend(
            q, k, v, self.k_cache[index], self.v_cache[index], plan, layer.scaling, self.attention_dtype
        )
        x = x + layer.o_proj.forward_bf16(attended)
        h = F.rms_norm(x, x.shape[-1:], layer.post_norm, layer.post_eps)
        gate, up = layer.gate_up.forward_bf16(h).chunk(2, dim=-1)
        return x + layer.down_proj.forward_bf16(F.silu(gate.to(self.dtype)) * up)

    def _reference_layer(
        self,
        layer: Any,
        index: int,
        x: torch.Tensor,  # [T, hidden]
        plan: AttentionPlan,
        cos: torch.Tensor,  # [T, 1, head_dim]
        sin: torch.Tensor,  # [T, 1, head_dim]
    ) -> torch.Tensor:
        """One decoder layer through the model's own modules (float32 or dequantized weights)."""
        num_tokens, attn = x.shape[0], layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = _rotate(q.reshape(num_tokens, self.heads, self.head_dim), cos, sin)
        k = _rotate(k.reshape(num_tokens, self.kv_heads, self.head_dim), cos, sin)
        v = v.reshape(num_tokens, self.kv_heads, self.head_dim)
        attended = write_and_attend(
            q, k, v, self.k_cache[index], self.v_cache[index], plan, attn.scaling, self.attention_dtype
        )
        x = x + attn.o_proj(attended)
        out: torch.Tensor = x + layer.mlp(layer.post_attention_layernorm(x))
        return out

    def free(self, seq_id: int) -> None:
        return None  # everything a sequence has here lives in its pages

    def memory(self) -> list[tuple[str, int, int]]:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return [(str(self.device), int(total - free), int(total))]
        return [("cpu", _resident_bytes(), 0)]

    def close(self) -> None:
        self.k_cache, self.v_cache = [], []


def fuse_projections(model: Any) -> int:
    """Per layer, q|k|v and gate|up as one Int4Linear each when every projection is one (native GGUF
    weights), kept on the model as `verispec_fused` for the runner: 4 kernel calls a layer instead of 7,
    and one bfloat16 conversion of each input. Returns the number of layers fused (0: none)."""
    if not supports(model):
        return 0
    fused = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        if not all(isinstance(m, Int4Linear) and m.kind == "int4" and m.bias is None for m in qkv + gate_up):
            return 0
        if not (isinstance(attn.o_proj, Int4Linear) and isinstance(mlp.down_proj, Int4Linear)):
            return 0
        if gate_up[0].out_features != gate_up[1].out_features:
            return 0
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(hasattr(n, "variance_epsilon") for n in norms) or mlp.act_fn.__class__.__name__ != "SiLUActivation":
            return 0
        fused.append(torch.nn.ModuleList([Int4Linear.fused(qkv), Int4Linear.fused(gate_up)]))
    model.verispec_fused = torch.nn.ModuleList(fused)
    return len(fused)


def _resident_bytes() -> int:
    """This process's resident memory (VmRSS), which is what the host actually gives it."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
