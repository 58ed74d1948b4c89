"""One dequantize-matmul kernel skeleton for the weight-only formats (WINT, NF4/FP4, GGUF).

out[M, N] = x[M, K] @ W^T, W dequantized tile by tile in registers (kernels/dequant.py), never
written to memory. Two shapes of the same kernel:
- decode (M <= 16): BLOCK_M = 1 multiplies and reduces on the CUDA cores (a GEMV), BLOCK_M = 16 uses
  tl.dot; the K range is split over SPLIT_K programs that add into a float32 output (split-K), which
  fills the GPU when N alone gives too few tiles;
- prefill: a tiled GEMM (BLOCK_M 64/128) with grouped tile order for L2 reuse, tl.dot on the tensor cores.
Two more candidates compete with it in the tuner: a format's own decode kernel (`fast`, e.g.
kernels/wint.py, kernels/nf4.py), and for M > 4 "dequantize, then cuBLAS": dequant_kernel
writes W^T once in the activation dtype (the same dequant device functions, one pass over the packed
bytes) and torch.matmul multiplies. At prefill sizes the fused GEMM dequantizes every weight tile
once per row-tile of M (16 times at M=2048 with 128-row tiles) and feeds the tensor cores from
registers, while the one-pass dequantization costs about (2 + packed bytes) per weight of memory
traffic, a small fraction of a large matmul.
Candidate configs are generated from the shape and the SM count (no shape is hard-coded) and timed
once per shape by kernels/tune.py.
"""

import functools

import torch
import triton
import triton.language as tl

from qbench.kernels.dequant import dequant_tile
from qbench.kernels.tune import cdiv, m_bucket, pick

WINT, NF4, GGUF = 0, 1, 2


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid: GROUP_M row tiles walk the column tiles together, so a
    column tile of W is reused from L2 by GROUP_M row tiles (Triton's matmul tutorial order)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def dequant_matmul_kernel(x_ptr, out_ptr, p0, p1, p2, p3, p4, f0,
                          M, N, K, stride_xm, stride_om, i0, SPLIT_K,
                          FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, ATOMIC: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per_split + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(p0, p1, p2, p3, p4, f0, offs_k, offs_n, k0, N, K, i0, FMT, C0, C1, C2, BLOCK_K)
        kmask = offs_k < K
        if BLOCK_M == 1:
            xk = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                         mask=kmask[:, None] & mmask[None, :], other=0.0)
            acc += tl.sum(xk.to(tl.float32) * w, axis=0)[None, :]
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            if x_ptr.dtype.element_ty == tl.float32:
                acc += tl.dot(x, w, input_precision="ieee")  # no silent tf32 for float32 models
            else:
                acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = mmask[:, None] & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=omask)
    else:
        tl.store(out, acc, mask=omask)


@triton.jit
def dequant_kernel(out_ptr, p0, p1, p2, p3, p4, f0, N, K, i0,
                   FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [K, N] = W^T, dequantized from the packed bytes, in out's dtype."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = dequant_tile(p0, p1, p2, p3, p4, f0, offs_k, offs_n, k0, N, K, i0, FMT, C0, C1, C2, BLOCK_K)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_t(fmt: int, K: int, N: int, ptrs: tuple, consts: tuple, i0: int = 0, f0: float = 0.0,
                 dtype=torch.float16, device=None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """W^T [K, N] in dtype from the packed weight (Triton; the prefill path of dequant_matmul)."""
    p = tuple(ptrs) + (None,) * (5 - len(ptrs))
    c = tuple(consts) + (0,) * (3 - len(consts))
    out = torch.empty((K, N), dtype=dtype, device=device if device is not None else ptrs[0].device)
    grid = (cdiv(K, block_k), cdiv(N, block_n))
    dequant_kernel[grid](out, *p, f0, N, K, i0, FMT=fmt, C0=c[0], C1=c[1], C2=c[2], BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _cfg(bm, bn, bk, warps, stages, split=1, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group_m,
            "num_warps": warps, "num_stages": stages}


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def candidate_configs(M: int, N: int, K: int, device: torch.device) -> list[dict]:
    """Configs worth timing for this shape (Hopper-sized tiles; split-K sized from the SM count), then
    small unpipelined fallbacks: formats with many gathered loads (NF4 with double quant) can exceed
    shared memory when every gather is pipelined over 3-4 stages."""
    bm = 1 if M == 1 else 16 if M <= 16 else 32
    dequant = [{"KERNEL": "dequant_cublas", "BLOCK_N": 64, "BLOCK_K": 64},
               {"KERNEL": "dequant_cublas", "BLOCK_N": 128, "BLOCK_K": 32}] if M > 4 else []
    return _fast_configs(M, N, K, device) + dequant + [_cfg(bm, 64, 64, 4, 1, group_m=1), _cfg(bm, 32, 32, 4, 1, group_m=1)]


def _fast_configs(M: int, N: int, K: int, device: torch.device) -> list[dict]:
    if M <= 16:
        bm = 1 if M == 1 else 16
        tiles = [(128, 128, 4, 3), (64, 128, 4, 3), (256, 64, 8, 3), (128, 256, 8, 2)] if bm == 1 else \
                [(64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3)]
        configs = []
        for bn, bk, warps, stages in tiles:
            blocks = cdiv(N, bn)
            k_tiles = cdiv(K, bk)
            want = max(1, (4 * sm_count(device)) // blocks)  # about four programs per SM
            split = min(1 << (want.bit_length() - 1), k_tiles)
            for s in sorted({1, max(split // 2, 1), split, min(2 * split, k_tiles)}):
                configs.append(_cfg(bm, bn, bk, warps, stages, split=s, group_m=1))
        return configs
    if M <= 64:
        return [_cfg(64, 128, 64, 4, 4), _cfg(64, 64, 128, 4, 3), _cfg(64, 256, 64, 8, 3), _cfg(32, 128, 128, 4, 3)]
    return [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
            _cfg(128, 64, 128, 8, 3)]


def dequant_matmul(fmt: int, x: torch.Tensor, N: int, ptrs: tuple, consts: tuple, i0: int = 0, f0: float = 0.0,
                   name: str = "dequant_matmul", config: dict | None = None, fast: tuple | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) times the dequantized [N, K] weight -> [..., N] in x's dtype.

    fast: (make_configs, run) of the format's own decode kernel: make_configs() -> list of configs with a
    "KERNEL" key, built only when a shape is tuned; run(config, x2d) -> [M, N]. They compete with the
    skeleton's configs in the tuner."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    p = tuple(ptrs) + (None,) * (5 - len(ptrs))
    c = tuple(consts) + (0,) * (3 - len(consts))

    def run(cfg):
        kind = cfg.get("KERNEL", "tiled")
        if kind == "dequant_cublas":
            wt = dequantize_t(fmt, K, N, ptrs, consts, i0, f0, x.dtype, x.device, cfg["BLOCK_N"], cfg["BLOCK_K"])
            return x2 @ wt
        if kind != "tiled":
            return fast[1](cfg, x2)
        split = cfg["SPLIT_K"]
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1 else \
            torch.empty((M, N), dtype=x.dtype, device=x.device)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split)
        dequant_matmul_kernel[grid](x2, out, *p, f0, M, N, K, x2.stride(0), out.stride(0), i0, split,
                                    FMT=fmt, C0=c[0], C1=c[1], C2=c[2], ATOMIC=split > 1,
                                    **{k: v for k, v in cfg.items() if k not in ("SPLIT_K", "KERNEL")})
        return out.to(x.dtype)

    if config is None:
        key = (fmt, c, m_bucket(M), N, K, str(x.dtype))
        config = pick(name, key, lambda: ([] if fast is None else fast[0]()) + candidate_configs(M, N, K, x.device),
                      run, x.device)
    return run(config).reshape(*x.shape[:-1], N)
