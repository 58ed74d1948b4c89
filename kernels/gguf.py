"""GGUF weights times activations, straight from the ggml block bytes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

    raw uint8 [N, K/block_elems*block_bytes]: each row of W as the GGUF file stores it (see dequant.py)
    block layouts: kernels/dequant.py
"""

import torch

from qbench.kernels.dequant import Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from qbench.kernels.matmul import GGUF, dequant_matmul

BLOCKS = {"q4_0": (Q4_0, 32, 18), "q8_0": (Q8_0, 32, 34), "q4_k": (Q4_K, 256, 144),  # type, elems, bytes
          "q4_1": (Q4_1, 32, 20), "q5_0": (Q5_0, 32, 22), "q5_1": (Q5_1, 32, 24), "q5_k": (Q5_K, 256, 176),
          "q6_k": (Q6_K, 256, 210), "q2_k": (Q2_K, 256, 84), "q3_k": (Q3_K, 256, 110)}


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N], W given as ggml blocks of type qtype (a key of BLOCKS)."""
    code, elems, nbytes = BLOCKS[qtype]
    K, N = x.shape[-1], raw.shape[0]
    if K % elems or raw.shape[1] != K // elems * nbytes or raw.dtype != torch.uint8:
        raise ValueError(f"{qtype}: raw {tuple(raw.shape)} {raw.dtype} does not fit K={K}")
    return dequant_matmul(GGUF, x, N, (raw.contiguous(),), (code,), i0=raw.shape[1], name=qtype, config=config)
