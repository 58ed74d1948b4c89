"""NF4/FP4 decode with fp16 activations: the 16-value code table looked up in registers, two weights an fma.

Same layout as kernels/nf4.py (bitsandbytes: codes of the row-major [N, K] weight, two a byte, element
2i in the HIGH nibble of byte i; absmax per block of `blocksize` elements, optionally double-quantized).
The word-at-a-time kernel there does one L1 table load and fp32 arithmetic per weight. Here the table,
rounded to fp16, lives in eight registers: the low bytes of the 16 values in L0..L3 and the high
bytes in H0..H3. For a 16-bit chunk S of codes (four nibbles), one `prmt` looks up four low bytes at
once among the first eight values ({L1, L0}, index = nibble & 7) and another among the last eight
({L3, L2}); a byte mask built from the nibbles' bit 3 (a third `prmt` in sign-replicate mode) picks
between them (`lop3`); the same for the high bytes; two more `prmt`s interleave low and high bytes into
the fp16 pairs (element 2i, element 2i+1), which meet the activation pair (x[2i], x[2i+1]), one int32
load, in an `fma.rn.f16x2`. Eleven instructions per four weights, no memory access for the table.
Each word's fp16 pair sums go to float32 and are scaled by the block's absmax there.

Measured on the H100 (reports/kernels/NOTES.md): correct, but slower than the word-at-a-time kernel on
the Llama-3-70B MLP shapes (0.203 vs 0.150 ms); the tuner keeps both and uses whichever is faster.

Under TRITON_INTERPRET=1 (CPU) the lookup step runs as Triton operations on the same registers
(`PTX=False`); masks, blocks, double quant, split-K are the same code in both modes.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.tune import interpreted
from qbench.kernels.splitk import split_buffers, store_result, wave_splits
from qbench.kernels.wint_h2 import _h2, _u32


@triton.jit
def _table_word(lut, first, HIGH: tl.constexpr):
    """Bytes (low or high) of fp16(lut[first .. first+3]) packed into one uint32, value first in byte 0."""
    w = tl.zeros((1, 1), dtype=tl.uint32)
    for b in tl.static_range(4):
        h = tl.load(lut + first + b).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        byte = (h >> 8) if HIGH else (h & 0xFF)
        w = w | (byte << (8 * b))
    return w


@triton.jit
def nf4_chunk_fma(s, l0, l1, l2, l3, h0, h1, h2, h3, xa, xb, acc, lut, PTX: tl.constexpr):
    """acc + v(e0, e1) * xa + v(e2, e3) * xb on fp16 pairs, for the four codes in the low 16 bits of s:
    nibbles (from bit 0) are elements e1, e0, e3, e2 (the high nibble of a byte is the even element)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 s4, m, sel, a, b, lo, hi, pa, pb, t;
            shl.b32 s4, $1, 4;
            prmt.b32 m, s4, $1, 0xD9C8;
            and.b32 sel, $1, 0x7777;
            prmt.b32 a, $2, $3, sel;
            prmt.b32 b, $4, $5, sel;
            lop3.b32 lo, a, b, m, 0xD8;
            prmt.b32 a, $6, $7, sel;
            prmt.b32 b, $8, $9, sel;
            lop3.b32 hi, a, b, m, 0xD8;
            prmt.b32 pa, lo, hi, 0x4051;
            prmt.b32 pb, lo, hi, 0x6273;
            fma.rn.f16x2 t, pa, $10, $12;
            fma.rn.f16x2 $0, pb, $11, t;
            }""",
            "=r,r,r,r,r,r,r,r,r,r,r,r,r", [s, l0, l1, l2, l3, h0, h1, h2, h3, xa, xb, acc],
            dtype=tl.uint32, is_pure=True, pack=1)
    else:
        v0 = tl.load(lut + (s & 15)).to(tl.float16).to(tl.float32)  # element e1
        v1 = tl.load(lut + ((s >> 4) & 15)).to(tl.float16).to(tl.float32)  # e0
        v2 = tl.load(lut + ((s >> 8) & 15)).to(tl.float16).to(tl.float32)  # e3
        v3 = tl.load(lut + ((s >> 12) & 15)).to(tl.float16).to(tl.float32)  # e2
        xa_lo, xa_hi = _h2(xa)
        xb_lo, xb_hi = _h2(xb)
        a_lo, a_hi = _h2(acc)
        # two fp16 fmas per half, each rounded, as fma.rn.f16x2 (products exact in float32)
        t_lo = (v1 * xa_lo.to(tl.float32) + a_lo.to(tl.float32)).to(tl.float16)
        t_hi = (v0 * xa_hi.to(tl.float32) + a_hi.to(tl.float32)).to(tl.float16)
        out = _u32((v3 * xb_lo.to(tl.float32) + t_lo.to(tl.float32)).to(tl.float16),
                   (v2 * xb_hi.to(tl.float32) + t_hi.to(tl.float32)).to(tl.float16))
    return out


@triton.jit
def nf4_h2_decode_kernel(x_ptr, out_ptr, words_ptr, absmax, lut, absmax2, code2, offset, partials, counters,
                         N, K, stride_xm, stride_om, SPLIT_K, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PTX: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_w = tl.arange(0, WORDS)
    row_words = K // 8
    blocks_per_row = K // BLOCKSIZE
    l0 = _table_word(lut, 0, False)
    l1 = _table_word(lut, 4, False)
    l2 = _table_word(lut, 8, False)
    l3 = _table_word(lut, 12, False)
    h0 = _table_word(lut, 0, True)
    h1 = _table_word(lut, 4, True)
    h2 = _table_word(lut, 8, True)
    h3 = _table_word(lut, 12, True)
    xw = x_ptr.to(tl.pointer_type(tl.uint32)) + m * (stride_xm // 2)  # activation pairs (x[2i], x[2i+1])
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per_split + per_split, k_tiles)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # reduced over the words once, after the loop
    for t in tl.range(pid_k * per_split, t_end, num_stages=STAGES):
        kw = t * WORDS + offs_w  # word index within a row
        kmask = kw < row_words
        wmask = nmask[:, None] & kmask[None, :]
        words = tl.load(words_ptr + offs_n[:, None] * row_words + kw[None, :], mask=wmask, other=0)
        words = words.to(tl.uint32, bitcast=True)
        x0 = tl.load(xw + kw * 4, mask=kmask, other=0)[None, :]
        x1 = tl.load(xw + kw * 4 + 1, mask=kmask, other=0)[None, :]
        x2 = tl.load(xw + kw * 4 + 2, mask=kmask, other=0)[None, :]
        x3 = tl.load(xw + kw * 4 + 3, mask=kmask, other=0)[None, :]
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.uint32)
        part = nf4_chunk_fma(words, l0, l1, l2, l3, h0, h1, h2, h3, x0, x1, part, lut, PTX)
        part = nf4_chunk_fma(words >> 16, l0, l1, l2, l3, h0, h1, h2, h3, x2, x3, part, lut, PTX)
        p_lo, p_hi = _h2(part)
        blk = offs_n[:, None] * blocks_per_row + (kw * 8 // BLOCKSIZE)[None, :]
        if DOUBLE_QUANT:
            c = tl.load(absmax + blk, mask=wmask, other=0).to(tl.int32)
            a = tl.load(code2 + c) * tl.load(absmax2 + blk // 256, mask=wmask, other=0.0) + offset
        else:
            a = tl.load(absmax + blk, mask=wmask, other=0.0)
        acc += (p_lo.to(tl.float32) + p_hi.to(tl.float32)) * a
    store_result(out_ptr, tl.sum(acc, axis=1), partials, counters, offs_n, nmask, N, stride_om, SPLIT_K, BLOCK_N)

def nf4_h2_configs(M: int, N: int, K: int, blocksize: int, dtype: torch.dtype, n_sm: int) -> list[dict]:
    """Configs of nf4_h2_decode_kernel (fp16 activations, rows of whole blocks, K % 8 == 0, M <= 4):
    the K range split so that two to four programs per SM fill the GPU, loads pipelined 2-3 ahead."""
    if M > 4 or dtype != torch.float16 or K % blocksize or K % 8:
        return []
    configs = []
    for bn, bk, warps in ((64, 256, 4), (128, 256, 4), (32, 512, 4), (128, 128, 4), (256, 128, 8)):
        if bk % blocksize and blocksize % bk:
            continue
        k_tiles = triton.cdiv(K, bk)
        tiles = triton.cdiv(N, bn) * M
        for split in wave_splits(k_tiles, tiles, n_sm):
            for stages in (2, 3):
                configs.append({"KERNEL": "nf4_h2", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                                "STAGES": stages, "num_warps": warps, "num_stages": 1})
    return configs


def run_nf4_h2(cfg: dict, x2: torch.Tensor, words: torch.Tensor, absmax, lut32, absmax2, code2, offset: float,
               N: int, blocksize: int) -> torch.Tensor:
    M, K = x2.shape
    if K % 2 or x2.stride(0) % 2 or x2.data_ptr() % 4:  # x is read as int32 pairs
        x2 = x2.contiguous().clone()
    split = cfg["SPLIT_K"]
    out, partials, counters = split_buffers(x2, N, split, cfg["BLOCK_N"])
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, M)
    nf4_h2_decode_kernel[grid](x2, out, words, absmax, lut32, absmax2, code2, float(offset), partials, counters,
                               N, K, x2.stride(0), out.stride(0), split, BLOCKSIZE=blocksize,
                               DOUBLE_QUANT=absmax2 is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                               STAGES=cfg.get("STAGES", 1), PTX=not interpreted(), num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"])
    return out
