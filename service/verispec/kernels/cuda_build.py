"""The CUDA kernels' library (q4_cuda.cu): compiled by nvcc where it runs or ahead of time, found, loaded.

The library's name carries a digest of the source and the architectures it holds code for. One built ahead
of time beside this package (`python -m verispec.kernels.cuda_build --arch 89,90`, as the GPU container
build does, where no GPU is present) or in the cache directory is used when it covers every visible GPU;
otherwise it is built into the cache directory on first use (10-30 s), which needs nvcc. It needs compute
capability 8.0 or newer; where it cannot be had, `unavailable()` says why and the Triton GEMM serves.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

_SOURCE = Path(__file__).with_name("q4_cuda.cu")


def _nvcc() -> str | None:
    """nvcc of the CUDA directory torch's extension builder finds ($CUDA_HOME, else nvcc's own), else the
    PATH's."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _architectures() -> list[str]:
    """Compute capabilities (as "89", "90") of every visible GPU."""
    found = {torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())}
    return [f"{major}{minor}" for major, minor in sorted(found)]


def library_name(architectures: list[str]) -> str:
    """The library's file name: a digest of the source, and the architectures it holds code for."""
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
    return f"q4_cuda-{digest}-sm{'_'.join(architectures)}.so"


def _built_for(path: Path) -> set[str]:
    return set(path.stem.rsplit("-sm", 1)[-1].split("_"))


def build(out_dir: Path, architectures: list[str], nvcc: str | None = None) -> Path:
    """Compiles the library for `architectures` into `out_dir` (written beside, then renamed into place, so
    concurrent builds race harmlessly). Needs no GPU: a container build can do it ahead of time."""
    nvcc = nvcc or _nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME): the CUDA kernels are compiled by nvcc")
    target = out_dir / library_name(architectures)
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in architectures]
    # --threads 0: one nvcc thread per CPU, so the architectures compile side by side.
    command = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--threads", "0", *gencode, str(_SOURCE)]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("kernels.q4_cuda_building", library=target.name, note="once per machine and source, 10-30 s")
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*command, "-o", str(built)], capture_output=True, text=True, check=True)
        built.replace(target)
    log.info("kernels.q4_cuda_built", seconds=round(time.perf_counter() - started, 1))
    return target


def prebuilt(architectures: list[str], folders: list[Path]) -> Path | None:
    """The first library of this source in `folders` that holds code for every one of `architectures`."""
    prefix = library_name(architectures).rsplit("-sm", 1)[0]
    for folder in folders:
        for path in sorted(folder.glob(f"{prefix}-sm*.so")):
            if set(architectures) <= _built_for(path):
                return path
    return None


def _find_or_build(architectures: list[str]) -> Path:
    """A library built ahead of time beside this module or in the cache directory, else one built now into
    the cache directory."""
    from verispec.config import default_cache_dir

    cache = default_cache_dir() / "kernels"
    return prebuilt(architectures, [Path(__file__).parent, cache]) or build(cache, architectures)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and why it cannot be had here."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    architectures = _architectures()
    if any(int(arch) < 80 for arch in architectures):
        return None, f"GPU architectures sm_{architectures}: the tensor-core kernel needs compute capability 8.0"
    try:
        library = ctypes.CDLL(str(_find_or_build(architectures)))
    except subprocess.CalledProcessError as exc:
        log.warning("kernels.q4_cuda_unavailable", error=(exc.stderr or "")[-800:])
        return None, f"nvcc failed: {(exc.stderr or '')[-300:]}"
    except OSError as exc:  # no nvcc, an unwritable cache, a library that does not load
        log.warning("kernels.q4_cuda_unavailable", error=str(exc))
        return None, f"{type(exc).__name__}: {exc}"
    pointer: type[ctypes.c_void_p | ctypes.c_int] = ctypes.c_void_p
    integer: type[ctypes.c_void_p | ctypes.c_int] = ctypes.c_int
    # parts, their pointers and sizes, arrivals, rows, K, group size, slices, per slice/warp, options, stream
    library.verispec_q4_mma.argtypes = [integer, pointer, pointer, pointer, *[integer] * 7, pointer]
    library.verispec_q4_gemv.argtypes = [integer, pointer, pointer, pointer, *[integer] * 6, pointer]
    counts = ctypes.POINTER(ctypes.c_int)
    library.verispec_q4_mma_resident_blocks.argtypes = [integer, integer, counts]
    library.verispec_q4_mma_occupancy.argtypes = [integer, integer, integer, counts, counts]
    library.verispec_silu_mul.argtypes = [pointer, pointer, pointer, integer, pointer]
    # q, k, v, sin, cos, positions, slots, k_cache, v_cache; rows, heads, kv_heads, head_dim, rotary, neox; stream
    library.verispec_rope_store.argtypes = [*[pointer] * 9, *[integer] * 6, pointer]
    entries = (
        "verispec_q4_mma",
        "verispec_q4_gemv",
        "verispec_q4_mma_resident_blocks",
        "verispec_q4_mma_occupancy",
        "verispec_silu_mul",
    )
    for entry in (*entries, "verispec_rope_store"):
        getattr(library, entry).restype = integer
    library.verispec_error_string.argtypes = [integer]
    library.verispec_error_string.restype = ctypes.c_char_p
    return library, ""


def unavailable() -> str | None:
    """Why the CUDA kernels cannot run here, or None when they can."""
    library, reason = _library()
    return None if library is not None else reason


def loaded() -> ctypes.CDLL:
    library, reason = _library()
    if library is None:
        raise RuntimeError(f"the CUDA 4-bit kernels are not available: {reason}")
    return library


def raise_on(library: ctypes.CDLL, entry: str, error: int) -> None:
    if error:
        raise RuntimeError(f"{entry}: {library.verispec_error_string(error).decode()}")


def main(argv: list[str] | None = None) -> int:
    """Builds the library ahead of time: `python -m verispec.kernels.cuda_build --arch 89,90 [--out DIR]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m verispec.kernels.cuda_build", description=main.__doc__)
    parser.add_argument(
        "--arch", required=True, help="compute capabilities: '8.9,9.0' or '89;90' (8.9: RTX 4090, 9.0: H100/H200)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder (default: this package)")
    args = parser.parse_args(argv)
    architectures = sorted({arch.strip().replace(".", "") for arch in args.arch.replace(";", ",").split(",")} - {""})
    print(build(args.out, architectures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
