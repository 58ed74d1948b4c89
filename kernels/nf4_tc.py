"""NF4/FP4 for a few tokens (M = 2..32, token tiles of 16 or 32) on tensor cores, the weight as the MMA's
A operand.

Reads the column copy of kernels/nf4_h2.py (`column_layout`: words int32 [K/8, N] of slot labels, absmax
float32 [K/blocksize, N]) and looks the codes up with its register table (`slot_table`: per 16-bit chunk
of labels two `prmt`s and a `xor` for the low bytes, the same for the high bytes, two `prmt`s to
interleave them into the fp16 pairs (v(e0), v(e1)) and (v(e2), v(e3))). As in kernels/wint_tc.py the
tile is W [BLOCK_N, BLOCK_K] against x^T [BLOCK_K, BLOCK_M] (out^T = W x^T), the pairs put in K order by
join/reshape. The values are the table's v * c (fp16, exact table entries up to fp16 rounding); the
block's absmax / c is applied once per K tile to the float32 product (a K tile inside one block), or
(SCALE_IN) rounded to fp16 and multiplied into the pairs (`mul.rn.f16x2`), so that the MMA accumulates in
place and a K tile may hold several blocks; that rounds each weight twice (v * c, then the product)
where the torch path rounds lut * absmax once.

Before this kernel NF4 at M=16 went through the generic dequantize-matmul skeleton (a gather from the
code table per weight) or dequantize + cuBLAS: 0.42x / 0.32x fp16 matmul on the H100 (0.415 / 0.531 ms
on the Llama-3-70B MLP shapes). Under TRITON_INTERPRET=1 the lookup runs as loads of the slot values.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.nf4_h2 import column_layout, device_slot_table, load_slot_table
from qbench.kernels.splitk import split_buffers, store_token_tile, token_tile_program, wave_splits
from qbench.kernels.tune import cdiv, interpreted
from qbench.kernels.half2 import pack_h2, unpack_h2
from qbench.kernels.wint_tc import per_word


@triton.jit
def nf4_pairs(s, t, la, la1, lb, lb1, ha, ha1, hb, hb1, slot_values, PTX: tl.constexpr):
    """fp16 pairs (v(e0), v(e1)) and (v(e2), v(e3)), packed in uint32, of the slot labels e0..e3 in the low
    16 bits of s (e0 in bits 0-3); t = s ^ 0x8888; table words as in nf4_h2.nf4_chunk_fma."""
    if PTX:
        pa, pb = tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, lo, hi;
            prmt.b32 a, $4, $5, $2;
            prmt.b32 b, $6, $7, $3;
            xor.b32 lo, a, b;
            prmt.b32 a, $8, $9, $2;
            prmt.b32 b, $10, $11, $3;
            xor.b32 hi, a, b;
            prmt.b32 $0, lo, hi, 0x5140;
            prmt.b32 $1, lo, hi, 0x7362;
            }""",
            "=r,=r,r,r,r,r,r,r,r,r,r,r", [s, t, la, la1, lb, lb1, ha, ha1, hb, hb1],
            dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        v0 = tl.load(slot_values + (s & 15)).to(tl.float16)  # fp16 values: exact
        v1 = tl.load(slot_values + ((s >> 4) & 15)).to(tl.float16)
        v2 = tl.load(slot_values + ((s >> 8) & 15)).to(tl.float16)
        v3 = tl.load(slot_values + ((s >> 12) & 15)).to(tl.float16)
        pa = pack_h2(v0, v1)
        pb = pack_h2(v2, v3)
    return pa, pb


@triton.jit
def mul_pairs(p, ss, PTX: tl.constexpr):
    """fp16 pairs p times the fp16 pair ss, one rounding each (mul.rn.f16x2; the products are exact in
    float32, so the interpreter's float32 multiply rounded to fp16 is the same)."""
    if PTX:
        out = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [p, ss], dtype=tl.uint32,
                                        is_pure=True, pack=1)
    else:
        lo, hi = unpack_h2(p)
        s_lo, _ = unpack_h2(ss)
        out = pack_h2((lo.to(tl.float32) * s_lo.to(tl.float32)).to(tl.float16),
                   (hi.to(tl.float32) * s_lo.to(tl.float32)).to(tl.float16))
    return out


@triton.jit
def nf4_tc_kernel(x_ptr, out_ptr, words_ptr, absmax, table, slot_values, inv_c, partials, counters, M, N, K,
                  stride_xm, stride_om, SPLIT_K, BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, STAGES: tl.constexpr, PTX: tl.constexpr,
                  SCALE_IN: tl.constexpr = False):
    WORDS: tl.constexpr = BLOCK_K // 8
    TB: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCKSIZE < BLOCK_K else 1  # blocks per K tile (SCALE_IN only)
    la, la1, lb, lb1, ha, ha1, hb, hb1 = load_slot_table(table)
    offs_n, nmask, offs_m, mmask, t_start, t_end = token_tile_program(M, N, K, SPLIT_K, BLOCK_N, BLOCK_M, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        k0 = t * BLOCK_K
        words = tl.load(words_ptr + (k0 // 8 + offs_w)[None, :] * N + offs_n[:, None], mask=nmask[:, None], other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_N, WORDS]
        flipped = words ^ 0x88888888
        p0, p1 = nf4_pairs(words, flipped, la, la1, lb, lb1, ha, ha1, hb, hb1, slot_values, PTX)
        p2, p3 = nf4_pairs(words >> 16, flipped >> 16, la, la1, lb, lb1, ha, ha1, hb, hb1, slot_values, PTX)
        if SCALE_IN:  # the absmax applied to the weights: the MMA accumulates in place, tiles of several blocks
            b = k0 // BLOCKSIZE + tl.arange(0, TB)
            a = tl.load(absmax + b[None, :] * N + offs_n[:, None], mask=nmask[:, None], other=0.0)
            a16 = (a * inv_c).to(tl.float16)
            ss = per_word(pack_h2(a16, a16), BLOCK_N, TB, WORDS)
            p0 = mul_pairs(p0, ss, PTX)
            p1 = mul_pairs(p1, ss, PTX)
            p2 = mul_pairs(p2, ss, PTX)
            p3 = mul_pairs(p3, ss, PTX)
        else:
            a = tl.load(absmax + (k0 // BLOCKSIZE) * N + offs_n, mask=nmask, other=0.0)
        # pairs in K order (word w, pair i) -> [BLOCK_N, BLOCK_K / 2], then each pair's two halves
        pairs = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (BLOCK_N, BLOCK_K // 2))
        lo, hi = unpack_h2(pairs)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        # x loaded along K (16-byte loads) and transposed in the MMA's operand layout
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mmask[:, None], other=0.0)
        if SCALE_IN:
            acc += tl.dot(w, tl.trans(xk))
        else:
            acc += tl.dot(w, tl.trans(xk)) * (a * inv_c)[:, None]
    store_token_tile(out_ptr, acc, partials, counters, offs_n, nmask, offs_m, mmask, N, M, stride_om, SPLIT_K)


def nf4_tc_configs(M: int, N: int, K: int, blocksize: int, lut: torch.Tensor, dtype: torch.dtype,
                   n_sm: int) -> list[dict]:
    """Configs of nf4_tc_kernel: fp16 activations, 2 <= M <= 32 tokens (token tiles of 16, or of 32 above 16;
    batch-32 decode), rows of whole blocks; the K range split so that two to six programs per SM fill
    the GPU. The tiles are those that led wint_tc's H100 sweep (64-row K tiles, 64 or 128 columns, 4
    warps) and 128-row ones; with the absmax applied after the MMA (K tiles inside a block) or to the
    weights (SCALE_IN, K tiles of whole blocks too). Tiles of 32 tokens are not timed yet."""
    if not 2 <= M <= 32 or dtype != torch.float16 or K % blocksize or device_slot_table(lut) is None:
        return []
    configs = []
    for bn, bk, warps, stages in ((64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2)):
        if K % bk:
            continue
        for scale_in in (False, True):
            if (blocksize % bk and bk % blocksize) or (not scale_in and blocksize % bk):
                continue
            for split in wave_splits(K // bk, cdiv(N, bn), n_sm, (2, 3, 4, 6)):
                configs.append({"KERNEL": "nf4_tc", "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": 16 if M <= 16 else 32,
                                "SPLIT_K": split, "STAGES": stages, "SCALE_IN": scale_in, "num_warps": warps,
                                "num_stages": 1})
    return configs


def run_nf4_tc(cfg: dict, x2: torch.Tensor, codes: torch.Tensor, absmax, lut32, absmax2, code2, offset: float,
               N: int, blocksize: int) -> torch.Tensor:
    M, K = x2.shape
    bk, scale_in = cfg["BLOCK_K"], cfg.get("SCALE_IN", False)
    if K % blocksize or K % bk or bk % 16 or (blocksize % bk and not (scale_in and bk % blocksize == 0)):
        raise ValueError(f"nf4_tc: BLOCK_K {bk} (a multiple of 16) must divide blocksize {blocksize} (or with "
                         f"SCALE_IN be whole blocks), which must divide K {K}")
    slots = device_slot_table(lut32)
    if slots is None:
        raise ValueError("nf4_tc: no scale fits this code table to the prmt lookup (see nf4_h2.slot_table)")
    table, slot_values, label, inv_c = slots
    words, absmax_cols = column_layout(codes, absmax, N, K, blocksize, label, absmax2, code2, offset)
    split = cfg["SPLIT_K"]
    out, partials, counters = split_buffers(x2, N, split, cfg["BLOCK_N"])
    bm = cfg.get("BLOCK_M", 16)
    grid = (cdiv(N, cfg["BLOCK_N"]), split, cdiv(M, bm))
    nf4_tc_kernel[grid](x2, out, words, absmax_cols, table, slot_values, inv_c, partials, counters, M, N, K,
                        x2.stride(0), out.stride(0), split, BLOCKSIZE=blocksize, BLOCK_N=cfg["BLOCK_N"],
                        BLOCK_K=bk, BLOCK_M=bm, STAGES=cfg.get("STAGES", 1), PTX=not interpreted(),
                        SCALE_IN=scale_in, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
