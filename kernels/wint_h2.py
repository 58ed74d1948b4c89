"""W{2,3,4,8}A16 decode with fp16 activations on packed half2 arithmetic: two weights per instruction.

Same packed layout as kernels/wint.py (GPTQ: qweight [K*bits/32, N] int32, codes along K). The fp32
exponent-trick decode kernel there spends about 6.5 instructions per 4-bit weight and is bound by
them, not by memory (reports/kernels/NOTES.md). Here a pair of codes is moved into the mantissas of
two fp16 1.0s at bit TOP (the highest multiple of BITS below 10 - BITS) and read as 1 + q / UNIT,
exact; then, on both halves at once,
    d = t - (1 + z / UNIT)          sub.f16x2, exact: (q - z) / UNIT
    acc = d * (x_a, x_b) + acc      fma.rn.f16x2
The pair is cut out of a word by one lop3 with the two code masks and the bits of 1.0 (after a shift),
or at 4 and 8 bits by a prmt that puts codes 2i and 2i+1 side by side (BYTE_PAIRS), so that their
activations (x[2i], x[2i+1]) are one int32 load; at 3 bits each 3-word chunk of 32 codes is cut into
24-bit slices whose codes pair across two slices. At 3 and 4 bits (IN_PLACE, the tuner's choice for
even K) most pairs are not shifted at all: a code at bit pos < TOP reads 1 + q / 2**(10 - pos), and
the subtraction becomes one fma by 2**(TOP - pos) with -(2**(TOP - pos) + z / UNIT) (placed_fma,
exact too); the inputs of a pair are cut out of two int32 loads of x. The fp16 pair sums of CHAIN
words (16 weights) go to float32 and are multiplied by UNIT * scale once per group. The partial sums hold x * (q - z) / UNIT
(|.| <= |x|), never x * (q - z), which would overflow fp16 for large activations. Offline sm_90
compile, 512 x 64 tile, 4 warps, 3 stages: 3.23 instructions per 4-bit weight with BYTE_PAIRS, 2.95
IN_PLACE; 3.47 per 3-bit weight, 3.27 IN_PLACE (the old 3-bit path's 2-byte x loads stay synchronous
LDGs).
Split-K and stream-K (STREAM in a config: programs sharing the (column tile, K tile) units equally)
end in kernels/splitk.py.

The pair step is one inline-PTX block (`pair_fma`, `byte_pair_fma`, `placed_fma`). Triton's CPU
interpreter cannot run inline assembly, so under TRITON_INTERPRET=1 the same step is computed with Triton fp16 operations
on the same packed registers (PTX=False); everything around it (packing of x and zeros, masks, groups,
split-K) is the same code in both modes.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.dequant import stream_bits
from qbench.kernels.half2 import pack_h2, unpack_h2
from qbench.kernels.splitk import (decode_launch, h2_configs, split_tile, store_result, store_stream, stream_span,
                                   stream_tile, wave_splits)
from qbench.kernels.tune import cdiv, interpreted

@triton.jit
def pair_fma(t, mask2, xp, zz, acc, PTX: tl.constexpr):
    """acc + ((t & mask2 | ONE) - zz) * xp on fp16 pairs packed in uint32 (ONE: two fp16 1.0)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 d;
            lop3.b32 d, $1, $2, 0x3C003C00, 0xEA;
            sub.f16x2 d, d, $4;
            fma.rn.f16x2 $0, d, $3, $5;
            }""",
            "=r,r,r,r,r,r", [t, mask2, xp, zz, acc], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        t_lo, t_hi = unpack_h2((t & mask2) | 0x3C003C00)
        z_lo, z_hi = unpack_h2(zz)
        x_lo, x_hi = unpack_h2(xp)
        a_lo, a_hi = unpack_h2(acc)
        d_lo = (t_lo - z_lo).to(tl.float32)  # exact: multiples of 2**-BITS below 1
        d_hi = (t_hi - z_hi).to(tl.float32)
        # the fma's product is exact in float32; one rounding to fp16, as fma.rn.f16x2
        out = pack_h2((d_lo * x_lo.to(tl.float32) + a_lo.to(tl.float32)).to(tl.float16),
                   (d_hi * x_hi.to(tl.float32) + a_hi.to(tl.float32)).to(tl.float16))
    return out


@triton.jit
def byte_pair_fma(a, b, sel, mask2, xp, zz, acc, PTX: tl.constexpr):
    """pair_fma of t = prmt(a, b, sel): byte sel & 7 of (a, b) into byte 0, byte (sel >> 8) & 7 into byte 2
    (bytes 0-3 are a's, 4-7 b's; bytes 1 and 3 are masked off by mask2)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 d;
            prmt.b32 d, $1, $2, $3;
            lop3.b32 d, d, $4, 0x3C003C00, 0xEA;
            sub.f16x2 d, d, $6;
            fma.rn.f16x2 $0, d, $5, $7;
            }""",
            "=r,r,r,r,r,r,r,r", [a, b, sel, mask2, xp, zz, acc], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        s0 = sel & 7
        s2 = (sel >> 8) & 7
        lo = tl.where(s0 < 4, a >> (8 * (s0 & 3)), b >> (8 * (s0 & 3))) & 0xFF
        hi = tl.where(s2 < 4, a >> (8 * (s2 & 3)), b >> (8 * (s2 & 3))) & 0xFF
        out = pair_fma(lo | (hi << 16), mask2, xp, zz, acc, PTX)
    return out


@triton.jit
def placed_fma(src, pos: tl.constexpr, BITS: tl.constexpr, TOP: tl.constexpr, nzz, xp, acc, PTX: tl.constexpr):
    """pair_fma of the codes at bits pos and 16 + pos of src read where they lie (IN_PLACE): with 1.0's
    bits OR-ed in, a half reads 1 + q / 2**(10 - pos); one fma by S = 2**(TOP - pos) and nzz = -(S + z / UNIT)
    gives (q - z) / UNIT as pair_fma's subtraction does (exact: S + q / UNIT is a multiple of fp16's step
    at S), so no shift moves the codes to bit TOP. Needs pos + BITS <= 10."""
    mask = tl.full((1, 1), (((1 << BITS) - 1) << pos) * 0x00010001, tl.uint32)
    s2 = tl.full((1, 1), ((15 + TOP - pos) << 10) * 0x00010001, tl.uint32)  # fp16 S = 2**(TOP - pos), both halves
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 d;
            lop3.b32 d, $1, $2, 0x3C003C00, 0xEA;
            fma.rn.f16x2 d, d, $3, $4;
            fma.rn.f16x2 $0, d, $5, $6;
            }""",
            "=r,r,r,r,r,r,r", [src, mask, s2, nzz, xp, acc], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        t_lo, t_hi = unpack_h2((src & mask) | 0x3C003C00)
        n_lo, n_hi = unpack_h2(nzz)
        S: tl.constexpr = 2.0 ** (TOP - pos)
        d_lo = (t_lo.to(tl.float32) * S + n_lo.to(tl.float32)).to(tl.float16)  # exact
        d_hi = (t_hi.to(tl.float32) * S + n_hi.to(tl.float32)).to(tl.float16)
        x_lo, x_hi = unpack_h2(xp)
        a_lo, a_hi = unpack_h2(acc)
        out = pack_h2((d_lo.to(tl.float32) * x_lo.to(tl.float32) + a_lo.to(tl.float32)).to(tl.float16),
                   (d_hi.to(tl.float32) * x_hi.to(tl.float32) + a_hi.to(tl.float32)).to(tl.float16))
    return out


@triton.jit
def placed_zero(z, pos: tl.constexpr, TOP: tl.constexpr):
    """nzz of placed_fma for codes at bit pos, from the uint32 zero codes z: -(S + z / UNIT) in both fp16
    halves, [1, BLOCK_N], built from its bits (sign, the exponent of S, mantissa z << pos) with integer
    operations instead of a float round trip."""
    SIGN_EXP: tl.constexpr = 0x8000 | ((15 + TOP - pos) << 10)
    return (((z << pos) | SIGN_EXP) * 0x00010001)[None, :]


@triton.jit
def x_halves(a, b):
    """Two int32 pairs of x, (x[i], x[i+1]) and (x[j], x[j+1]) -> the pairs (x[i], x[j]) and (x[i+1], x[j+1])."""
    return ((a & 0xFFFF) | (b << 16))[:, None], ((a >> 16) | ((b >> 16) << 16))[:, None]


@triton.jit
def load_x_word(xw, j, k, K, EVEN: tl.constexpr):
    """Word j of the int32 view of x, (x[k + 2j], x[k + 2j + 1]) (0 past K; K is even)."""
    if EVEN:
        return tl.load(xw + j)
    else:
        return tl.load(xw + j, mask=k + 2 * j < K, other=0)


@triton.jit
def load_rows(qweight, row, offs_n, nmask, N, n_rows, EVEN: tl.constexpr):
    """qweight[row, offs_n] as uint32 [len(row), BLOCK_N] (0 outside the matrix)."""
    ptrs = qweight + row[:, None] * N + offs_n[None, :]
    if EVEN:  # K and N are multiples of the tile: no masks
        words = tl.load(ptrs)
    else:
        words = tl.load(ptrs, mask=(row < n_rows)[:, None] & nmask[None, :], other=0)
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def to_top(src, pos, TOP: tl.constexpr):
    """src with the codes at bits pos and 16 + pos moved to bits TOP and 16 + TOP."""
    if pos == TOP:
        t = src
    elif pos < TOP:
        t = src << (TOP - pos)
    else:
        t = src >> (pos - TOP)
    return t


@triton.jit
def code_pair(src, pos, k_lo, k_hi, xrow, K, mask2, zz, part, TOP: tl.constexpr, EVEN: tl.constexpr,
              PTX: tl.constexpr):
    """part + x * (q - z) / UNIT for the pair of codes at bits pos and 16 + pos of src, whose inputs are
    k_lo and k_hi: both codes are moved to bit TOP of their half, then pair_fma."""
    if EVEN:
        x_lo = tl.load(xrow + k_lo)
        x_hi = tl.load(xrow + k_hi)
    else:
        x_lo = tl.load(xrow + k_lo, mask=k_lo < K, other=0.0)
        x_hi = tl.load(xrow + k_hi, mask=k_hi < K, other=0.0)
    return pair_fma(to_top(src, pos, TOP), mask2, pack_h2(x_lo, x_hi)[:, None], zz, part, PTX)


@triton.jit
def slice_pair3(va, vb, ka, kb, xrow, K, mask2, zz, part, EVEN: tl.constexpr, PTX: tl.constexpr):
    """Two 24-bit slices of eight 3-bit codes (inputs ka.. and kb..): codes 0-4 of both are the pairs of
    (va & 0xFFFF) | vb << 16 at bits 3i, codes 5-7 those of the same built from va >> 15, vb >> 15."""
    lo = (va & 0xFFFF) | (vb << 16)
    hi = ((va >> 15) & 0xFFFF) | ((vb >> 15) << 16)
    for i in tl.static_range(5):
        part = code_pair(lo, 3 * i, ka + i, kb + i, xrow, K, mask2, zz, part, 6, EVEN, PTX)
    for i in tl.static_range(3):
        part = code_pair(hi, 3 * i, ka + 5 + i, kb + 5 + i, xrow, K, mask2, zz, part, 6, EVEN, PTX)
    return part


@triton.jit
def slice_pair3_placed(va, vb, xw, ka, K, nz0, nz3, nz6, part, EVEN: tl.constexpr, PTX: tl.constexpr):
    """slice_pair3 with x read as int32 pairs and the codes read where they lie (placed_fma). xw + j is
    (x[ka + 2j], x[ka + 2j + 1]) (ka even, kb = ka + 8), so the inputs of code pair i, (x[ka + i],
    x[ka + 8 + i]), are the low (i even) or high (i odd) halves of words i // 2 and 4 + i // 2: half the
    loads of single fp16s, and 4-byte ones, which the pipeliner issues as cp.async (a 2-byte load stays a
    synchronous LDG inside the loop). Codes 0-2 of both slices sit at bits 0, 3, 6 of lo, codes 3-4 at
    bits 0, 3 of lo >> 9, codes 5-7 at bits 0, 3, 6 of hi: one shift for eight pairs instead of six."""
    lo = (va & 0xFFFF) | (vb << 16)
    lo9 = lo >> 9
    hi = ((va >> 15) & 0xFFFF) | ((vb >> 15) << 16)
    x0, x1 = x_halves(load_x_word(xw, 0, ka, K, EVEN), load_x_word(xw, 4, ka, K, EVEN))
    x2, x3 = x_halves(load_x_word(xw, 1, ka, K, EVEN), load_x_word(xw, 5, ka, K, EVEN))
    x4, x5 = x_halves(load_x_word(xw, 2, ka, K, EVEN), load_x_word(xw, 6, ka, K, EVEN))
    x6, x7 = x_halves(load_x_word(xw, 3, ka, K, EVEN), load_x_word(xw, 7, ka, K, EVEN))
    part = placed_fma(lo, 0, 3, 6, nz0, x0, part, PTX)
    part = placed_fma(lo, 3, 3, 6, nz3, x1, part, PTX)
    part = placed_fma(lo, 6, 3, 6, nz6, x2, part, PTX)
    part = placed_fma(lo9, 0, 3, 6, nz0, x3, part, PTX)
    part = placed_fma(lo9, 3, 3, 6, nz3, x4, part, PTX)
    part = placed_fma(hi, 0, 3, 6, nz0, x5, part, PTX)
    part = placed_fma(hi, 3, 3, 6, nz3, x6, part, PTX)
    part = placed_fma(hi, 6, 3, 6, nz6, x7, part, PTX)
    return part


@triton.jit
def _tile_sums(x_ptr, qweight, qzeros, scales, mins, xsums, N, K, stride_xm, n_zero_words, offs_n, nmask, m,
               t_start, t_end, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PTX: tl.constexpr, EVEN: tl.constexpr, CHAIN: tl.constexpr, STAGES: tl.constexpr,
               BYTE_PAIRS: tl.constexpr, IN_PLACE: tl.constexpr, HAS_MIN: tl.constexpr):
    """sum over K tiles t_start..t_end-1 of x[m, tile] @ W^T[tile, offs_n], float32 [BLOCK_N]. HAS_MIN: W has a
    per-group min term, W = (q - z) * s - min (GGUF's Q4_1, Q4_K ..., kernels/gguf.py): each tile subtracts
    xsums[m, tile] * mins[g, offs_n], xsums holding the sums of x over each K tile."""
    PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes per row: a word, or a 3-word chunk at 3 bits
    HALF: tl.constexpr = PER // 2  # pairs per word
    ROWS: tl.constexpr = BLOCK_K // PER // CHAIN  # words (chunks) of a column per chained slab
    # A code at fp16 mantissa bits TOP..TOP+BITS-1, OR-ed into 1.0, reads as 1 + q / UNIT (exact). TOP is
    # the highest multiple of BITS that fits, so one of the pair positions needs no shift.
    TOP: tl.constexpr = (10 - BITS) // BITS * BITS
    UNIT: tl.constexpr = 1 << (10 - TOP)
    offs_r = tl.arange(0, ROWS)
    mask2 = tl.full((1, 1), (((1 << BITS) - 1) << TOP) * 0x00010001, tl.uint32)  # the code's bits in both halves
    n_words = tl.cdiv(K * BITS, 32)
    xrow = x_ptr + m * stride_xm
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # reduced over the rows once, after the loop
    min_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        k0 = t * BLOCK_K
        g = 0 if GROUP == 0 else k0 // GROUP  # the launcher makes BLOCK_K divide the group
        if EVEN:
            s = tl.load(scales + g * N + offs_n).to(tl.float32)
        else:
            s = tl.load(scales + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if HAS_MIN:
            if EVEN:
                mn = tl.load(mins + g * N + offs_n).to(tl.float32)
            else:
                mn = tl.load(mins + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            min_acc += tl.load(xsums + m * tl.cdiv(K, BLOCK_K) + t) * mn
        z = stream_bits(qzeros + g * n_zero_words, offs_n, 1, n_zero_words, nmask, BITS)
        if IN_PLACE:  # placed_fma's zero terms for the code positions used (3 bits: 0, 3, 6; 4 bits: 0, 4)
            nz0 = placed_zero(z, 0, TOP)
            nz3 = placed_zero(z, 3 if BITS == 3 else 4, TOP)
            nz6 = placed_zero(z, 6, TOP) if BITS == 3 else nz3
        else:
            z1 = (1.0 + z.to(tl.float32) / UNIT).to(tl.float16)  # 1 + z / UNIT, exact
            zz = pack_h2(z1, z1)[None, :]
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.uint32)  # fp16 pair sums over CHAIN rows of a column
        for c in tl.static_range(CHAIN):
            row = k0 // PER + c * ROWS + offs_r
            k = row * PER
            if BITS == 3:  # chunk = words 3r, 3r+1, 3r+2 = four 24-bit slices v0..v3 of 8 codes
                w0 = load_rows(qweight, 3 * row, offs_n, nmask, N, n_words, EVEN)
                w1 = load_rows(qweight, 3 * row + 1, offs_n, nmask, N, n_words, EVEN)
                w2 = load_rows(qweight, 3 * row + 2, offs_n, nmask, N, n_words, EVEN)
                v1 = (w0 >> 24) | (w1 << 8)
                v2 = (w1 >> 16) | (w2 << 16)
                v3 = w2 >> 8
                if IN_PLACE:  # even K: x read as int32 pairs, 16 per chunk, codes read in place
                    xw = x_ptr.to(tl.pointer_type(tl.uint32)) + m * (stride_xm // 2) + row * 16
                    part = slice_pair3_placed(w0, v1, xw, k, K, nz0, nz3, nz6, part, EVEN, PTX)
                    part = slice_pair3_placed(v2, v3, xw + 8, k + 16, K, nz0, nz3, nz6, part, EVEN, PTX)
                else:
                    part = slice_pair3(w0, v1, k, k + 8, xrow, K, mask2, zz, part, EVEN, PTX)
                    part = slice_pair3(v2, v3, k + 16, k + 24, xrow, K, mask2, zz, part, EVEN, PTX)
            elif IN_PLACE:  # 4 bits, even K: codes j, j + 4 at bits 4j of word (j < 2) or word >> 8 (j >= 2)
                words = load_rows(qweight, row, offs_n, nmask, N, n_words, EVEN)
                high = words >> 8
                xw = x_ptr.to(tl.pointer_type(tl.uint32)) + m * (stride_xm // 2) + row * 4
                x0, x1 = x_halves(load_x_word(xw, 0, k, K, EVEN), load_x_word(xw, 2, k, K, EVEN))
                x2, x3 = x_halves(load_x_word(xw, 1, k, K, EVEN), load_x_word(xw, 3, k, K, EVEN))
                part = placed_fma(words, 0, 4, 4, nz0, x0, part, PTX)
                part = placed_fma(words, 4, 4, 4, nz3, x1, part, PTX)
                part = placed_fma(high, 0, 4, 4, nz0, x2, part, PTX)
                part = placed_fma(high, 4, 4, 4, nz3, x3, part, PTX)
            elif BYTE_PAIRS:  # 4/8 bits, even K: pair codes (2i, 2i+1), whose inputs are one int32 of x
                words = load_rows(qweight, row, offs_n, nmask, N, n_words, EVEN)
                xw = x_ptr.to(tl.pointer_type(tl.uint32)) + m * (stride_xm // 2) + row * (PER // 2)
                if BITS == 4:  # byte i = codes 2i (low nibble), 2i+1: high nibbles of byte i of word << 4 and word
                    shifted = words << 4
                for i in tl.static_range(HALF):
                    if EVEN:
                        xp = tl.load(xw + i)
                    else:
                        xp = tl.load(xw + i, mask=k + 2 * i < K, other=0)
                    if BITS == 4:
                        part = byte_pair_fma(shifted, words, tl.full((1, 1), i | ((4 + i) << 8), tl.uint32), mask2,
                                             xp[:, None], zz, part, PTX)
                    else:  # bytes 2i and 2i+1
                        part = byte_pair_fma(words, words, tl.full((1, 1), (2 * i) | ((2 * i + 1) << 8), tl.uint32),
                                             mask2, xp[:, None], zz, part, PTX)
            else:  # codes j and j + HALF of a word sit at bits BITS*j and 16 + BITS*j
                words = load_rows(qweight, row, offs_n, nmask, N, n_words, EVEN)
                for j in tl.static_range(HALF):
                    part = code_pair(words, BITS * j, k + j, k + j + HALF, xrow, K, mask2, zz, part, TOP, EVEN, PTX)
        p_lo, p_hi = unpack_h2(part)  # sum of x * (q - z) / UNIT over the chained rows, in two halves
        acc += (p_lo.to(tl.float32) + p_hi.to(tl.float32)) * (s * UNIT)[None, :]
    if HAS_MIN:
        return tl.sum(acc, axis=0) - min_acc
    return tl.sum(acc, axis=0)


@triton.jit
def wint_h2_decode_kernel(x_ptr, out_ptr, qweight, qzeros, scales, mins, xsums, partials, counters, N, K, stride_xm,
                          stride_om, n_zero_words, SPLIT_K, BITS: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX: tl.constexpr, EVEN: tl.constexpr = False,
                          CHAIN: tl.constexpr = 2, STAGES: tl.constexpr = 1, BYTE_PAIRS: tl.constexpr = False,
                          IN_PLACE: tl.constexpr = False, STREAM: tl.constexpr = False, HAS_MIN: tl.constexpr = False):
    m = tl.program_id(2)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if STREAM:  # grid axis 0: P programs, each a range of the (column tile, K tile) units (kernels/splitk.py)
        n_tiles = tl.cdiv(N, BLOCK_N)
        start, end, first_tile, end_tile, P, U = stream_span(n_tiles, k_tiles)
        for tile in range(first_tile, end_tile):
            lo, hi, offs_n, nmask = stream_tile(tile, start, end, k_tiles, N, BLOCK_N)
            res = _tile_sums(x_ptr, qweight, qzeros, scales, mins, xsums, N, K, stride_xm, n_zero_words, offs_n, nmask,
                             m, lo, hi, BITS, GROUP, BLOCK_N, BLOCK_K, PTX, EVEN, CHAIN, STAGES, BYTE_PAIRS, IN_PLACE,
                             HAS_MIN)
            store_stream(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, tile, n_tiles, k_tiles, P, U,
                         BLOCK_N)
    else:
        t_start, t_end, offs_n, nmask = split_tile(k_tiles, SPLIT_K, N, BLOCK_N)
        res = _tile_sums(x_ptr, qweight, qzeros, scales, mins, xsums, N, K, stride_xm, n_zero_words, offs_n, nmask, m,
                         t_start, t_end, BITS, GROUP, BLOCK_N, BLOCK_K, PTX, EVEN, CHAIN, STAGES,
                         BYTE_PAIRS, IN_PLACE, HAS_MIN)
        store_result(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, SPLIT_K, BLOCK_N)

def h2_decode_configs(M: int, N: int, K: int, bits: int, group: int, dtype: torch.dtype, n_sm: int) -> list[dict]:
    """Configs of wint_h2_decode_kernel for this shape (empty where it does not apply: fp16 only).

    Chosen from `python -m research.decode_sweep --wide` on the H100 (240 configs per shape): the
    K range split so that two to four programs per SM fill the GPU in one wave, loads pipelined two
    or three tiles ahead (cp.async), 64-row K tiles, and at 4/8 bits codes paired within a byte
    (BYTE_PAIRS), which won every one of the top 14 places on both Llama-3-70B MLP shapes. Tiles
    that run the whole K range each (no split) lost by 1.3-5x and are not tried. At 3 and 4 bits the
    codes are read in place (IN_PLACE) since `decode_sweep --pairings` on an H200 (2026-12-01): at 3 bits
    0.0435 / 0.0452 ms against 0.0475 / 0.0478 (8192x28672 / 28672x8192, best config of each), at 4
    bits 0.0439 / 0.0430 against BYTE_PAIRS' 0.0447 / 0.0433; a 1024-column 4-warp tile did not win."""
    if M > 4 or bits not in (2, 3, 4, 8) or dtype != torch.float16:
        return []
    per = 32 if bits == 3 else 32 // bits  # codes per row of the kernel
    chain = 1 if bits == 3 else 2
    pairing = {} if K % 2 else {"IN_PLACE": True} if bits in (3, 4) else {"BYTE_PAIRS": True} if bits == 8 else {}
    configs = []
    small = 64 if not group or group % 64 == 0 else 32 if group % 32 == 0 else 16  # a K tile lies inside a group
    for bn, bk, warps in ((512, small, 4), (256, small, 4), (1024, small, 8), (512, 128, 8)):
        if (group and group % bk) or bk // per < chain:
            continue
        # stream-K (3-5 equal programs per SM) only for the 512-column 4-warp tile: no gain measured on the H100
        streams = [max(per_sm * n_sm // M, 1) for per_sm in (3, 4, 5)] if (bn, warps) == (512, 4) else []
        configs += h2_configs("wint_h2", bn, bk, warps, chain, wave_splits(cdiv(K, bk), cdiv(N, bn) * M, n_sm), streams,
                              **pairing)
    return configs


def run_h2_decode(cfg: dict, x2: torch.Tensor, qweight, qzeros, scales, bits: int, group: int, N: int,
                  mins: torch.Tensor | None = None) -> torch.Tensor:
    """mins [G, N]: W = (q - z) * s - mins (HAS_MIN); the sums of x over each K tile are taken here."""
    M, K = x2.shape
    xsums = scales
    if mins is not None:
        if K % cfg["BLOCK_K"]:
            raise ValueError(f"wint_h2 with mins: BLOCK_K {cfg['BLOCK_K']} must divide K {K}")
        xsums = x2.view(M, K // cfg["BLOCK_K"], cfg["BLOCK_K"]).sum(-1, dtype=torch.float32)
    stream = cfg.get("STREAM", 0)  # stream-K: programs per token (0: split-K)
    out, partials, counters, grid, split = decode_launch(cfg, x2, N, cdiv(K, cfg["BLOCK_K"]))
    # x read as int32 pairs: needs an even K and row stride and a 4-byte aligned start
    x_words = K % 2 == 0 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0
    byte_pairs = cfg.get("BYTE_PAIRS", False) and bits in (4, 8) and x_words
    in_place = cfg.get("IN_PLACE", False) and bits in (3, 4) and x_words
    wint_h2_decode_kernel[grid](x2, out, qweight, qzeros, scales, scales if mins is None else mins, xsums, partials,
                                counters, N, K, x2.stride(0), out.stride(0), qzeros.shape[1], split, BITS=bits, GROUP=group, BLOCK_N=cfg["BLOCK_N"],
                                BLOCK_K=cfg["BLOCK_K"], CHAIN=cfg["CHAIN"], STAGES=cfg.get("STAGES", 1),
                                PTX=not interpreted(), EVEN=K % cfg["BLOCK_K"] == 0 and N % cfg["BLOCK_N"] == 0,
                                BYTE_PAIRS=byte_pairs, IN_PLACE=in_place, STREAM=bool(stream), HAS_MIN=mins is not None,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
