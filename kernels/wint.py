"""W{2..8}A16 integer weights (RTN, GPTQ, AWQ) times fp16/bf16 activations, from the packed GPTQ layout.

Layout (qbench/quant/qlinear.py, packing.py), K = in_features, N = out_features:
    qweight [ceil(K*bits/32), N] int32   little-endian bit stream of codes along K
    qzeros  [G, ceil(N*bits/32)] int32   the same stream along N, no -1 offset
    scales  [G, N] fp16
    g_idx   [K] int32 or None            None: group k // group_size (act-order passes the permutation)
    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

Kernels, chosen per shape by the tuner among the candidates of kernels/registry.py: the generic
dequantize-matmul skeleton (kernels/matmul.py: every bit width, act-order, any M); for decode (M <= 4) at
2, 3, 4 or 8 bits without act-order the fp16x2 kernel (kernels/wint_h2.py, fp16 activations) or the fp32
one (kernels/wint_decode.py, other dtypes); for 2-32 tokens at 4 and 8 bits the tensor-core kernels
(kernels/wint_tc.py; on Hopper at 4 bits kernels/wint_mma.py).
"""

import torch

from qbench.kernels.matmul import WintLayout
from qbench.kernels.registry import tuned_matmul


def is_default_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx is k // group_size (no act-order), so the kernel may skip reading it."""
    K = g_idx.numel()
    size = K if group_size <= 0 else group_size
    default = torch.arange(K, device=g_idx.device, dtype=torch.int32) // size
    return bool(torch.equal(g_idx.to(torch.int32), default))


def wint_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype. group_size -1 (or >= K) is one group per column."""
    K, N = x.shape[-1], scales.shape[1]
    if qweight.shape != (-(-K * bits // 32), N) or qzeros.shape != (scales.shape[0], -(-N * bits // 32)):
        raise ValueError(f"packed shapes {tuple(qweight.shape)}, {tuple(qzeros.shape)} do not fit K={K}, N={N}, bits={bits}")
    group = 0 if group_size <= 0 or group_size >= K else group_size
    layout = WintLayout(qweight, qzeros, scales, g_idx, bits, group)
    return tuned_matmul("wint", "wint", layout.tune_key(), x, layout, config)


def wint_min_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor, bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T for W = (q - z) * s - mins, mins fp16 [G, N]: integer codes whose zero points are
    floats (HQQ, qbench/quant/float_zero.py), on the same kernels as GGUF's min term (kernels/gguf.py):
    the fp16x2 decode and tensor-core kernels with HAS_MIN where the groups tile K, and for any shape
    the integer skeleton followed by out -= (sums of x over each group) @ mins. A short last group
    (group_size not dividing K) takes the skeleton only: its sums come from x padded with zeros."""
    K = x.shape[-1]
    if mins.shape != scales.shape:
        raise ValueError(f"mins {tuple(mins.shape)} must have the shape of scales {tuple(scales.shape)}")
    group = 0 if group_size <= 0 or group_size >= K else group_size
    layout = WintLayout(qweight, qzeros, scales, None, bits, group, mins)
    return tuned_matmul("wint_min", "wint_min", (bits, group), x, layout, config)
