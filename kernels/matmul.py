"""One dequantize-matmul kernel skeleton for the weight-only formats (WINT, NF4/FP4, GGUF).

out[M, N] = x[M, K] @ W^T, W dequantized tile by tile in registers (kernels/dequant.py), never
written to memory. Two shapes of the same kernel:
- decode (M <= 16): BLOCK_M = 1 multiplies and reduces on the CUDA cores (a GEMV), BLOCK_M = 16 uses
  tl.dot; the K range is split over SPLIT_K programs that add into a float32 output (split-K), which
  fills the GPU when N alone gives too few tiles;
- prefill: a tiled GEMM (BLOCK_M 64/128) with grouped tile order for L2 reuse, tl.dot on the tensor cores.
Its configs compete in the tuner with the formats' own kernels (kernels/registry.py), and for M > 4 with
"dequantize, then cuBLAS": dequant_kernel
writes W^T once in the activation dtype (the same dequant device functions, one pass over the packed
bytes) and torch.matmul multiplies. At prefill sizes the fused GEMM dequantizes every weight tile
once per row-tile of M (16 times at M=2048 with 128-row tiles) and feeds the tensor cores from
registers, while the one-pass dequantization costs about (2 + packed bytes) per weight of memory
traffic, a small fraction of a large matmul.
Candidate configs are generated from the shape and the SM count (no shape is hard-coded) and timed
once per shape by kernels/tune.py.

The weight comes in one of three named layouts (WintLayout, Nf4Layout, GgufLayout); the kernels take every
format's arguments by name and read those of FORMAT, the others left None or 0 (`skeleton_args`).
"""

import functools
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from qbench.kernels.dequant import dequant_tile
from qbench.kernels.splitk import split_output, split_tiles, store_or_add, tile_offsets
from qbench.kernels.tune import cdiv


class WintLayout(NamedTuple):
    """Integer codes in the GPTQ layout (kernels/wint.py), W = (q - z) * s. `mins` [G, N] (HQQ's float zero
    points, GGUF's min term: W = (q - z) * s - mins) is subtracted by the kernels that take it (kernels/
    registry.py); the skeleton ignores it."""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None  # act-order; None: groups of `group` consecutive input channels
    bits: int
    group: int  # 0: one group
    mins: torch.Tensor | None = None

    @property
    def N(self) -> int:
        return self.scales.shape[1]

    def skeleton_args(self) -> dict:
        return dict(qweight=self.qweight, qzeros=self.qzeros, scales=self.scales, g_idx=self.g_idx,
                    n_zero_words=self.qzeros.shape[1], FORMAT="wint", BITS=self.bits, GROUP_SIZE=self.group,
                    ACT_ORDER=self.g_idx is not None)

    def tune_key(self) -> tuple:
        """The tuner's key of the format, as it was before the layouts had names (cached choices stay valid)."""
        return 0, (self.bits, self.group, self.g_idx is not None)


class Nf4Layout(NamedTuple):
    """bitsandbytes NF4/FP4 (kernels/nf4.py), the tensors as the caller holds them (copies are cached on them)."""
    codes: torch.Tensor  # uint8, two codes a byte
    absmax: torch.Tensor  # float32, or with double quant uint8 codes into code2
    lut: torch.Tensor  # float32 [16]
    absmax2: torch.Tensor | None  # double quant: float32 per 256 blocks
    code2: torch.Tensor | None
    offset: float
    blocksize: int
    N: int

    def skeleton_args(self) -> dict:
        double = self.absmax2 is not None
        return dict(codes=self.codes.view(-1), absmax=self.absmax.view(-1) if double else self.absmax.view(-1).float(),
                    lut=self.lut, absmax2=self.absmax2, code2=self.code2 if double else None, offset=float(self.offset),
                    FORMAT="nf4", BLOCKSIZE=self.blocksize, DOUBLE_QUANT=double)

    def tune_key(self) -> tuple:
        return 1, (self.blocksize, self.absmax2 is not None, 0)


class GgufLayout(NamedTuple):
    """ggml blocks (kernels/gguf.py). `integer`: a function returning the weight's integer copy as a WintLayout
    with mins (built by the caller on first use and cached there), for the kernels that read it; or None."""
    raw: torch.Tensor  # uint8 [N, row bytes]
    qtype: int  # kernels/dequant.py's Q4_0 ... Q3_K
    integer: Callable[[], WintLayout] | None = None

    @property
    def N(self) -> int:
        return self.raw.shape[0]

    def skeleton_args(self) -> dict:
        return dict(raw=self.raw, row_bytes=self.raw.shape[1], FORMAT="gguf", QTYPE=self.qtype)

    def tune_key(self) -> tuple:
        return 2, (self.qtype, 0, 0)


_UNSET = dict(qweight=None, qzeros=None, scales=None, g_idx=None, n_zero_words=0, codes=None, absmax=None, lut=None,
              absmax2=None, code2=None, offset=0.0, raw=None, row_bytes=0, BITS=0, GROUP_SIZE=0, ACT_ORDER=False,
              BLOCKSIZE=0, DOUBLE_QUANT=False, QTYPE=0)


def skeleton_args(layout) -> dict:
    """Every format's arguments of dequant_matmul_kernel / dequant_kernel: the layout's own, the others unset."""
    return {**_UNSET, **layout.skeleton_args()}


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
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns of this program's output tile (grid axis 0, in grouped_tile's order) and their masks."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, mmask = tile_offsets(pid_m, M, BLOCK_M)
    offs_n, nmask = tile_offsets(pid_n, N, BLOCK_N)
    return offs_m, mmask, offs_n, nmask


@triton.jit
def dequant_matmul_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om, SPLIT_K,
                          qweight, qzeros, scales, g_idx, n_zero_words, codes, absmax, lut, absmax2, code2, offset,
                          raw, row_bytes, FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                          ACT_ORDER: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                          QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, ATOMIC: tl.constexpr):
    offs_m, mmask, offs_n, nmask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    t_start, t_end = split_tiles(tl.cdiv(K, BLOCK_K), SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_tile(offs_k, offs_n, k0, N, K, qweight, qzeros, scales, g_idx, n_zero_words, codes, absmax, lut,
                         absmax2, code2, offset, raw, row_bytes, FORMAT, BITS, GROUP_SIZE, ACT_ORDER, BLOCKSIZE,
                         DOUBLE_QUANT, QTYPE, BLOCK_K)
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
    store_or_add(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mmask[:, None] & nmask[None, :], ATOMIC)


@triton.jit
def dequant_kernel(out_ptr, N, K, qweight, qzeros, scales, g_idx, n_zero_words, codes, absmax, lut, absmax2, code2,
                   offset, raw, row_bytes, FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   ACT_ORDER: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QTYPE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [K, N] = W^T, dequantized from the packed bytes, in out's dtype."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = dequant_tile(offs_k, offs_n, k0, N, K, qweight, qzeros, scales, g_idx, n_zero_words, codes, absmax, lut,
                     absmax2, code2, offset, raw, row_bytes, FORMAT, BITS, GROUP_SIZE, ACT_ORDER, BLOCKSIZE,
                     DOUBLE_QUANT, QTYPE, BLOCK_K)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_t(layout, K: int, N: int, dtype=torch.float16, device=None, block_n: int = 64,
                 block_k: int = 64) -> torch.Tensor:
    """W^T [K, N] in dtype from the packed weight (Triton; the prefill path of the skeleton)."""
    args = skeleton_args(layout)
    first = next(v for v in args.values() if isinstance(v, torch.Tensor))
    out = torch.empty((K, N), dtype=dtype, device=device if device is not None else first.device)
    grid = (cdiv(K, block_k), cdiv(N, block_n))
    dequant_kernel[grid](out, N, K, **args, BLOCK_N=block_n, BLOCK_K=block_k)
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


def run_skeleton(cfg: dict, x2: torch.Tensor, layout, N: int) -> torch.Tensor:
    """x2 [M, K] (stride 1 along K) times the dequantized [N, K] weight -> [M, N] in x2's dtype, with one of
    candidate_configs: dequantize + cuBLAS (KERNEL "dequant_cublas") or the fused kernel (no KERNEL)."""
    M, K = x2.shape
    if cfg.get("KERNEL", "tiled") == "dequant_cublas":
        return x2 @ dequantize_t(layout, K, N, x2.dtype, x2.device, cfg["BLOCK_N"], cfg["BLOCK_K"])
    split = cfg["SPLIT_K"]
    out = split_output(x2, N, split)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split)
    dequant_matmul_kernel[grid](x2, out, M, N, K, x2.stride(0), out.stride(0), split, **skeleton_args(layout),
                                ATOMIC=split > 1, **{k: v for k, v in cfg.items() if k not in ("SPLIT_K", "KERNEL")})
    return out.to(x2.dtype)
