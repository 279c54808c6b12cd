"""The CUDA 4-bit kernels' build and launch arithmetic, on a machine without a GPU (the kernels themselves
are tested on one, in tests/gpu/test_q4_cuda.py)."""

from __future__ import annotations

import ctypes
import itertools
import shutil
from pathlib import Path

import pytest

from verispec.kernels import Q4Weights, cuda_build, q4_cuda


def _weights(k: int, n: int) -> Q4Weights:
    import torch

    empty = torch.empty(0)
    return Q4Weights(empty, empty, empty, None, None, 128, k, n)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_cuda_source_compiles_for_ada_and_hopper_and_exports_its_entry_points(tmp_path: Path) -> None:
    """nvcc builds the library for sm_89 and sm_90 without a GPU (as the container build does), and the
    library loads without a GPU driver and names every C entry point ctypes calls."""
    path = cuda_build.main(["--arch", "8.9;9.0", "--out", str(tmp_path)]) == 0 and next(tmp_path.glob("*.so"))
    assert path and path.name == cuda_build.library_name(["89", "90"])
    library = ctypes.CDLL(str(path))
    entries = ("verispec_q4_mma", "verispec_q4_gemv", "verispec_q4_mma_resident_blocks", "verispec_q4_mma_occupancy")
    for entry in (*entries, "verispec_silu_mul", "verispec_rope_store", "verispec_error_string"):
        assert hasattr(library, entry)


def test_a_library_built_ahead_is_used_only_when_it_covers_every_gpu(tmp_path: Path) -> None:
    """Names carry the source digest and architectures: another source's library, or one without code for
    a visible GPU, is passed over."""
    (tmp_path / cuda_build.library_name(["89", "90"])).touch()
    (tmp_path / "q4_cuda-0000000000000000-sm80_86_89_90.so").touch()  # an older source
    assert cuda_build.prebuilt(["90"], [tmp_path]) == tmp_path / cuda_build.library_name(["89", "90"])
    assert cuda_build.prebuilt(["89", "90"], [tmp_path]) is not None
    assert cuda_build.prebuilt(["80", "90"], [tmp_path]) is None


@pytest.mark.parametrize(("k", "n"), [(8192, 10240), (8192, 8192), (8192, 28672), (28672, 8192), (8192, 1024)])
def test_k_is_cut_into_whole_batches_that_fill_their_waves_of_blocks(k: int, n: int) -> None:
    """Through registers every block of columns is cut into runs of whole batches of 128, none empty, and the
    blocks fill the waves they take (SMs x resident blocks each) to three quarters, unless every batch already
    has its own run: for the 70B shapes on 132 or 16 SMs, two to four blocks resident on each."""
    column_blocks, batches = -(-n // 128), k // 128
    for sms in (132, 16):
        for resident in (2, 3, 4):
            slices = q4_cuda.mma_slices(k, [n], sms, resident)
            assert 1 <= slices <= batches
            waves = -(-column_blocks * slices // (resident * sms))
            assert slices == batches or column_blocks * slices >= 0.75 * waves * resident * sms


def _shares(batches: int, column_blocks: int, blocks: int) -> list[list[tuple[int, int, int]]]:
    """The staged kernel's cut, as q4_cuda.cu's q4_mma_kernel walks it: for each grid block, its (block of
    columns, first batch, end batch) runs."""
    units = batches * column_blocks
    shares = []
    for block in range(blocks):
        unit, end = block * units // blocks, (block + 1) * units // blocks
        runs = []
        while unit < end:
            column_block, first = divmod(unit, batches)
            last = min(batches, first + end - unit)
            runs.append((column_block, first, last))
            unit += last - first
        shares.append(runs)
    return shares


@pytest.mark.parametrize(("k", "n"), [(8192, 10240), (8192, 8192), (8192, 28672 * 2), (28672, 8192), (2048, 3072)])
def test_the_staged_grid_cuts_every_batch_once_into_even_shares(k: int, n: int) -> None:
    """Through shared memory each grid block takes an even share of the blocks of columns times their batches,
    within one batch of each other: every batch of every block of columns is taken once, its runs follow one
    another in K, and most_runs is the most runs any block of columns has (room for its partial sums)."""
    column_blocks, batches = -(-n // 128), k // 128
    for sms, resident in ((132, 4), (16, 3)):
        blocks = q4_cuda.mma_grid(k, [n], sms, resident)
        assert 1 <= blocks <= batches * column_blocks
        shares = _shares(batches, column_blocks, blocks)
        sizes = [sum(last - first for _, first, last in runs) for runs in shares]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        by_block: dict[int, list[tuple[int, int]]] = {}
        for runs in shares:
            for column_block, first, last in runs:
                by_block.setdefault(column_block, []).append((first, last))
        assert sorted(by_block) == list(range(column_blocks))
        for runs_of_block in by_block.values():
            assert runs_of_block[0][0] == 0 and runs_of_block[-1][1] == batches
            assert all(a[1] == b[0] for a, b in itertools.pairwise(runs_of_block))
        assert q4_cuda.most_runs(batches, column_blocks, blocks) == max(len(r) for r in by_block.values())


def test_the_staged_grid_takes_even_shares_where_whole_runs_would_leave_a_wave_idle() -> None:
    """On 132 SMs holding 4 blocks (528 places): gate and up of a 70B layer (448 blocks of columns, one run of
    K each) and qkv (80 blocks in 6 runs: 480) take one wave of 528 even shares; o and down (64 blocks of
    columns in 8 runs: 512) and a 1B draft's products keep whole runs, a block each."""
    assert q4_cuda.mma_grid(8192, [28672, 28672], 132, 4) == 528
    assert q4_cuda.mma_grid(8192, [8192, 1024, 1024], 132, 4) == 528
    for k, n in ((8192, 8192), (28672, 8192)):
        assert q4_cuda.mma_grid(k, [n], 132, 4) == 64 * q4_cuda.mma_slices(k, [n], 132, 4) == 512
    for k, widths in ((2048, [2048, 512, 512]), (2048, [8192, 8192]), (8192, [2048])):
        slices = q4_cuda.mma_slices(k, widths, 132, 4)
        assert q4_cuda.mma_grid(k, widths, 132, 4) == sum(-(-n // 128) for n in widths) * slices


def test_given_slices_the_staged_grid_cuts_each_block_of_columns_alike() -> None:
    """A grid of blocks of columns x slices cuts every block of columns into exactly `slices` runs, as the
    register pipelines' grid does (so the two add the same sums in the same order)."""
    for batches, column_blocks, slices in ((64, 80, 6), (32, 8, 5), (16, 3, 16), (64, 1, 7)):
        shares = _shares(batches, column_blocks, column_blocks * slices)
        assert all(len(runs) == 1 for runs in shares)
        assert q4_cuda.most_runs(batches, column_blocks, column_blocks * slices) == slices
        for index, runs in enumerate(shares):
            _, first, last = runs[0]
            assert (first, last) == (index % slices * batches // slices, (index % slices + 1) * batches // slices)


def test_a_wave_filled_past_its_end_is_avoided() -> None:
    """qkv (8192x10240, 80 blocks of columns) on 132 SMs holding 4 blocks: 6 slices (480 blocks, one wave of
    528), not 7 (560: a second wave of 32 blocks)."""
    assert q4_cuda.mma_slices(8192, [10240], 132, 4) == 6


def test_without_a_gpu_the_kernels_say_why_and_take_nothing() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cuda_build.unavailable() == "no CUDA device"
    assert not q4_cuda.covers(_weights(8192, 8192), 1)


def test_kernel_choices_are_made_per_bucket_of_rows() -> None:
    """Ragged row counts share the timing of their bucket (q4_mma's bound of rows), so at most nine per shape."""
    assert [q4_cuda.row_bucket(rows) for rows in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25, 33, 48, 49, 64)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 32, 48, 48, 64, 64,
    ]  # fmt: skip
    assert len({q4_cuda.row_bucket(rows) for rows in range(1, q4_cuda.MAX_MMA_ROWS + 1)}) == 9


def test_every_kernel_fastest_can_choose_has_a_row_bound_and_a_bad_pipeline_is_refused_by_name() -> None:
    """KERNELS and MAX_ROWS name the same kernels; a register-pipeline depth the library has no code for is
    refused before any launch, with the argument named."""
    import torch

    assert set(q4_cuda.KERNELS) == set(q4_cuda.MAX_ROWS)
    assert q4_cuda.REGISTER_PIPELINE in q4_cuda.MMA_PIPELINES[1:]
    with pytest.raises(ValueError, match="pipeline must be one of"):
        q4_cuda.q4_mma(torch.empty(1, 8192, dtype=torch.float16), _weights(8192, 8192), pipeline=5)
