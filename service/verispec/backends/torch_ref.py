"""PyTorch/transformers backend: any causal-LM directory, DynamicCache cropped for rollback."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from verispec.backends.base import BackendInfo
from verispec.errors import ModelLoadError
from verispec.quant.int4 import tensor_bytes

log = structlog.get_logger(__name__)

_DEFAULT_THREADS = torch.get_num_threads()  # torch's own default (the cores), before any choice here
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TorchCache:
    """A transformers DynamicCache for one sequence."""

    past: Any = field(default=None)

    @property
    def length(self) -> int:
        return 0 if self.past is None else int(self.past.get_seq_length())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


def resolve_weights(weights: str, device: torch.device) -> str:
    """--weights: auto is the model's own quantization on CPU (int4 kernel), float32 elsewhere."""
    if weights == "auto":
        return "native" if device.type == "cpu" else "float32"
    if weights == "native" and device.type != "cpu":
        raise ModelLoadError(f"--weights native runs on torch's int4 CPU kernel; device {device} needs float32")
    return weights


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return _DTYPES[dtype]


class TorchRefBackend:
    """Runs a transformers causal LM; the reference every other backend is checked against."""

    def __init__(
        self,
        model_dir: Path,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        max_context_length: int = 0,
        weights: str = "auto",
        gguf: Path | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.weights = resolve_weights(weights, self.device)
        log.info(
            "model.load.start",
            model=model_id,
            backend="torch_ref",
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            weights=self.weights,
            gguf=gguf.name if gguf is not None else None,
        )
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {model_dir} with transformers: {exc}") from exc
        self.model: Any = model.to(self.device).eval()
        quantization, bits = "none", float(torch.finfo(self.dtype).bits)
        if gguf is not None and self.weights == "native":
            from verispec.quant.gguf import apply_gguf

            report = apply_gguf(self.model, gguf)
            quantization, bits = report.quantization, report.bits_per_weight
            if self.dtype == torch.float32:
                use_float64_attention(self.model)
        elif gguf is not None:
            from verispec.quant.gguf import file_quantization, read_gguf

            quantization = file_quantization(read_gguf(gguf)) + "-dequantized"
        if self.device.type == "cpu":
            routed = route_small_linears(self.model)
            log.info("model.cpu_small_gemm", linears=routed.linears, rows=routed.rows, timings_ms=routed.timings_ms)
            threads, timings = choose_cpu_threads(self.model)
            log.info("model.cpu_threads", threads=threads, timings_ms=timings)
        config = self.model.config
        native = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        context = min(max_context_length, native) if max_context_length else native
        self.generation_eos = _generation_eos(self.model)
        # transformers >= 5.24 names the KV-cache argument `cache`; older releases, `past_key_values`
        # (and silently ignore an unknown keyword, which would leave the cache empty).
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self.info = BackendInfo(
            model_id=model_id,
            backend="torch_ref",
            vocab_size=int(config.vocab_size),
            max_context_length=context,
            dtype=str(self.dtype).removeprefix("torch."),
            devices=(str(self.device),),
            quantization=quantization,
            bits_per_weight=bits,
            cache_mode=str(self.dtype).removeprefix("torch."),
            weight_bytes=tensor_bytes(self.model),
        )
        log.info("model.load.done", model=model_id, vocab_size=self.info.vocab_size, max_context_length=context)

    def new_cache(self) -> TorchCache:
        return TorchCache()

    @torch.inference_mode()
    def forward(self, cache: TorchCache, token_ids: list[int], num_logits: int) -> torch.Tensor:
        from transformers import DynamicCache

        if cache.past is None:
            cache.past = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=num_logits, **{self._cache_kwarg: cache.past}
        )
        logits: torch.Tensor = out.logits[0, -num_logits:, :]
        return logits.float()

    def rollback(self, cache: TorchCache, length: int) -> None:
        excess = cache.length - length
        if excess > 0:
            cache.past.crop(-excess)

    def free(self, cache: TorchCache) -> None:
        cache.past = None

    def memory(self) -> list[tuple[str, int, int]]:
        if self.device.type == "cuda":
            _free, total = torch.cuda.mem_get_info(self.device)
            return [(str(self.device), int(torch.cuda.memory_allocated(self.device)), int(total))]
        return [("cpu", self.info.weight_bytes, 0)]


class SmallBatchLinear(torch.nn.Linear):
    """nn.Linear that computes chosen few-row inputs as W @ x^T on CPU (one row duplicated).

    Decode and verify passes multiply 1 to 9 rows by each weight. Whether torch's CPU F.linear or
    W @ x^T is faster for so few rows depends on the machine and its BLAS: where this route was tuned,
    SmolLM2's 49152x576 head cost 11 ms for 1 row with F.linear against 4-5 ms as W @ x^T, but on the
    current CI-class machine the route made a 1-token step 1.8x slower (73 vs 41 ms). So
    `route_small_linears` times both forms at start-up on the model's largest linear layer and routes
    only the row counts where W @ x^T wins clearly (ROWS, set per process).
    """

    MAX_ROWS = 16
    ROWS: frozenset[int] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n not in self.ROWS:
            return super().forward(x)
        source = torch.cat([rows, rows]) if n == 1 else rows
        y = torch.mm(self.weight, source.T).T[:n]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class SmallGemmRoute:
    """What route_small_linears chose: linears routed, row counts sent to W @ x^T, and its timings."""

    linears: int
    rows: tuple[int, ...]
    timings_ms: dict[str, tuple[float, float]]  # rows -> (F.linear, W @ x^T), best of a few


def route_small_linears(model: torch.nn.Module, probe_rows: tuple[int, ...] = (1, 2, 4, 8)) -> SmallGemmRoute:
    """Times F.linear against W @ x^T on `model`'s largest float nn.Linear for a few row counts, and makes
    every nn.Linear a SmallBatchLinear when W @ x^T is at least 15% faster for some of them (those row
    counts and the ones between them go that way). Quantized layers are not nn.Linear and keep their kernel."""
    import time

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]
    if not linears:
        return SmallGemmRoute(0, (), {})
    probe = max(linears, key=lambda m: m.weight.numel())
    timings: dict[str, tuple[float, float]] = {}
    chosen: list[int] = []
    with torch.inference_mode():
        for n in probe_rows:
            x = torch.randn(n, probe.in_features, dtype=probe.weight.dtype)
            source = torch.cat([x, x]) if n == 1 else x
            best = [float("inf"), float("inf")]
            for _ in range(3):  # interleaved, best of 3: other processes share the cores
                for i in range(2):
                    start = time.perf_counter()
                    if i == 0:
                        torch.nn.functional.linear(x, probe.weight)
                    else:
                        torch.mm(probe.weight, source.T)
                    best[i] = min(best[i], time.perf_counter() - start)
            timings[str(n)] = (round(best[0] * 1000, 3), round(best[1] * 1000, 3))
            if best[1] < 0.85 * best[0]:
                chosen.append(n)
    if not chosen:
        return SmallGemmRoute(0, (), timings)
    rows = frozenset(range(min(chosen), max(chosen) + 1))
    SmallBatchLinear.ROWS = rows
    for module in linears:
        module.__class__ = SmallBatchLinear
    return SmallGemmRoute(len(linears), tuple(sorted(rows)), timings)


def use_float64_attention(model: Any) -> None:
    """transformers' SDPA attention run in float64 and rounded back, for a model on the bfloat16 int4
    kernel: as in the paged runner (runner.attention.paged_attention), a token's result then does not
    depend on how many tokens its pass holds, so a rolled-back cache and a fresh prefill agree."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def float64_sdpa(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.double()
        out, weights = sdpa_attention_forward(
            module, query.double(), key.double(), value.double(), attention_mask, **kwargs
        )
        return out.to(query.dtype), weights

    AttentionInterface.register("verispec_float64_sdpa", float64_sdpa)
    # transformers builds no mask at all for an attention name it has no mask function for, and SDPA's own
    # is_causal is aligned top-left: a pass of several tokens over a filled cache (chunked prefill, verify)
    # would attend to the wrong keys, and a sliding-window layer would see past its window.
    ALL_MASK_ATTENTION_FUNCTIONS.register("verispec_float64_sdpa", sdpa_mask)
    model.set_attn_implementation("verispec_float64_sdpa")


def choose_cpu_threads(model: Any) -> tuple[int, dict[str, float]]:
    """Sets torch's intra-op threads to 1 or its default (the cores), whichever runs a short decode-like
    workload (four 1-token passes and a 32-token pass, interleaved, best of 3) faster.

    Measured on the 2-core CI machine while other processes shared it: greedy decoding of SmolLM2 on the
    int4 kernel ran at 20-39 tokens/s on one thread and 1.2-16 on two (the pool's threads wait on each
    other every op), while on an idle machine two threads win the large products. So it is measured
    here rather than fixed. Returns the count chosen and the timings.
    """
    import math
    import time

    default = _DEFAULT_THREADS
    if default <= 1:
        return default, {}
    ids = torch.arange(1, 33).unsqueeze(0)
    best = {1: float("inf"), default: float("inf")}
    with torch.inference_mode():
        model(input_ids=ids[:, :8])  # warm-up
        for _ in range(3):
            for threads in list(best):
                if math.isfinite(best[threads]) and best[threads] > 2 * min(best.values()):
                    continue  # clearly slower already: a contended pool can take seconds a round
                torch.set_num_threads(threads)
                limit = 2 * min(best.values())
                start = time.perf_counter()
                for n in (1, 1, 1, 1, 32):
                    model(input_ids=ids[:, :n])
                    if time.perf_counter() - start > limit:
                        break  # already twice the other's best: stop this round here
                best[threads] = min(best[threads], time.perf_counter() - start)
    chosen = min(best, key=lambda t: best[t])
    torch.set_num_threads(chosen)
    return chosen, {str(t): round(s * 1000, 2) for t, s in best.items()}


def _generation_eos(model: Any) -> list[int]:
    """End-of-sequence ids from the model's generation config (may list several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
