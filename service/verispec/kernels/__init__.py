"""GPU kernels written for verispec (Triton); imported only where a CUDA model runs."""

from __future__ import annotations

import contextlib

import torch

MAX_Q4_ROWS = 64  # rows the 4-bit GEMM takes; above this the GEMM is compute-bound and fp16 cuBLAS wins


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Makes the tensor's GPU current for a kernel launch (Triton launches on the current GPU); nothing on
    the CPU, where Triton's interpreter runs the kernels."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
