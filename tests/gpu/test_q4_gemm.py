"""The Triton 4-bit GEMM against ExLlamaV2's own dequantization, on EXL2 and GPTQ tensors and a real model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

ODD_SHAPES = [(256, 8), (384, 200), (640, 1000), (1024, 4104)]  # (in, out): several groups, ragged tiles
# The kernel's dequantize and MMA variants
VARIANTS = ["default", "half2", "swap_ab", "half2_swap_ab", "interleave", "half2_interleave"]


def _config(variant: str, weights: Any) -> Any:
    """The default tiles of `weights` with the variant's flags."""
    from dataclasses import replace

    from verispec.kernels.q4_gemm import default_config

    base = default_config(weights, torch.cuda.get_device_properties(0).multi_processor_count)
    return replace(base, half2="half2" in variant, swap_ab="swap_ab" in variant, interleave="interleave" in variant)


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("exllamav2")
    pytest.importorskip("triton")


def _exl2_tensors(k: int, n: int, seed: int, act_order: bool) -> dict[str, torch.Tensor]:
    """A random 4-bit EXL2 linear as a checkpoint stores it, with a random input permutation when act_order."""
    from verispec.tools.synth import exl2_linear

    generator = torch.Generator(device="cuda").manual_seed(seed)
    tensors = exl2_linear(k, n, 4, generator, "cuda")
    invperm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(k)
    tensors["q_invperm"] = invperm.to(torch.int16)
    tensors["q_perm"] = torch.argsort(invperm).to(torch.int16)
    return {name: tensor.cuda() for name, tensor in tensors.items()}


def _gptq_tensors(k: int, n: int, seed: int, act_order: bool, group_size: int = 128) -> dict[str, torch.Tensor]:
    """A random 4-bit GPTQ linear: qweight [k/8, n], qzeros [groups, n/8], fp16 scales, g_idx."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    info = torch.iinfo(torch.int32)
    groups = k // group_size

    def words(*shape: int) -> torch.Tensor:
        return torch.randint(info.min, info.max, shape, dtype=torch.int32, generator=generator, device="cuda")

    g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=generator, device="cuda")]
    return {
        "qweight": words(k // 8, n),
        "qzeros": words(groups, n // 8),
        "scales": (torch.rand((groups, n), generator=generator, device="cuda") * 0.004 + 0.0005).half(),
        "g_idx": g_idx.contiguous(),
    }


def _exllamav2_matrix(tensors: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """ExLlamaV2's QMatrix over the tensors (shuffled in place, as at load) and its own dequantization."""
    from exllamav2.ext import exllamav2_ext as ext_c
    from exllamav2.ext import make_q_matrix

    packed = tensors["q_weight"] if "q_weight" in tensors else tensors["qweight"]
    k, n = packed.shape[0] * 8, packed.shape[1]
    temp_dq = torch.empty(k * n, dtype=torch.half, device="cuda")
    handle = make_q_matrix(tensors, temp_dq)
    dequantized = torch.empty((k, n), dtype=torch.half, device="cuda")
    ext_c.reconstruct(handle, dequantized)  # what ExLlamaV2Linear.get_weight_tensor_dq() returns
    return handle, dequantized


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["exl2", "gptq"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("k", "n"), ODD_SHAPES)
def test_kernel_weights_are_exllamav2s_bit_for_bit(layout: str, act_order: bool, k: int, n: int, variant: str) -> None:
    """The matrix the kernel multiplies by (read back through the kernel itself) is get_weight_tensor_dq()."""
    from verispec.kernels.q4_gemm import dequantize
    from verispec.runner.exl2_q4 import weights_from_tensors

    if layout == "gptq" and k // 128 < 2:
        pytest.skip("GPTQ act-order needs more than one group")
    tensors = _exl2_tensors(k, n, 7, act_order) if layout == "exl2" else _gptq_tensors(k, n, 7, act_order)
    _handle, expected = _exllamav2_matrix(tensors)
    weights, reason = weights_from_tensors(tensors)
    assert weights is not None, reason
    assert (weights.perm is not None) == act_order
    assert torch.equal(dequantize(weights, _config(variant, weights)), expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["exl2", "gptq"])
@pytest.mark.parametrize(("k", "n"), ODD_SHAPES)
def test_kernel_matches_dequantize_then_matmul_for_1_to_64_rows(layout: str, k: int, n: int, variant: str) -> None:
    """Every row count 1..64, with and without a residual: fp32 accumulation, one fp16 rounding."""
    from verispec.kernels.q4_gemm import q4_matmul
    from verispec.runner.exl2_q4 import weights_from_tensors

    tensors = _exl2_tensors(k, n, 3, True) if layout == "exl2" else _gptq_tensors(k, n, 3, True)
    _handle, dense = _exllamav2_matrix(tensors)
    weights, reason = weights_from_tensors(tensors)
    assert weights is not None, reason
    config = _config(variant, weights)
    generator = torch.Generator(device="cuda").manual_seed(11)
    for rows in range(1, 65):
        x = torch.randn((rows, k), generator=generator, device="cuda").half()
        residual = torch.randn((rows, n), generator=generator, device="cuda").half()
        expected = x.float() @ dense.float()
        got = q4_matmul(x, weights, config=config)
        scale = expected.abs().max().item()
        assert (got.float() - expected).abs().max().item() <= 2e-3 * scale + 1e-3, f"rows={rows}"
        with_residual = q4_matmul(x, weights, residual=residual, config=config)
        assert (with_residual.float() - (expected + residual.float())).abs().max().item() <= 2e-3 * scale + 2e-3


def test_kernel_rows_do_not_depend_on_the_batch() -> None:
    """A row's result from the Triton kernel is the same whichever rows share its launch (q4_matmul may
    hand few rows to the CUDA-core kernel instead, whose own rows are tested the same way)."""
    from verispec.kernels.q4_gemm import q4_matmul
    from verispec.runner.exl2_q4 import weights_from_tensors

    tensors = _exl2_tensors(1024, 4104, 5, True)
    _exllamav2_matrix(tensors)
    weights, _ = weights_from_tensors(tensors)
    assert weights is not None
    config = _config("default", weights)
    x = torch.randn((16, 1024), device="cuda").half()
    batched = q4_matmul(x, weights, config=config)
    for row in (0, 7, 15):
        assert torch.equal(q4_matmul(x[row : row + 1], weights, config=config)[0], batched[row])


def test_every_linear_of_the_tiny_model_takes_the_kernel(exl2: Any) -> None:
    """A uniform 4-bit EXL2 model: every decoder linear and the head are covered, none falls back."""
    from verispec.kernels.q4_gemm import dequantize
    from verispec.runner.exl2_q4 import plan_layers, q4_weights

    layers, report = plan_layers(exl2.model.modules, "auto")
    assert report and all(path.path == "verispec" for path in report)
    assert len(layers) == 2 * exl2.model.config.num_hidden_layers + 1  # attention and MLP per layer, the head
    linear = exl2.model.modules[1].q_proj
    weights, _ = q4_weights(linear)
    assert weights is not None
    assert torch.equal(dequantize(weights), linear.get_weight_tensor_dq())


def test_a_model_of_other_widths_falls_back_and_says_why(tmp_path: Any) -> None:
    """5-bit EXL2 layers stay on ExLlamaV2's kernel, each with its reason in the report."""
    from verispec.backends.exl2 import Exl2Backend
    from verispec.runner.exl2_q4 import plan_layers
    from verispec.tools.synth import synth

    synth("tiny", tmp_path, bits=5, seed=4, device="cuda")
    backend = Exl2Backend(tmp_path, "tiny-5bit")
    layers, report = plan_layers(backend.model.modules, "auto")
    assert not layers
    assert report and all(path.path == "exllamav2" and "[5]" in path.reason for path in report)
    assert plan_layers(backend.model.modules, "exllamav2") == ({}, [])
