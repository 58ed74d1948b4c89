"""W{2..8}A16 integer weights (RTN, GPTQ, AWQ) times fp16/bf16 activations, from the packed GPTQ layout.

Layout (qbench/quant/qlinear.py, packing.py), K = in_features, N = out_features:
    qweight [ceil(K*bits/32), N] int32   little-endian bit stream of codes along K
    qzeros  [G, ceil(N*bits/32)] int32   the same stream along N, no -1 offset
    scales  [G, N] fp16
    g_idx   [K] int32 or None            None: group k // group_size (act-order passes the permutation)
    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]
"""

import torch

from qbench.kernels.matmul import WINT, dequant_matmul


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
    act_order = g_idx is not None
    ptrs = (qweight, qzeros, scales, g_idx) if act_order else (qweight, qzeros, scales)
    return dequant_matmul(WINT, x, N, ptrs, (bits, group, act_order), i0=qzeros.shape[1], name="wint", config=config)
