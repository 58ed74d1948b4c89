"""W4A16 and W8A16 for a few tokens (M = 2..32, token tiles of 16 or 32) on tensor cores, the weight as
the MMA's A operand.

Same packed layout as kernels/wint.py (GPTQ: qweight [K/8, N] int32, codes along K). At M = 16 the
tiled tl.dot path of kernels/matmul.py spends about 8 instructions per weight, one of them a 16-bit
shared-memory store (offline sm_90 SASS): it dequantizes W^T tiles [BLOCK_K, BLOCK_N] element by
element in float32, and Triton moves each fp16 into the B operand's layout. Here the tile is
W [BLOCK_N, BLOCK_K], output features as the MMA's rows and the tokens as its columns (out^T = W x^T),
built with the fp16x2 steps of kernels/wint_h2.py: per word, four times a `prmt` pairs codes 2i and
2i+1, a `lop3` puts them into the mantissas of two fp16 1.0s (1 + q / 64, exact), `sub.f16x2` takes
the zero off (exact) and `mul.rn.f16x2` applies 64 * scale (one rounding, as (q - z) * s to fp16);
each word gives 8 consecutive K values of one row. Split-K ends in kernels/splitk.py.

Timed on the H100 (reports/kernels): at M=16 it takes W4A16 from 1.5x to 1.9-2.0x fp16 matmul on the
Llama-3-70B MLP shapes, short of the 2.5x target; the tuner offers it next to the other candidates. On
Hopper kernels/wint_mma.py (Gluon, the weights packed in the MMA's register fragment order) avoids its
shared-memory round trip and wins (H200: 0.061 vs 0.089 ms); this one stays for other GPUs.
At 8 bits (BITS=8: 4 codes a word) a `prmt` puts codes 2i and 2i+1 into the low bytes of two fp16
1024.0s (1024 + q, exact), then the same `sub.f16x2` (1024 + z) and `mul.rn.f16x2` by the scale. With
HAS_MIN (the GGUF types with a per-group min, kernels/gguf.py: W = (q - z) * s - min) each K tile
subtracts min[n, g] * (sum of x over group g) for its groups from the float32 product. A K tile may hold
several whole groups (the GGUF types' 16 and 32): each word then takes its group's scale and zero.
Under TRITON_INTERPRET=1 the pair step runs as Triton fp16 operations on the same registers.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.dequant import stream_codes
from qbench.kernels.splitk import split_buffers, store_token_tile, token_tile_program, wave_splits
from qbench.kernels.tune import cdiv, interpreted
from qbench.kernels.half2 import pack_h2, unpack_h2


@triton.jit
def pair_weights(shifted, words, sel, zz, ss, PTX: tl.constexpr):
    """fp16 pair ((q_2i - z) * s, (q_2i+1 - z) * s) of each word, packed in uint32 (sel picks byte i of
    `shifted` = words << 4 and of `words`: their high nibbles are codes 2i and 2i+1)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 d;
            prmt.b32 d, $1, $2, $3;
            lop3.b32 d, d, 0x00F000F0, 0x3C003C00, 0xEA;
            sub.f16x2 d, d, $4;
            mul.rn.f16x2 $0, d, $5;
            }""",
            "=r,r,r,r,r,r", [shifted, words, sel, zz, ss], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        i = sel & 7
        out = sub_mul_ref(((shifted >> (8 * i)) & 0xF0) | 0x3C00, ((words >> (8 * (i & 3))) & 0xF0) | 0x3C00, zz, ss)
    return out


@triton.jit
def sub_mul_ref(lo, hi, zz, ss):
    """The interpreter's sub.f16x2 then mul.rn.f16x2 on the fp16 bit patterns lo and hi (bits 0-15): (t - z)
    is exact in fp16, the product rounded once."""
    t_lo, _ = unpack_h2(lo)
    t_hi, _ = unpack_h2(hi)
    z_lo, _ = unpack_h2(zz)
    s_lo, _ = unpack_h2(ss)
    return pack_h2(((t_lo - z_lo).to(tl.float32) * s_lo.to(tl.float32)).to(tl.float16),
                ((t_hi - z_lo).to(tl.float32) * s_lo.to(tl.float32)).to(tl.float16))


@triton.jit
def pair_bytes(words, sel, zz, ss, PTX: tl.constexpr):
    """fp16 pair ((q_a - z) * s, (q_b - z) * s) of each word of four 8-bit codes (sel: 0x4140 picks codes 0
    and 1, 0x4342 codes 2 and 3, each into the low byte of an fp16 1024.0)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 d;
            prmt.b32 d, $1, 0x64646464, $2;
            sub.f16x2 d, d, $3;
            mul.rn.f16x2 $0, d, $4;
            }""",
            "=r,r,r,r,r", [words, sel, zz, ss], dtype=tl.uint32, is_pure=True, pack=1)
    else:
        i = sel & 3  # the pair's first code; the second is the next byte
        out = sub_mul_ref(((words >> (8 * i)) & 0xFF) | 0x6400, ((words >> (8 * i + 8)) & 0xFF) | 0x6400, zz, ss)
    return out


@triton.jit
def per_word(v, BLOCK_N: tl.constexpr, TG: tl.constexpr, WORDS: tl.constexpr):
    """[BLOCK_N, TG] values of the tile's groups -> [BLOCK_N, WORDS], each word its group's value (the
    inline asm would broadcast a [BLOCK_N, 1] operand to the words' shape anyway)."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (BLOCK_N, TG, WORDS // TG)), (BLOCK_N, WORDS))


@triton.jit
def wint_tc_kernel(x_ptr, out_ptr, qweight, qzeros, scales, mins, xsums, partials, counters, M, N, K, stride_xm,
                   stride_om, n_zero_words, SPLIT_K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, STAGES: tl.constexpr, PTX: tl.constexpr, BITS: tl.constexpr = 4,
                   HAS_MIN: tl.constexpr = False):
    WORDS: tl.constexpr = BLOCK_K * BITS // 32
    # groups per K tile: 1 when the tile lies inside a group, else the tile holds whole groups
    TG: tl.constexpr = BLOCK_K // GROUP if GROUP != 0 and GROUP < BLOCK_K else 1
    offs_n, nmask, offs_m, mmask, t_start, t_end = token_tile_program(M, N, K, SPLIT_K, BLOCK_N, BLOCK_M, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    min_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        k0 = t * BLOCK_K
        g = (0 if GROUP == 0 else k0 // GROUP) + tl.arange(0, TG)  # the tile's groups
        s = tl.load(scales + g[None, :] * N + offs_n[:, None], mask=nmask[:, None], other=0.0).to(tl.float32)
        z = stream_codes(qzeros + g[None, :] * n_zero_words, offs_n[:, None], 1, n_zero_words, nmask[:, None], BITS)
        words = tl.load(qweight + (k0 * BITS // 32 + offs_w)[None, :] * N + offs_n[:, None], mask=nmask[:, None],
                        other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_N, WORDS]
        if BITS == 4:
            z1 = (1.0 + z / 64).to(tl.float16)  # 1 + z / 64, exact
            s64 = (s * 64).to(tl.float16)  # exact: a power of two times an fp16
            zz = per_word(pack_h2(z1, z1), BLOCK_N, TG, WORDS)
            ss = per_word(pack_h2(s64, s64), BLOCK_N, TG, WORDS)
            shifted = words << 4
            p0 = pair_weights(shifted, words, tl.full((1, 1), 0 | (4 << 8), tl.uint32), zz, ss, PTX)
            p1 = pair_weights(shifted, words, tl.full((1, 1), 1 | (5 << 8), tl.uint32), zz, ss, PTX)
            p2 = pair_weights(shifted, words, tl.full((1, 1), 2 | (6 << 8), tl.uint32), zz, ss, PTX)
            p3 = pair_weights(shifted, words, tl.full((1, 1), 3 | (7 << 8), tl.uint32), zz, ss, PTX)
            # pairs in K order (word w, pair i) -> [BLOCK_N, BLOCK_K / 2], then each pair's two halves
            pairs = tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (BLOCK_N, BLOCK_K // 2))
        else:
            z1 = (1024.0 + z).to(tl.float16)  # exact
            s16 = s.to(tl.float16)
            zz = per_word(pack_h2(z1, z1), BLOCK_N, TG, WORDS)
            ss = per_word(pack_h2(s16, s16), BLOCK_N, TG, WORDS)
            p0 = pair_bytes(words, tl.full((1, 1), 0x4140, tl.uint32), zz, ss, PTX)
            p1 = pair_bytes(words, tl.full((1, 1), 0x4342, tl.uint32), zz, ss, PTX)
            pairs = tl.reshape(tl.join(p0, p1), (BLOCK_N, BLOCK_K // 2))
        lo, hi = unpack_h2(pairs)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None], mask=mmask[None, :], other=0.0)
        acc += tl.dot(w, xt)
        if HAS_MIN:  # min[n, g] * (sum of x over group g), the sums taken by the launcher
            # one outer product per group (a [BLOCK_N, TG, BLOCK_M] product summed over the groups gave wrong
            # results on the H200 with triton 3.6, right ones in the interpreter), summed apart from the MMA's
            # accumulator so that the MMA need not finish before it
            for j in tl.static_range(TG):
                mn = tl.load(mins + (k0 // GROUP + j) * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
                xs = tl.load(xsums + offs_m * (K // GROUP) + k0 // GROUP + j, mask=mmask, other=0.0)
                min_acc += mn[:, None] * xs[None, :]
    if HAS_MIN:
        acc -= min_acc
    store_token_tile(out_ptr, acc, partials, counters, offs_n, nmask, offs_m, mmask, N, M, stride_om, SPLIT_K)


def tc_configs(M: int, N: int, K: int, bits: int, group: int, dtype: torch.dtype, n_sm: int) -> list[dict]:
    """Configs of wint_tc_kernel: 4 or 8 bits, fp16 activations, 2 <= M <= 32 tokens (token tiles of 16, or
    of 32 above 16; batch-32 decode; tiles of 32 tokens not timed yet), K tiles inside a group or of whole
    groups; the K range split so that two to six programs per SM fill the GPU. From `python -m
    research.decode_sweep --tc --m 16 --bits 4 --wide` on the H100 (90 and 120 configs on the two
    Llama-3-70B MLP shapes): 64-row K tiles with 64 or 128 columns and 4 warps took the top
    places on both; 8 warps, 256 columns and a pipeline of 2 were 5-15 % slower. Groups under 64 (the
    GGUF types' 16 and 32) take the same tiles, several groups each, and tiles of one group."""
    if not 2 <= M <= 32 or bits not in (4, 8) or dtype != torch.float16:
        return []
    tiles = ((64, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 4, 2))
    if group and group < 64:
        tiles += ((128, group, 4, 4),)
    configs = []
    for bn, bk, warps, stages in tiles:
        if K % bk or (group and group % bk and bk % group):
            continue
        for split in wave_splits(K // bk, cdiv(N, bn), n_sm, (2, 3, 4, 6)):
            configs.append({"KERNEL": "wint_tc", "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": 16 if M <= 16 else 32,
                            "SPLIT_K": split, "STAGES": stages, "num_warps": warps, "num_stages": 1})
    return configs


def run_tc(cfg: dict, x2: torch.Tensor, qweight, qzeros, scales, bits: int, group: int, N: int,
           mins: torch.Tensor | None = None) -> torch.Tensor:
    """mins [G, N]: W = (q - z) * s - mins (HAS_MIN)."""
    M, K = x2.shape
    bk = cfg["BLOCK_K"]
    if bits not in (4, 8) or K % bk or (group and group % bk and bk % group) or bk % 16:
        raise ValueError(f"wint_tc: 4 or 8 bits with BLOCK_K {bk} (a multiple of 16) dividing K {K}, and the group "
                         f"{group} dividing it or it the group")
    xsums = scales
    if mins is not None:
        if not group:
            raise ValueError("wint_tc: a min term needs groups")
        xsums = x2.view(M, K // group, group).sum(-1, dtype=torch.float32)
    split = cfg["SPLIT_K"]
    out, partials, counters = split_buffers(x2, N, split, cfg["BLOCK_N"])
    bm = cfg.get("BLOCK_M", 16)
    grid = (cdiv(N, cfg["BLOCK_N"]), split, cdiv(M, bm))
    wint_tc_kernel[grid](x2, out, qweight, qzeros, scales, scales if mins is None else mins, xsums, partials, counters,
                         M, N, K, x2.stride(0), out.stride(0), qzeros.shape[1], split, GROUP=group,
                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, BLOCK_M=bm, STAGES=cfg.get("STAGES", 1),
                         PTX=not interpreted(), BITS=bits, HAS_MIN=mins is not None, num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"])
    return out
