"""Model runners: one forward pass over a ragged batch of sequences in the paged KV cache."""

from __future__ import annotations

import structlog
import torch

from verispec.backends.base import Backend
from verispec.config import EngineConfig
from verispec.errors import ModelLoadError
from verispec.runner.base import ModelRunner, available_cpu_bytes, kv_budget_bytes, plan_num_pages

log = structlog.get_logger(__name__)

# --kv-cache-memory 0 (auto): this share of what is free after loading.
AUTO_SHARE_GPU = 0.9
AUTO_SHARE_CPU = 0.1


def build_runner(
    backend: Backend, config: EngineConfig, max_context_length: int = 0, max_tokens: int = 0
) -> ModelRunner:
    """The batched runner for `backend`'s model when one covers it, else the sequential fallback.

    The KV pool gets `--kv-cache-memory` of the memory free on the model's device after loading, but
    never more than max_active_requests sequences of the full context need, nor more than max_tokens
    positions when given (a draft model never holds more positions than its target's pool).
    """
    context = max_context_length or backend.info.max_context_length
    need = config.max_active_requests * (context + config.kv_page_size)
    max_tokens = min(need, max_tokens) if max_tokens else need
    device = backend.info.devices[0] if backend.info.devices else "cpu"
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        share = config.kv_cache_memory or AUTO_SHARE_GPU
    else:
        free, share = available_cpu_bytes(), config.kv_cache_memory or AUTO_SHARE_CPU
    budget = kv_budget_bytes(share, free)
    model = getattr(backend, "model", None)
    if backend.info.backend == "torch_ref" and model is not None:
        from verispec.runner.torch_llama import TorchLlamaRunner, supports

        if supports(model):
            return TorchLlamaRunner(model, backend.info, config.kv_page_size, budget, max_tokens)
    if backend.info.backend == "exl2":
        from verispec.backends.exl2 import Exl2Backend
        from verispec.runner.exl2 import Exl2Runner

        assert isinstance(backend, Exl2Backend)
        try:
            return Exl2Runner(backend, config.kv_page_size, share, max_tokens)
        except ModelLoadError as exc:  # e.g. an fp16 draft model: ExLlamaV2's own forward, one at a time
            log.warning("runner.exl2_sequential", model=backend.info.model_id, reason=str(exc))
    from verispec.runner.sequential import SequentialRunner

    log.info("runner.sequential", model=backend.info.model_id, reason="no batched runner covers this model")
    return SequentialRunner(backend, config.kv_page_size, plan_num_pages(1, config.kv_page_size, 1 << 62, max_tokens))
