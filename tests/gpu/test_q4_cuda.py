"""The CUDA 4-bit GEMMs (tensor-core q4_mma, CUDA-core q4_gemv) against ExLlamaV2's own dequantization."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.gpu.test_q4_gemm import ODD_SHAPES, _exl2_tensors, _exllamav2_matrix, _gptq_tensors
from verispec.kernels import cuda_build, q4_cuda

pytestmark = pytest.mark.gpu

KERNELS = list(q4_cuda.KERNELS)


@pytest.fixture(autouse=True)
def _kernels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("exllamav2")

    reason = cuda_build.unavailable()
    assert reason is None, f"the CUDA kernels did not build on a CUDA machine: {reason}"


def _weights(layout: str, k: int, n: int, seed: int, act_order: bool) -> tuple[Any, torch.Tensor]:
    """Kernel weights over ExLlamaV2's shuffled tensors, and ExLlamaV2's dequantized matrix of them."""
    from verispec.runner.exl2_q4 import weights_from_tensors

    tensors = _exl2_tensors(k, n, seed, act_order) if layout == "exl2" else _gptq_tensors(k, n, seed, act_order)
    _handle, dense = _exllamav2_matrix(tensors)
    weights, reason = weights_from_tensors(tensors)
    assert weights is not None, reason
    return weights, dense


def _run(kernel: str, x: torch.Tensor, weights: Any, residual: torch.Tensor | None = None, **options: Any) -> Any:
    """One product through q4_cuda.KERNELS[kernel] (each also takes slices=)."""
    return q4_cuda.KERNELS[kernel]([x], [weights], [residual], **options)[0]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["exl2", "gptq"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("k", "n"), ODD_SHAPES)
def test_weights_are_exllamav2s_bit_for_bit(kernel: str, layout: str, act_order: bool, k: int, n: int) -> None:
    """The matrix each kernel multiplies by, read back through it, is get_weight_tensor_dq()."""
    from verispec.kernels.q4_gemm import dequantize

    if layout == "gptq" and act_order and k // 128 < 2:
        pytest.skip("GPTQ act-order needs more than one group")
    weights, expected = _weights(layout, k, n, 7, act_order)
    assert torch.equal(dequantize(weights, kernel=kernel), expected)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["exl2", "gptq"])
@pytest.mark.parametrize(("k", "n"), [*ODD_SHAPES, (8192, 1024)])
@pytest.mark.parametrize("slices", [None, 1, 3, 64])
def test_matches_dequantize_then_matmul_at_every_row_count(
    kernel: str, layout: str, k: int, n: int, slices: int | None
) -> None:
    """Every row count the kernel takes (1..64 tensor cores, 1..16 CUDA cores), any slicing of K, with and
    without a residual: the Triton kernel's tolerance."""

    weights, dense = _weights(layout, k, n, 3, False)
    generator = torch.Generator(device="cuda").manual_seed(11)
    most = q4_cuda.MAX_GEMV_ROWS if kernel == "gemv" else q4_cuda.MAX_MMA_ROWS
    for rows in range(1, most + 1):
        x = torch.randn((rows, k), generator=generator, device="cuda").half()
        residual = torch.randn((rows, n), generator=generator, device="cuda").half()
        expected = x.float() @ dense.float()
        scale = expected.abs().max().item()
        got = _run(kernel, x, weights, slices=slices)
        assert (got.float() - expected).abs().max().item() <= 2e-3 * scale + 1e-3, f"rows={rows}"
        with_residual = _run(kernel, x, weights, residual=residual, slices=slices)
        assert (with_residual.float() - (expected + residual.float())).abs().max().item() <= 2e-3 * scale + 2e-3


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_do_not_depend_on_the_batch(kernel: str) -> None:
    """A row's bits are the same at every row count (each compiled for a different row bound)."""
    weights, _ = _weights("exl2", 8192, 1024, 5, True)
    x = torch.randn((64, 8192), device="cuda").half()
    alone = _run(kernel, x[:1], weights)[0]
    for rows in (2, 3, 4, 5, 8, 9, 16) if kernel == "gemv" else (2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64):
        assert torch.equal(_run(kernel, x[:rows], weights)[0], alone), f"rows={rows}"


@pytest.mark.parametrize("layout", ["exl2", "gptq"])
def test_mma_pipelines_give_the_same_bits(layout: str) -> None:
    """Shared-memory staging and every depth of the register pipeline, with L2 prefetch or without, add the
    same products in the same order: equal bits at every row bound and slicing."""
    weights, _ = _weights(layout, 4096, 1000, 9, True)
    x = torch.randn((64, 4096), device="cuda").half()
    for rows in (1, 7, 8, 16, 24, 64):
        for slices in (1, 5):
            staged = q4_cuda.q4_mma(x[:rows], weights, slices=slices)
            for depth in q4_cuda.MMA_PIPELINES:
                for ahead in (0, 1, 4, 40):  # 40: past every slice's end
                    got = q4_cuda.q4_mma(x[:rows], weights, slices=slices, pipeline=depth, l2_prefetch=ahead)
                    assert torch.equal(got, staged), f"rows={rows} slices={slices} pipeline={depth} l2={ahead}"


def test_the_default_grid_fills_its_waves_of_blocks() -> None:
    """The occupancy calculator's resident blocks per SM are sane for every pipeline; on the 70B shapes the
    staged grid is one wave of them, and every pipeline's grid fills the waves of blocks it takes to three
    quarters."""
    device = torch.device("cuda", 0)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for pipeline in q4_cuda.MMA_PIPELINES:
        for gptq in (False, True):
            resident = q4_cuda.mma_resident_blocks(device, pipeline, gptq)
            assert 1 <= resident <= 16, f"pipeline={pipeline} gptq={gptq}: {resident}"
            for k, n in ((8192, 10240), (8192, 8192), (8192, 28672), (28672, 8192)):
                if pipeline == 0:
                    blocks = q4_cuda.mma_grid(k, [n], sms, resident)
                    assert blocks <= resident * sms, f"{k}x{n}"
                else:
                    blocks = -(-n // 128) * q4_cuda.mma_slices(k, [n], sms, resident)
                waves = -(-blocks // (resident * sms))
                assert blocks >= 0.75 * waves * resident * sms, f"{k}x{n} pipeline={pipeline}"


def test_every_row_tile_keeps_the_blocks_its_grid_is_cut_for() -> None:
    """Through shared memory, each tile count of rows takes the most stages that keep resident the blocks per
    SM the grid is cut for, so that no bucket of rows leaves part of its grid for a second wave; on a Hopper
    card (228 KB of shared memory per SM) that is four blocks at every bucket."""
    device = torch.device("cuda", 0)
    for gptq in (False, True):
        resident = q4_cuda.mma_resident_blocks(device, 0, gptq)
        if torch.cuda.get_device_capability(device) == (9, 0):
            assert resident == 4, f"gptq={gptq}"
        for rows in q4_cuda.ROW_BUCKETS:
            stages, blocks = q4_cuda.mma_occupancy(device, rows, 0, gptq)
            assert 2 <= stages <= 4 and blocks >= resident, f"rows={rows} gptq={gptq}: {stages} stages, {blocks}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_slices_are_added_inside_the_launch_and_the_counts_rearmed(kernel: str) -> None:
    """With K in slices, the last block of each column range to finish adds them in slice order: repeated
    launches give the same bits whichever block came last, the product is right, and the device's arrival
    counts are back at zero after every launch."""
    weights, dense = _weights("exl2", 2048, 1000, 17, False)
    x = torch.randn((3, 2048), device="cuda").half()
    for slices in (2, 4, 16):
        for _ in range(3):
            got = _run(kernel, x, weights, slices=slices)
            assert torch.equal(got, _run(kernel, x, weights, slices=slices)), f"slices={slices}"
        assert int(q4_cuda._ARRIVALS[0].count_nonzero()) == 0
    expected = x.float() @ dense.float()
    assert (got.float() - expected).abs().max().item() <= 2e-3 * expected.abs().max().item() + 1e-3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", ["exl2", "gptq"])
def test_parts_of_one_launch_give_each_products_bits(kernel: str, layout: str) -> None:
    """Two or three products in one launch (q, k and v; gate and up), each with its own input, width and
    residual, give the bits each gives launched alone at the same slices of K, at every row bound."""
    parts = [_weights(layout, 2048, n, seed, act_order=False)[0] for n, seed in ((1000, 21), (256, 22), (4104, 23))]
    most = q4_cuda.MAX_ROWS[kernel]
    for rows in (1, 5, 16, most):
        xs = [torch.randn((rows, 2048), device="cuda").half() for _ in parts]
        residuals = [None, torch.randn((rows, 256), device="cuda").half(), None]
        for count in (2, 3):
            for slices in (1, 4):
                together = q4_cuda.KERNELS[kernel](xs[:count], parts[:count], residuals[:count], slices)
                for i in range(count):
                    alone = _run(kernel, xs[i], parts[i], residual=residuals[i], slices=slices)
                    assert torch.equal(together[i], alone), f"rows={rows} parts={count} slices={slices} part={i}"
    assert int(q4_cuda._ARRIVALS[0].count_nonzero()) == 0


def test_q4_matmul_parts_shares_one_input_across_its_parts() -> None:
    """q4_matmul_parts takes one input for every part (each in its own sorted order) and matches
    dequantize-then-matmul for each; products that cannot share a launch (another K) are refused by name."""
    from verispec.kernels.q4_gemm import q4_matmul_parts

    parts = [_weights("exl2", 4096, n, seed, act_order=True) for n, seed in ((4096, 31), (1024, 32), (1024, 33))]
    for rows in (1, 3, 8, 40):
        x = torch.randn((rows, 4096), device="cuda").half()
        for (_, dense), got in zip(parts, q4_matmul_parts(x, [w for w, _ in parts]), strict=True):
            expected = x.float() @ dense.float()
            assert (got.float() - expected).abs().max().item() <= 2e-3 * expected.abs().max().item() + 1e-3
    other = _weights("exl2", 2048, 1024, 34, act_order=False)[0]
    with pytest.raises(ValueError, match="share a launch"):
        q4_cuda.q4_mma_parts([x, x[:, :2048]], [parts[0][0], other])


def test_silu_mul_is_torchs_three_kernels_bit_for_bit() -> None:
    """SiLU(gate) * up in one kernel gives the bits of F.silu, mul_ and clamp_ to fp16's range, also where
    the product overflows fp16 and for odd sizes."""
    import torch.nn.functional as F  # noqa: N812 (torch's own convention)

    for shape in ((1, 28672), (7, 1000), (64, 28672)):
        gate = (torch.randn(shape, device="cuda") * 6).half()
        up = (torch.randn(shape, device="cuda") * 6).half()
        up[0, :8] = torch.tensor([60000, -60000, 65504, 1, 0, -1, 2, 3], dtype=torch.half)
        gate[0, :8] = torch.tensor([30, 30, 3, -20, 5, 0, 60000, -60000], dtype=torch.half)
        expected = F.silu(gate).mul_(up).clamp_(min=-65504.0, max=65504.0)
        assert torch.equal(q4_cuda.silu_mul(gate, up), expected), f"shape={shape}"


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary"), [(64, 8, 128, 128), (9, 3, 64, 64), (8, 8, 128, 64)]
)
def test_rope_store_is_exllamav2s_rope_and_the_cache_writes_bit_for_bit(
    neox: bool, heads: int, kv_heads: int, head_dim: int, rotary: int
) -> None:
    """One kernel gives q and k the bits of ExLlamaV2's rope_ at each row's own position (full and partial
    rotary, NeoX and GPT-J pairs) and puts k and v in their slots of the caches; other slots untouched."""
    from exllamav2.ext import exllamav2_ext as ext_c

    torch.manual_seed(0)
    rows, slots_total, max_positions = 11, 96, 4096
    angles = torch.rand(max_positions, rotary, device="cuda") * 6.3
    sin, cos = (
        angles.sin().half().view(1, 1, max_positions, rotary),
        angles.cos().half().view(1, 1, max_positions, rotary),
    )
    q = torch.randn(rows, heads, head_dim, device="cuda").half()
    k = torch.randn(rows, kv_heads, head_dim, device="cuda").half()
    v = torch.randn(rows, kv_heads, head_dim, device="cuda").half()
    positions = torch.tensor([0, 1, 2, 3, 17, 18, 500, 4095, 64, 0, 9], dtype=torch.int32, device="cuda")
    slots = torch.randperm(slots_total, device="cuda")[:rows]
    k_cache = torch.randn(slots_total, kv_heads, head_dim, device="cuda").half()
    v_cache = torch.randn_like(k_cache)
    q_ref, k_ref, k_cache_ref, v_cache_ref = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    ext_c.rope_(q_ref, sin, cos, 0, heads, head_dim, positions, neox)
    ext_c.rope_(k_ref, sin, cos, 0, kv_heads, head_dim, positions, neox)
    k_cache_ref[slots] = k_ref
    v_cache_ref[slots] = v
    q4_cuda.rope_store(q, k, v, sin, cos, positions, slots, k_cache, v_cache, neox)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert torch.equal(k_cache, k_cache_ref) and torch.equal(v_cache, v_cache_ref)


def test_mma_is_captured_by_a_cuda_graph() -> None:
    """Launched on the current stream, the kernel replays inside a graph with the eager result."""

    weights, _ = _weights("exl2", 1024, 4104, 13, False)
    x = torch.randn((5, 1024), device="cuda").half()
    expected = q4_cuda.q4_mma(x, weights)
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        captured = q4_cuda.q4_mma(x, weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


def test_q4_matmul_takes_the_measured_kernel_and_gives_its_result() -> None:
    """q4_matmul times the kernels once per shape and bucket of rows and returns the bits of the one it
    chose; rows of one bucket share its choice."""
    from verispec.kernels.q4_gemm import _triton_matmul, q4_matmul

    weights, _ = _weights("exl2", 8192, 1024, 9, False)
    for rows in (1, 3, 4, 16, 40):
        x = torch.randn((rows, 8192), device="cuda").half()
        got = q4_matmul(x, weights)
        choice = q4_cuda._CHOICE[(0, 8192, (1024,), weights.group_size, False, q4_cuda.row_bucket(rows))]
        expected = _triton_matmul(x, weights) if choice == "triton" else _run(choice, x, weights)
        assert torch.equal(got, expected)
