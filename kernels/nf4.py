"""NF4/FP4 weights with blockwise absmax (optionally double-quantized), bitsandbytes layout.

    codes   uint8 [ceil(N*K/2)]  row-major [N, K] weight flattened, element 2i in the HIGH nibble of byte i
    lut     float32 [16]         the NF4 or FP4 code table (whatever the packer used)
    absmax  float32 [ceil(N*K/blocksize)], or with double quant uint8 codes of it:
    code2   float32 [256]        bnb's dynamic 8-bit map; absmax = code2[c] * absmax2[b // 256] + offset
    absmax2 float32 [ceil(n_blocks/256)]
    W.flat[i] = lut[code(i)] * absmax[i // blocksize]
"""

import torch

from qbench.kernels.matmul import NF4, dequant_matmul


def nf4_matmul(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, N: int,
               blocksize: int = 64, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
               offset: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N]. Double quant when absmax2 is given (absmax then holds uint8 codes)."""
    K = x.shape[-1]
    if codes.numel() != -(-N * K // 2) or absmax.numel() != -(-N * K // blocksize):
        raise ValueError(f"codes {codes.numel()} / absmax {absmax.numel()} do not fit N={N}, K={K}, blocksize={blocksize}")
    double = absmax2 is not None
    ptrs = (codes.view(-1), absmax.view(-1), lut.float(), absmax2, code2) if double else \
        (codes.view(-1), absmax.view(-1).float(), lut.float())
    return dequant_matmul(NF4, x, N, ptrs, (blocksize, double), f0=float(offset), name="nf4", config=config)
