"""W{2,3,4,8}A16 decode (M <= 4) on the CUDA cores in fp32, one program row per token; the packed GPTQ layout of
kernels/wint.py, no act-order. With fp16 activations the fp16x2 kernel of kernels/wint_h2.py (two weights per
instruction) beat this one on every H100 shape and takes its place (kernels/registry.py).

It unpacks a whole int32 word into its 32/bits codes with shifts (3 bits: a 24-bit slice of a 3-word chunk
into 8 codes, see unpack3), turns codes into floats with the exponent trick (code | 0x4B000000 read as float32
is 2**23 + code, exact, no int->float conversion instruction) and folds the zero point into that one
subtraction; the scale is applied once per group on the partial sum. IN_PLACE (a tuner choice) also skips
the shift for codes that lie below bit 23 where they are: (word & mask) | 2**23 is 2**23 + q * 2**pos, and x
is pre-scaled by 2**-pos (exact); on sm_90 this cuts the 4-bit loop body from 827 to 764 instructions
(offline compile), but on the H100 it was no faster (within 3 %). The K range is split over SPLIT_K programs
that add into a float32 output. (A tl.dot variant that padded the tokens to 16 lost to the skeleton's tl.dot
path at every decode shape on the H100 and was removed.)
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.dequant import stream_codes
from qbench.kernels.splitk import quarter_splits, split_output, split_tile, store_or_add
from qbench.kernels.tune import cdiv


@triton.jit
def unpack3(qweight, k0, offs_n, nmask, N, K, BLOCK_K: tl.constexpr):
    """3-bit codes k0 .. k0+BLOCK_K-1 of columns offs_n -> uint32 [BLOCK_K // 8, 8, BLOCK_N].

    32 codes fill exactly 3 words (96 bits), so a chunk of 32 codes starting at a multiple of 32 is
    words 3c, 3c+1, 3c+2. Each chunk is cut into four 24-bit slices of 8 codes (bits 0-23, 24-47,
    48-71, 72-95), assembled with a few shifts per slice; the codes then come off a slice with
    constant shifts, as for 2/4/8 bits, instead of a pair of loads per code."""
    CHUNKS: tl.constexpr = BLOCK_K // 32
    c = k0 // 32 + tl.arange(0, CHUNKS)
    n_words = tl.cdiv(K * 3, 32)
    mask = nmask[None, :]
    base = qweight + (3 * c)[:, None] * N + offs_n[None, :]
    w0 = tl.load(base, mask=mask & (3 * c < n_words)[:, None], other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(base + N, mask=mask & (3 * c + 1 < n_words)[:, None], other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(base + 2 * N, mask=mask & (3 * c + 2 < n_words)[:, None], other=0).to(tl.uint32, bitcast=True)
    v0 = w0 & 0xFFFFFF
    v1 = (w0 >> 24) | ((w1 & 0xFFFF) << 8)
    v2 = (w1 >> 16) | ((w2 & 0xFF) << 16)
    v3 = w2 >> 8
    v = tl.join(tl.join(v0, v1), tl.join(v2, v3))  # [CHUNKS, BLOCK_N, 2, 2]: v[..., q, p] = slice 2p + q
    v = tl.reshape(tl.permute(v, (0, 3, 2, 1)), (CHUNKS * 4, offs_n.shape[0]))  # slice index 4c + 2p + q
    shifts = (tl.arange(0, 8) * 3).to(tl.uint32)
    return (v[:, None, :] >> shifts[None, :, None]) & 7


@triton.jit
def wint_decode_kernel(x_ptr, out_ptr, qweight, qzeros, scales, N, K, stride_xm, stride_om, n_zero_words,
                       SPLIT_K, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, IN_PLACE: tl.constexpr = False):
    PER: tl.constexpr = 8 if BITS == 3 else 32 // BITS  # codes per word (3 bits: per 24-bit slice)
    WORDS: tl.constexpr = BLOCK_K // PER
    m = tl.program_id(2)
    t_start, t_end, offs_n, nmask = split_tile(tl.cdiv(K, BLOCK_K), SPLIT_K, N, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    offs_p = tl.arange(0, PER)
    shifts = (offs_p * BITS).to(tl.uint32)
    if IN_PLACE:  # codes whose bits end above bit 23 are first shifted down by 16
        in_bit = offs_p * BITS - tl.where(offs_p * BITS + BITS > 23, 16, 0)
        in_shift = (offs_p * BITS - in_bit).to(tl.uint32)
        in_mask = (((1 << BITS) - 1) << in_bit).to(tl.uint32)
        in_scale = tl.exp2(in_bit.to(tl.float32))
    n_words = tl.cdiv(K, PER)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_start, t_end):
        k0 = t * BLOCK_K
        if BITS == 3:
            q3 = unpack3(qweight, k0, offs_n, nmask, N, K, BLOCK_K)  # [BLOCK_K // 8, 8, BLOCK_N]
        else:
            word = k0 // PER + offs_w
            words = tl.load(qweight + word[:, None] * N + offs_n[None, :],
                            mask=(word < n_words)[:, None] & nmask[None, :], other=0).to(tl.uint32, bitcast=True)
            if IN_PLACE:  # code p kept at bit pos[p] (< 23 - BITS): no shift for most codes
                q3 = (words[:, None, :] >> in_shift[None, :, None]) & in_mask[None, :, None]
            else:
                q3 = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [WORDS, PER, BLOCK_N]
        g = 0 if GROUP == 0 else k0 // GROUP  # the launcher makes BLOCK_K divide the group
        s = tl.load(scales + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        z = stream_codes(qzeros + g * n_zero_words, offs_n, 1, n_zero_words, nmask, BITS)
        offs_k = k0 + offs_w[:, None] * PER + offs_p[None, :]  # [WORDS, PER]
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        # 0x4B000000 as float32 is 2**23; its 23 mantissa bits hold the code: 2**23 + q, exact.
        if IN_PLACE:  # 2**23 + q * 2**pos, minus 2**23 + z * 2**pos: (q - z) * 2**pos, exact; x * 2**-pos
            wf = (q3 | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z[None, None, :] * in_scale[None, :, None])
            x = x / in_scale[None, :]
        else:
            wf = (q3 | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)[None, None, :]
        acc += tl.sum(tl.sum(x[:, :, None] * wf, axis=1), axis=0) * s
    store_or_add(out_ptr + m * stride_om + offs_n, acc, nmask, ATOMIC)


def wint_decode_configs(M: int, N: int, K: int, bits: int, group: int, n_sm: int) -> list[dict]:
    """Configs of wint_decode_kernel for this shape (empty where it does not apply)."""
    if M > 4 or bits not in (2, 3, 4, 8):
        return []
    configs = []
    for bn, bk, warps in ((128, 128, 4), (256, 128, 8), (256, 64, 4), (64, 256, 4), (512, 64, 8)):
        if group and group % bk:
            continue
        for s in quarter_splits(N, K, M, bn, bk, n_sm):
            for in_place in ((False, True) if bits != 3 else (False,)):
                configs.append({"KERNEL": "wint_decode", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s,
                                "num_warps": warps, "num_stages": 3, "IN_PLACE": in_place})
    return configs


def run_wint_decode(cfg: dict, x2: torch.Tensor, qweight, qzeros, scales, bits: int, group: int, N: int) -> torch.Tensor:
    M, K = x2.shape
    split = cfg["SPLIT_K"]
    out = split_output(x2, N, split)
    grid = (cdiv(N, cfg["BLOCK_N"]), split, M)
    wint_decode_kernel[grid](x2, out, qweight, qzeros, scales, N, K, x2.stride(0), out.stride(0), qzeros.shape[1],
                             split, BITS=bits, GROUP=group, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                             ATOMIC=split > 1, IN_PLACE=cfg.get("IN_PLACE", False), num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return out.to(x2.dtype)
