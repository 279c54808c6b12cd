"""GPU kernels written for verispec (Triton, CUDA) and the 4-bit weights they read; the kernel modules are
imported only where a CUDA model runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

MAX_Q4_ROWS = 64  # rows the 4-bit GEMM takes; above this the GEMM is compute-bound and fp16 cuBLAS wins


_SMS: dict[int, int] = {}


def device_index(device: torch.device) -> int:
    """The index of a CUDA device, the current one where `device` names none."""
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, which the kernels size their grids by; 8 on the CPU, where
    Triton's interpreter runs them."""
    if device.type != "cuda":
        return 8
    index = device_index(device)
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Makes the tensor's GPU current for a kernel launch (Triton launches on the current GPU); nothing on
    the CPU, where Triton's interpreter runs the kernels."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@dataclass(frozen=True)
class Q4Weights:
    """One 4-bit linear as the kernels read it: the tensors ExLlamaV2 holds, plus what they mean. Rows of the
    matrix are in ExLlamaV2's sorted order (q4_gemm.py describes the layouts)."""

    qweight: torch.Tensor  # int32 [K/8, N]
    scales: torch.Tensor  # EXL2: int32 [G, N/8] scale codes; GPTQ: fp16 [G, N]
    scale_max: torch.Tensor | None  # EXL2: fp16 [G]; GPTQ: None
    zeros: torch.Tensor | None  # GPTQ: int32 [G, N/8]; EXL2: None (zero point 8)
    perm: torch.Tensor | None  # int64 [K]: input column of each sorted row; None: identity
    group_size: int
    in_features: int  # K
    out_features: int  # N

    @property
    def gptq(self) -> bool:
        return self.zeros is not None
