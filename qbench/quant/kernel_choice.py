"""Which implementation a quantized layer's forward uses: qbench's Triton kernels or the torch reference.

    kernel=torch   always the torch reference (dequantize, then matmul)
    kernel=triton  always Triton: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow, for tests)
    kernel=auto    Triton when the input is on CUDA and triton imports, torch otherwise
"""

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Looked up once: find_spec walks sys.path (62 us on a 2-core host), and every quantized layer's
    forward asks, 210 times per token on SmolLM2."""
    return importlib.util.find_spec("triton") is not None


def use_triton(kernel: str, x: torch.Tensor) -> bool:
    if kernel == "torch":
        return False
    if kernel == "triton":
        if not triton_available():
            raise RuntimeError("kernel=triton but triton is not installed (pip install triton); use kernel=auto or torch")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("kernel=triton needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); use kernel=auto")
        return True
    return x.is_cuda and triton_available()
