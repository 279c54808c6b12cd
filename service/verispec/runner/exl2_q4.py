"""Which of an ExLlamaV2 model's linears verispec's 4-bit GEMMs take, and the layer forwards that use them.

The kernels (kernels/q4_gemm.py's q4_matmul: CUDA where they build, Triton otherwise) read the tensors
ExLlamaV2 loaded, so nothing is copied: this module
only checks each linear (4-bit everywhere, uniform groups, no bias) and records the path every layer
takes (logged at start-up as `runner.q4_gemm`). A layer's attention or MLP can use the kernel when all of
its linears are covered; the runner decides per pass of up to MAX_Q4_ROWS rows which GEMM runs
(runner/exl2.py: `--exl2-gemm`, measured in `auto` mode); otherwise ExLlamaV2's own fused kernels run it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LinearPath:
    """The path one linear takes and why."""

    key: str
    path: str  # "verispec" (its own 4-bit kernels) or "exllamav2"
    reason: str = ""


def q4_weights(linear: Any) -> tuple[Any | None, str]:
    """The kernel's view of an ExLlamaV2Linear, or None and the reason it stays on ExLlamaV2's kernel."""
    tensors = linear.q_tensors
    if not isinstance(tensors, dict) or linear.q_handle is None:
        return None, "not a quantized single-device linear"
    if linear.has_bias:
        return None, "has a bias"
    return weights_from_tensors(tensors)


def weights_from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[Any | None, str]:
    """The kernel's view of the tensors ExLlamaV2's make_q_matrix was given (and shuffled in place)."""
    from verispec.kernels.q4_gemm import check_weights

    if "q_weight" in tensors:
        weights, reason = _exl2_weights(tensors)
    elif "qweight" in tensors:
        weights, reason = _gptq_weights(tensors)
    else:
        return None, "unknown quantized layout"
    if weights is None:
        return None, reason
    problem = check_weights(weights)
    return (None, problem) if problem else (weights, "")


def _exl2_weights(tensors: dict[str, torch.Tensor]) -> tuple[Any | None, str]:
    from verispec.kernels import Q4Weights

    qweight = tensors["q_weight"]
    groups = tensors["q_groups"].cpu().tolist()  # (bits, first q_weight row) per group
    widths = sorted({int(bits) for bits in groups[0::2]})
    if widths != [4]:
        return None, f"bit widths {widths}: the kernel takes 4-bit groups only"
    starts = [int(row) for row in groups[1::2]]
    spans = {b - a for a, b in itertools.pairwise(starts)} | {qweight.shape[0] - starts[-1]}
    if len(spans) != 1:
        return None, "groups of different sizes"
    group_size = spans.pop() * 8  # 4-bit: eight rows per int32 row of q_weight
    return (
        Q4Weights(
            qweight=qweight,
            scales=tensors["q_scale"],
            scale_max=tensors["q_scale_max"],
            zeros=None,
            perm=_permutation(tensors.get("q_perm"), qweight.shape[0] * 8),
            group_size=group_size,
            in_features=qweight.shape[0] * 8,
            out_features=qweight.shape[1],
        ),
        "",
    )


def _gptq_weights(tensors: dict[str, torch.Tensor]) -> tuple[Any | None, str]:
    from verispec.kernels import Q4Weights

    qweight, scales = tensors["qweight"], tensors["scales"]
    in_features, groups = qweight.shape[0] * 8, scales.shape[0]
    group_size = 1
    while group_size * groups < in_features:  # as ExLlamaV2 derives it
        group_size *= 2
    return (
        Q4Weights(
            qweight=qweight,
            scales=scales,
            scale_max=None,
            zeros=tensors["qzeros"],
            perm=_permutation(tensors.get("q_perm"), in_features),
            group_size=group_size,
            in_features=in_features,
            out_features=qweight.shape[1],
        ),
        "",
    )


def _permutation(perm: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """ExLlamaV2 keeps the permutation as int16 read as uint16; None when it is the identity."""
    if perm is None:
        return None
    long = perm.to(torch.int64) & 0xFFFF
    if torch.equal(long, torch.arange(size, device=long.device)):
        return None
    return long


@dataclass
class Q4Layer:
    """The covered linears of one ExLlamaV2 module, in its forward order."""

    weights: list[Any]  # Q4Weights: q, k, v, o for attention; gate, up, down for the MLP; the head alone


def plan_layers(modules: list[Any], mode: str) -> tuple[dict[int, Q4Layer], list[LinearPath]]:
    """Module index -> its kernel weights, for every module whose linears the kernel all covers."""
    from exllamav2.attn import ExLlamaV2Attention
    from exllamav2.linear import ExLlamaV2Linear
    from exllamav2.mlp import ExLlamaV2MLP

    report: list[LinearPath] = []
    layers: dict[int, Q4Layer] = {}
    if mode == "exllamav2":
        return layers, report
    if not _triton_available():
        if mode == "verispec":
            from verispec.errors import ConfigError

            raise ConfigError("--exl2-gemm", "triton is not importable on this machine")
        log.info("runner.q4_gemm_unavailable", reason="triton is not importable")
        return layers, report
    for index, module in enumerate(modules):
        if isinstance(module, ExLlamaV2Attention):
            linears = [module.q_proj, module.k_proj, module.v_proj, module.o_proj]
        elif isinstance(module, ExLlamaV2MLP) and module.gate_proj is not None:
            linears = [module.gate_proj, module.up_proj, module.down_proj]
        elif isinstance(module, ExLlamaV2Linear):
            linears = [module]
        else:
            continue
        found = [(linear, *q4_weights(linear)) for linear in linears]
        covered = all(weights is not None for _, weights, _ in found)
        for linear, weights, reason in found:
            if weights is None:
                report.append(LinearPath(linear.key, "exllamav2", reason))
            elif not covered:
                report.append(LinearPath(linear.key, "exllamav2", "another linear of its layer is not covered"))
            else:
                report.append(LinearPath(linear.key, "verispec"))
        if covered:
            layers[index] = Q4Layer([weights for _, weights, _ in found])
    fallback = [p for p in report if p.path != "verispec"]
    log.info(
        "runner.q4_gemm",
        linears_verispec=len(report) - len(fallback),
        linears_exllamav2=len(fallback),
        fallback=[f"{p.key}: {p.reason}" for p in fallback[:8]],
    )
    return layers, report


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def mlp_forward(module: Any, layer: Q4Layer, x: torch.Tensor) -> torch.Tensor:
    """Norm, gate and up (one launch), SiLU(gate) * up, down added to the residual x: [rows, hidden] fp16."""
    from verispec.kernels.q4_gemm import q4_matmul, q4_matmul_parts, silu_mul

    gate, up, down = layer.weights
    normed = module.pre_layernorm.forward(x)
    gated, upped = q4_matmul_parts(normed, [gate, up])
    return q4_matmul(silu_mul(gated, upped), down, residual=x)


def qkv_forward(module: Any, layer: Q4Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm and the q, k, v projections of an attention module (one launch): [rows, heads * head_dim] each."""
    from verispec.kernels.q4_gemm import q4_matmul_parts

    normed = module.pre_layernorm.forward(x)
    q, k, v = q4_matmul_parts(normed, layer.weights[:3])
    return q, k, v


def o_forward(layer: Q4Layer, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """o_proj added to the residual stream x."""
    from verispec.kernels.q4_gemm import q4_matmul

    return q4_matmul(attended, layer.weights[3], residual=x)


def head_forward(layer: Q4Layer, x: torch.Tensor) -> torch.Tensor:
    from verispec.kernels.q4_gemm import q4_matmul

    return q4_matmul(x, layer.weights[0])
