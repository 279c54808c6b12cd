"""What `bench quality-exl2` measures of a model, through the Backend protocol (exl2 points and torch_ref alike).

Scores over corpus windows (negative log-likelihood, KL(reference || model) and top-1 agreement per
predicted token), greedy decode tokens/s one forward at a time, and a model drafting for a target in the
engine: acceptance by draft position and the speedup at a fixed k and under AUTO, greedy. Each window is
scored from an empty cache; logits come back as float32 whatever the backend computes in.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from verispec.tools.common import PositionCounts

if TYPE_CHECKING:  # torch is imported by the functions that run: building the CLI's parser stays cheap
    import torch

    from verispec.config import Config
    from verispec.request import TokenLogprob


@dataclass
class Totals:
    """Sums over predicted positions: negative log-likelihood, and against the reference, KL and top-1."""

    nll: float = 0.0
    count: int = 0
    kl: float = 0.0
    top1: int = 0

    def add(self, logprobs: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None) -> None:
        """logprobs, reference: [positions, vocab] log-probabilities; targets: [positions] next-token ids."""
        self.nll -= float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())
        self.count += int(targets.numel())
        if reference is not None:
            # KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)), per position
            self.kl += float((reference.exp() * (reference - logprobs)).sum())
            self.top1 += int((reference.argmax(-1) == logprobs.argmax(-1)).sum())

    def summary(self, reference_perplexity: float | None = None) -> dict[str, float]:
        ppl = math.exp(self.nll / self.count)
        out = {"perplexity": round(ppl, 4)}
        if reference_perplexity is not None:
            out["perplexity_vs_reference_pct"] = round(100 * (ppl / reference_perplexity - 1), 3)
            out["kl_divergence"] = round(self.kl / self.count, 6)
            out["top1_agreement"] = round(self.top1 / self.count, 5)
        return out


def score(backend: Any, chunks: list[list[int]], reference: list[torch.Tensor] | None) -> tuple[Totals, list[Any]]:
    """Every window through `backend.forward` from an empty cache, each predicting its tokens 2..window.

    Without a reference the windows' log-probabilities come back too (they are the reference then).
    """
    import torch

    totals, kept = Totals(), []
    with torch.inference_mode():
        for i, window in enumerate(chunks):
            cache = backend.new_cache()
            logits = backend.forward(cache, window, len(window))  # [window, vocab]
            backend.free(cache)
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            targets = torch.tensor(window[1:], dtype=torch.long, device=logprobs.device)
            totals.add(logprobs, targets, None if reference is None else reference[i].to(logprobs.device))
            if reference is None:
                kept.append(logprobs)
    return totals, kept


def decode_tokens_per_s(backend: Any, prompt_ids: list[int], num_tokens: int) -> float:
    """Greedy tokens/s from the prompt to the last token, one token per `backend.forward` (after a warm-up)."""
    for n in (2, num_tokens):
        cache = backend.new_cache()
        start = time.perf_counter()
        token = int(backend.forward(cache, prompt_ids, 1)[0].argmax())
        for _ in range(n - 1):
            token = int(backend.forward(cache, [token], 1)[0].argmax())  # the token on the host: a real decode
        seconds = time.perf_counter() - start
        backend.free(cache)
    return num_tokens / seconds


def draft_bench(
    config: Config, target: Any, tokenizer: Any, draft: Any, prompts: list[list[int]], new_tokens: int, label: str
) -> dict[str, Any]:
    """OFF, DRAFT_MODEL at a fixed k (the config's largest) and AUTO over every prompt, each request exactly
    `new_tokens` long, greedy, with `draft` drafting for `target` in an engine built from `config`; where a
    speculative run parts from OFF's tokens, the position and how close OFF's two best tokens were there."""
    from verispec.engine.core import run_to_completion
    from verispec.loader import start_engine
    from verispec.request import (
        Request,
        ResponseOptions,
        SamplingParams,
        SpeculationMode,
        SpeculationParams,
        StoppingCriteria,
    )

    k = config.spec.max_num_draft_tokens
    counts = PositionCounts()
    models = start_engine(config, target, tokenizer, draft, counts)
    core = models.engine.core
    seconds = {"off": 0.0, "draft_model": 0.0, "auto": 0.0}
    tokens = dict.fromkeys(seconds, 0)
    partings: list[dict[str, Any]] = []
    drafted = accepted = 0
    try:
        for i, prompt in enumerate(prompts):
            outputs: dict[str, list[int]] = {}
            off_logprobs: list[TokenLogprob] = []
            for mode in seconds:
                counts.enabled = mode == "draft_model"
                request = Request(
                    request_id=f"{label}-{i}-{mode}",
                    prompt_token_ids=tuple(prompt),
                    sampling=SamplingParams(),
                    stopping=StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                    # OFF's two best log-probabilities show how close a token it parts at was.
                    response=ResponseOptions(logprobs=mode == "off", top_logprobs=2 if mode == "off" else 0),
                    speculation=SpeculationParams(SpeculationMode(mode), k if mode != "off" else 0),
                )
                start = time.perf_counter()
                outs = run_to_completion(core, request)
                seconds[mode] += time.perf_counter() - start
                outputs[mode] = [t for o in outs for t in o.token_ids]
                off_logprobs += [p for o in outs for p in o.logprobs]
                tokens[mode] += len(outputs[mode])
                if mode == "draft_model" and outs[-1].spec is not None:
                    drafted += outs[-1].spec.num_draft_tokens
                    accepted += outs[-1].spec.num_accepted_tokens
            for mode in ("draft_model", "auto"):
                if (parted := parting(outputs["off"], outputs[mode], off_logprobs)) is not None:
                    partings.append({"prompt": i, "mode": mode, **parted})
    finally:
        core.stop(10)
    rate = {mode: tokens[mode] / seconds[mode] for mode in seconds}
    return {
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "acceptance_by_position": counts.rates(),
        f"fixed_k{k}_speedup": round(rate["draft_model"] / rate["off"], 3),
        "auto_speedup": round(rate["auto"] / rate["off"], 3),
        "off_tokens_per_s": round(rate["off"], 2),
        "greedy_outputs_identical": not partings,
        "greedy_partings": partings,
    }


def parting(off: list[int], other: list[int], off_logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
    """Where `other` first differs from OFF's greedy tokens, with the gap between OFF's two best
    log-probabilities there (a gap near 0 is a near-tie that arithmetic noise can flip); None if equal."""
    position = next((i for i, (a, b) in enumerate(zip(off, other, strict=False)) if a != b), None)
    if position is None:
        return None if len(off) == len(other) else {"position": min(len(off), len(other)), "off_top2_gap": None}
    top = off_logprobs[position].top
    gap = round(top[0][1] - top[1][1], 4) if len(top) >= 2 else None
    return {"position": position, "off_token": off[position], "token": other[position], "off_top2_gap": gap}
