"""GGUF Q4_0, Q8_0 and Q4_K weights times activations, straight from the ggml block bytes.

    raw uint8 [N, K/block_elems*block_bytes]: each row of W as the GGUF file stores it (see dequant.py)
    Q4_0: 32 elements in 18 B, Q8_0: 32 in 34 B, Q4_K: 256 in 144 B.
"""

import torch

from qbench.kernels.dequant import Q4_0, Q4_K, Q8_0
from qbench.kernels.matmul import GGUF, dequant_matmul

BLOCKS = {"q4_0": (Q4_0, 32, 18), "q8_0": (Q8_0, 32, 34), "q4_k": (Q4_K, 256, 144)}  # type, elems, bytes


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N], W given as ggml blocks of type qtype (q4_0 | q8_0 | q4_k)."""
    code, elems, nbytes = BLOCKS[qtype]
    K, N = x.shape[-1], raw.shape[0]
    if K % elems or raw.shape[1] != K // elems * nbytes or raw.dtype != torch.uint8:
        raise ValueError(f"{qtype}: raw {tuple(raw.shape)} {raw.dtype} does not fit K={K}")
    return dequant_matmul(GGUF, x, N, (raw.contiguous(),), (code,), i0=raw.shape[1], name=qtype, config=config)
