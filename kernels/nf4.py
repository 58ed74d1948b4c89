"""NF4/FP4 weights with blockwise absmax (optionally double-quantized), bitsandbytes layout.

    codes   uint8 [ceil(N*K/2)]  row-major [N, K] weight flattened, element 2i in the HIGH nibble of byte i
    lut     float32 [16]         the NF4 or FP4 code table (whatever the packer used)
    absmax  float32 [ceil(N*K/blocksize)], or with double quant uint8 codes of it:
    code2   float32 [256]        bnb's dynamic 8-bit map; absmax = code2[c] * absmax2[b // 256] + offset
    absmax2 float32 [ceil(n_blocks/256)]
    W.flat[i] = lut[code(i)] * absmax[i // blocksize]

Kernels, chosen per shape by the tuner among the candidates of kernels/registry.py: the generic
dequantize-matmul skeleton (kernels/matmul.py, any shape); for decode (M <= 4) where every row of W holds
whole blocks (K % blocksize == 0, K % 8 == 0) the word-at-a-time kernel of kernels/nf4_decode.py and, with
fp16 activations, kernels/nf4_h2.py (fp16x2 arithmetic on a column copy of the codes); for 2-32 tokens
kernels/nf4_tc.py (the same copy and register table, the looked-up tile fed to tensor cores).
"""

import torch

from qbench.kernels.matmul import Nf4Layout
from qbench.kernels.registry import tuned_matmul


def nf4_matmul(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, N: int,
               blocksize: int = 64, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
               offset: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N]. Double quant when absmax2 is given (absmax then holds uint8 codes)."""
    K = x.shape[-1]
    if codes.numel() != -(-N * K // 2) or absmax.numel() != -(-N * K // blocksize):
        raise ValueError(f"codes {codes.numel()} / absmax {absmax.numel()} do not fit N={N}, K={K}, blocksize={blocksize}")
    layout = Nf4Layout(codes, absmax, lut.float(), absmax2, code2, float(offset), blocksize, N)
    return tuned_matmul("nf4", "nf4", layout.tune_key(), x, layout, config)
