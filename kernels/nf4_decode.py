"""NF4/FP4 decode (M <= 4) on the CUDA cores, the bitsandbytes layout of kernels/nf4.py read in place, for rows
of whole blocks (K % blocksize == 0, K % 8 == 0).

It reads the codes as int32 words (8 codes, one 32-bit load), multiplies the looked-up code values by the
activations, sums each word's 8 products, and only then applies the block's absmax, so the absmax (and its
double-quant decoding) costs one lookup per word instead of one per weight. The K range is split over
SPLIT_K programs that add into a float32 output.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.splitk import quarter_splits, split_output, split_tile, store_or_add
from qbench.kernels.tune import cdiv


@triton.jit
def nf4_decode_kernel(x_ptr, out_ptr, words_ptr, absmax, lut, absmax2, code2, offset, N, K, stride_xm, stride_om,
                      SPLIT_K, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    m = tl.program_id(2)
    t_start, t_end, offs_n, nmask = split_tile(tl.cdiv(K, BLOCK_K), SPLIT_K, N, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    j = tl.arange(0, 8)
    # byte j // 2 of the little-endian word; the even element of a byte is its high nibble
    shifts = (8 * (j // 2) + 4 * (1 - j % 2)).to(tl.uint32)
    row_words = K // 8
    blocks_per_row = K // BLOCKSIZE
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_start, t_end):
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
    store_or_add(out_ptr + m * stride_om + offs_n, acc, nmask, ATOMIC)


def nf4_decode_configs(M: int, N: int, K: int, blocksize: int, n_sm: int) -> list[dict]:
    """Configs of nf4_decode_kernel (M <= 4, rows of whole blocks, K % 8 == 0); the K range split so that about
    four programs per SM fill the GPU."""
    if M > 4 or K % blocksize or K % 8:
        return []
    configs = []
    for bn, bk, warps in ((32, 256, 4), (64, 256, 4), (16, 512, 4), (64, 128, 4), (128, 256, 8)):
        for s in quarter_splits(N, K, M, bn, bk, n_sm):
            configs.append({"KERNEL": "nf4_decode", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s,
                            "num_warps": warps, "num_stages": 3})
    return configs


def run_nf4_decode(cfg: dict, x2: torch.Tensor, words: torch.Tensor, absmax, lut32, absmax2, code2, offset: float,
                   N: int, blocksize: int) -> torch.Tensor:
    """words: the codes as int32 [N * K / 8] (8 codes a word, rows aligned: K % 8 == 0); absmax flat, float32 or
    (double quant, absmax2 given) uint8 codes."""
    M, K = x2.shape
    split = cfg["SPLIT_K"]
    out = split_output(x2, N, split)
    grid = (cdiv(N, cfg["BLOCK_N"]), split, M)
    nf4_decode_kernel[grid](x2, out, words, absmax, lut32, absmax2, code2, float(offset), N, K, x2.stride(0),
                            out.stride(0), split, BLOCKSIZE=blocksize, DOUBLE_QUANT=absmax2 is not None,
                            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], ATOMIC=split > 1,
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.to(x2.dtype)
