"""GPU kernels written for verispec (Triton); imported only where a CUDA model runs."""

MAX_Q4_ROWS = 64  # rows the 4-bit GEMM takes; above this the GEMM is compute-bound and fp16 cuBLAS wins
