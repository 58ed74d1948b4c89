"""NF4/FP4 weights with blockwise absmax (optionally double-quantized), bitsandbytes layout.

    codes   uint8 [ceil(N*K/2)]  row-major [N, K] weight flattened, element 2i in the HIGH nibble of byte i
    lut     float32 [16]         the NF4 or FP4 code table (whatever the packer used)
    absmax  float32 [ceil(N*K/blocksize)], or with double quant uint8 codes of it:
    code2   float32 [256]        bnb's dynamic 8-bit map; absmax = code2[c] * absmax2[b // 256] + offset
    absmax2 float32 [ceil(n_blocks/256)]
    W.flat[i] = lut[code(i)] * absmax[i // blocksize]

Kernels chosen per shape by the tuner: the generic dequantize-matmul skeleton (kernels/matmul.py,
any shape) and nf4_decode_kernel below for decode (M <= 4) when every row of W holds whole blocks
(K % blocksize == 0, K % 8 == 0). It reads the codes as int32 words (8 codes, one 32-bit load),
multiplies the looked-up code values by the activations, sums each word's 8 products, and only then
applies the block's absmax, so the absmax (and its double-quant decoding) costs one lookup per word
instead of one per weight. With fp16 activations a third, kernels/nf4_h2.py (fp16x2 arithmetic on a
column copy of the codes), joins the decode candidates, and for 2-32 tokens kernels/nf4_tc.py (the same
copy and register table, the looked-up tile fed to tensor cores).
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.matmul import NF4, dequant_matmul, sm_count
from qbench.kernels.nf4_h2 import nf4_h2_configs, run_nf4_h2
from qbench.kernels.nf4_tc import nf4_tc_configs, run_nf4_tc
from qbench.kernels.tune import cdiv


@triton.jit
def nf4_decode_kernel(x_ptr, out_ptr, words_ptr, absmax, lut, absmax2, code2, offset, N, K, stride_xm, stride_om,
                      SPLIT_K, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_w = tl.arange(0, WORDS)
    j = tl.arange(0, 8)
    # byte j // 2 of the little-endian word; the even element of a byte is its high nibble
    shifts = (8 * (j // 2) + 4 * (1 - j % 2)).to(tl.uint32)
    row_words = K // 8
    blocks_per_row = K // BLOCKSIZE
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per_split + per_split, k_tiles)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(pid_k * per_split, t_end):
        kw = t * WORDS + offs_w  # word index within a row
        wmask = nmask[:, None] & (kw < row_words)[None, :]
        words = tl.load(words_ptr + offs_n[:, None] * row_words + kw[None, :], mask=wmask, other=0)
        codes = (words.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & 15  # [BN, WORDS, 8]
        v = tl.load(lut + codes)
        k = kw[:, None] * 8 + j[None, :]
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        part = tl.sum(v * x[None, :, :], axis=2)  # [BN, WORDS]
        blk = offs_n[:, None] * blocks_per_row + (kw * 8 // BLOCKSIZE)[None, :]
        if DOUBLE_QUANT:
            c = tl.load(absmax + blk, mask=wmask, other=0).to(tl.int32)
            a = tl.load(code2 + c) * tl.load(absmax2 + blk // 256, mask=wmask, other=0.0) + offset
        else:
            a = tl.load(absmax + blk, mask=wmask, other=0.0)
        acc += tl.sum(part * a, axis=1)
    out = out_ptr + m * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(out, acc, mask=nmask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def decode_configs(M: int, N: int, K: int, blocksize: int, device: torch.device) -> list[dict]:
    if M > 4 or K % blocksize or K % 8:
        return []
    configs = []
    for bn, bk, warps in ((32, 256, 4), (64, 256, 4), (16, 512, 4), (64, 128, 4), (128, 256, 8)):
        k_tiles = cdiv(K, bk)
        want = max(1, (4 * sm_count(device)) // (cdiv(N, bn) * M))
        split = min(1 << (want.bit_length() - 1), k_tiles)
        for s in sorted({1, max(split // 2, 1), split}):
            configs.append({"KERNEL": "nf4_decode", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s,
                            "num_warps": warps, "num_stages": 3})
    return configs


def nf4_matmul(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, N: int,
               blocksize: int = 64, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
               offset: float = 0.0, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N]. Double quant when absmax2 is given (absmax then holds uint8 codes)."""
    K = x.shape[-1]
    if codes.numel() != -(-N * K // 2) or absmax.numel() != -(-N * K // blocksize):
        raise ValueError(f"codes {codes.numel()} / absmax {absmax.numel()} do not fit N={N}, K={K}, blocksize={blocksize}")
    double = absmax2 is not None
    flat, lut32 = codes.view(-1), lut.float()
    am = absmax.view(-1) if double else absmax.view(-1).float()
    ptrs = (flat, am, lut32, absmax2, code2) if double else (flat, am, lut32)
    M = x.numel() // K if K else 0
    fast = None
    if K % 8 == 0 and flat.data_ptr() % 4 == 0:
        words = flat.view(torch.int32)  # [N * K / 8]: 8 codes per word, row-aligned since K % 8 == 0

        def run_decode(cfg, x2):
            split = cfg["SPLIT_K"]
            out = torch.zeros((M, N), dtype=torch.float32, device=x2.device) if split > 1 else \
                torch.empty((M, N), dtype=x2.dtype, device=x2.device)
            grid = (cdiv(N, cfg["BLOCK_N"]), split, M)
            nf4_decode_kernel[grid](x2, out, words, am, lut32, absmax2, code2, float(offset), N, K, x2.stride(0),
                                    out.stride(0), split, BLOCKSIZE=blocksize, DOUBLE_QUANT=double,
                                    BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], ATOMIC=split > 1,
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            return out.to(x2.dtype)
        def configs():
            return nf4_h2_configs(M, N, K, blocksize, lut32, x.dtype, sm_count(x.device)) + \
                nf4_tc_configs(M, N, K, blocksize, lut32, x.dtype, sm_count(x.device)) + \
                decode_configs(M, N, K, blocksize, x.device)

        def run(cfg, x2):
            if cfg["KERNEL"] == "nf4_h2":
                return run_nf4_h2(cfg, x2, codes, absmax, lut32, absmax2, code2, offset, N, blocksize)
            if cfg["KERNEL"] == "nf4_tc":
                return run_nf4_tc(cfg, x2, codes, absmax, lut32, absmax2, code2, offset, N, blocksize)
            return run_decode(cfg, x2)
        fast = (configs, run)
    return dequant_matmul(NF4, x, N, ptrs, (blocksize, double), f0=float(offset), name="nf4", config=config, fast=fast)
