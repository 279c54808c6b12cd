"""Batched torch runner for the Llama family over the paged KV cache (CPU default, any torch device).

It reuses a loaded transformers model's modules (embedding, norms, projections, MLP, rotary table,
head) and replaces only what needs the whole batch: the flattened token axis and paged attention.
transformers' own forward (TorchRefBackend) stays the reference it is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verispec.backends.base import BackendInfo
from verispec.runner.attention import AttentionPlan, paged_attention
from verispec.runner.base import BatchEntry, KVLayout, logits_rows, plan_num_pages, split_logits

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


class TorchLlamaRunner:
    """One forward over all scheduled sequences: linears see [sum of new tokens, hidden] at once."""

    batched = True

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
        bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * parameter.element_size()
        num_pages = plan_num_pages(bytes_per_token, page_size, kv_budget_bytes, max_tokens)
        self.kv = KVLayout(page_size, num_pages, bytes_per_token, str(self.dtype).removeprefix("torch."))
        slots = num_pages * page_size
        # Uninitialised on purpose: a slot is read only after this forward or an earlier one wrote it
        # (padding reads a sequence's own position 0), so untouched pages cost no resident memory.
        shape = (slots, self.kv_heads, self.head_dim)
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.kv.log_ready("torch_llama")

    @torch.inference_mode()
    def forward(self, batch: Sequence[BatchEntry]) -> list[torch.Tensor]:
        inner = self.model.model
        plan = AttentionPlan.build(batch, self.kv.page_size, self.device)
        ids = torch.tensor([t for entry in batch for t in entry.token_ids], dtype=torch.long, device=self.device)
        x = inner.embed_tokens(ids)  # [T, hidden]
        cos, sin = inner.rotary_emb(x.unsqueeze(0), plan.positions.unsqueeze(0))  # [1, T, head_dim]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim], broadcast over heads
        num_tokens = ids.shape[0]
        for index, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = _rotate(attn.q_proj(h).view(num_tokens, self.heads, self.head_dim), cos, sin)
            k = _rotate(attn.k_proj(h).view(num_tokens, self.kv_heads, self.head_dim), cos, sin)
            v = attn.v_proj(h).view(num_tokens, self.kv_heads, self.head_dim)
            self.k_cache[index][plan.write_slots] = k
            self.v_cache[index][plan.write_slots] = v
            attended = paged_attention(q, self.k_cache[index], self.v_cache[index], plan, attn.scaling)
            x = x + attn.o_proj(attended)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        rows = logits_rows(batch)
        if not rows:
            return split_logits(batch, x.new_empty(0, self.info.vocab_size))
        hidden = inner.norm(x[torch.tensor(rows, device=self.device)])
        logits: torch.Tensor = self.model.lm_head(hidden).float()
        return split_logits(batch, logits)

    def free(self, seq_id: int) -> None:
        return None  # everything a sequence has here lives in its pages

    def memory(self) -> list[tuple[str, int, int]]:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return [(str(self.device), int(total - free), int(total))]
        return [("cpu", _resident_bytes(), 0)]


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
