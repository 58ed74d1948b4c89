"""W4A16 for 2..16 tokens on Hopper tensor cores, the weights dequantized straight into the MMA's registers.

kernels/wint_tc.py makes the weight tile the A operand of wgmma (out^T = W x^T) but builds it in a
blocked layout, which Triton moves into the operand's register layout through shared memory (a store,
a barrier and ldmatrix per tile): on the H100 and the H200 that round trip, not DRAM, bounds it
(reports/kernels/NOTES.md). This kernel is written in Gluon, Triton's layout-explicit dialect, and
packs the weights once so that each thread's 32-bit words hold exactly the codes of its own fragment
of the wgmma A operand (as Marlin does in CUDA): the fp16x2 dequantization then produces the operand
in place, the layout conversion is a renaming of registers, and the only shared memory is the
activation tile (the B operand, [16, BLOCK_K]).

Fragment layout (Triton's DotOperandLayout(0, NVMMA v3, k_width=2), the wgmma A register operand): in
a tile of 64 output features x BLOCK_K, warp w of the warpgroup holds rows 16w..16w+15; lane
l = 4 rl + t holds rows 16w + rl and 16w + rl + 8 (rh = 0, 1) and, of every 32 K values c2, the
eight k = 32 c2 + 16 c1 + 8 h + 2 t + p (c1, h, p in {0, 1}). Packed copy (`mma_layout`, built from
the GPTQ qweight once per weight and cached on it): per (64-row tile, K tile), BLOCK_N * BLOCK_K / 8
int32 words ordered [n, t, c2] (row major: a thread's C2 words are one vector load, a warp's lanes
read consecutive vectors); nibble 4 c1 + 2 h + p of a word is that k's 4-bit code, so
the four fp16x2 pair steps of wint_tc (prmt, lop3: 1 + q / 64 exact; sub.f16x2 of 1 + z / 64: (q - z)
/ 64 exact) give the fragment's pairs (c1, h) in order. The scale is not applied per weight: each K
tile is one quantization group (or inside one), its product P = W' x^T (W' = (q - z) / 64, fp32
accumulate) is taken fresh per group and added as acc += 64 s * P, which saves the fp16 multiply per
weight pair and its rounding.

The copy costs the 4-bit weight's memory once more (as the NF4 kernel's column copy). It is built when
the tuner first times a wint_mma config for a weight and kept even where another kernel wins that
shape: the weight's other token counts (each tuned on its own) may use it. Loads run one K
tile ahead in registers, scales and zeros included (a scale load after the MMA stalled every tile).
Measured on the H200 (reports/kernels/NOTES.md), M=16 on the Llama-3-70B MLP shapes: 0.061 / 0.058 ms
against 0.089 / 0.085 for wint_tc. Tried there and dropped: loads two tiles ahead in registers (128
registers, slower), an asynchronous wgmma overlapping the next tile's dequantization (wrong results),
and a variant fed by TMA bulk copies through 3-5 shared-memory stages (correct, 5-10 % slower).

Requires fp16 activations, 4 bits, no act-order, K a multiple of BLOCK_K and the group a multiple
of BLOCK_K (or one group). Split-K ends as in kernels/splitk.py. Gluon kernels do not run under
TRITON_INTERPRET=1: on the CPU the tuner never offers this kernel, and the CPU tests check the packing
against the fragment map above and a torch emulation of the kernel's data flow (offsets, pair steps,
join nesting, permutation, per-group scaling, split-K) against the reference (tests/test_wint_mma.py);
the kernel itself is tested on a Hopper GPU.
"""

import functools

import torch
import triton

try:  # Gluon: triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
except ImportError:  # pragma: no cover - older triton: the tuner does not offer this kernel
    gluon = None

from qbench.kernels.splitk import split_buffers, wave_splits
from qbench.kernels.tune import cdiv, interpreted

_PAIR = """{
.reg .b32 d;
prmt.b32 d, $1, $2, SEL;
lop3.b32 d, d, 0x00F000F0, 0x3C003C00, 0xEA;
sub.f16x2 $0, d, $3;
}"""


def tile_shape(BK: int, warps: int) -> int:
    """Output features per program: 64 per warpgroup of 4 warps."""
    return 64 * (warps // 4)


def mma_layout(qweight: torch.Tensor, N: int, K: int, BK: int, BN: int) -> torch.Tensor:
    """GPTQ qweight [K/8, N] int32 (code k % 8 of column n in bits 4 (k % 8) of word [k // 8, n]) ->
    flat int32 words [ceil(N / BN), K / BK, BN (n), 4 (t), BK / 32 (c2)] (module docstring), rows past N
    zero; cached on qweight until it changes."""
    key = (qweight._version, N, K, BK, BN)
    cached = getattr(qweight, "_qbench_mma", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if K % BK or BK % 32 or BN % 64:
        raise ValueError(f"wint_mma: K={K} must be a multiple of BLOCK_K={BK} (a multiple of 32), BLOCK_N={BN} of 64")
    nibbles = 4 * torch.arange(8, device=qweight.device)
    codes = ((qweight.long()[:, None, :] >> nibbles[None, :, None]) & 15).reshape(K, N).T  # [N, K]: code k in word k // 8
    n_pad = -(-N // BN) * BN
    if n_pad != N:
        codes = torch.cat((codes, codes.new_zeros(n_pad - N, K)))
    # n = tile * BN + n';  k = kt * BK + 32 c2 + 16 c1 + 8 h + 2 t + p
    c = codes.reshape(n_pad // BN, BN, K // BK, BK // 32, 2, 2, 4, 2)
    #                 tile         n'  kt       c2       c1 h  t  p
    c = c.permute(0, 2, 1, 6, 3, 4, 5, 7).reshape(-1, 8)  # [..., nibble 4 c1 + 2 h + p]
    words = (c.long() << (4 * torch.arange(8, device=qweight.device))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()
    qweight._qbench_mma = (key, words)
    return words


if gluon is not None:
    PAIR0, PAIR1, PAIR2, PAIR3 = (gl.constexpr(_PAIR.replace("SEL", sel)) for sel in ("0x0400", "0x0501", "0x0602", "0x0703"))

    @gluon.jit
    def _pair(shifted, words, zz, ASM: gl.constexpr):
        """fp16 pair ((q_2i - z) / 64, (q_2i+1 - z) / 64) of each word (exact), packed in uint32."""
        return gl.inline_asm_elementwise(ASM, "=r,r,r,r", [shifted, words, zz], dtype=gl.uint32, is_pure=True, pack=1)

    @gluon.jit
    def _weights(words, zz, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr):
        """The A operand [BN, BK] fp16 ((q - z) / 64) of words [BN, 4, BK / 32] in the fragment layout."""
        shifted = words << 4
        p0 = _pair(shifted, words, zz, PAIR0)
        p1 = _pair(shifted, words, zz, PAIR1)
        p2 = _pair(shifted, words, zz, PAIR2)
        p3 = _pair(shifted, words, zz, PAIR3)
        # gl.join appends the new axis last: [BN, t, c2, c1, h] for pair i = 2 c1 + h
        j = gl.join(gl.join(p0, p2), gl.join(p1, p3))
        lo = (j & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True)
        hi = (j >> 16).to(gl.uint16).to(gl.float16, bitcast=True)
        w = gl.join(lo, hi)  # [BN, t, c2, c1, h, p]
        w = gl.reshape(gl.permute(w, (0, 2, 3, 4, 1, 5)), (BN, BK))  # k = 32 c2 + 16 c1 + 8 h + 2 t + p
        return gl.convert_layout(w, A_L)  # the same registers: no data moves

    @gluon.jit
    def _zero_pairs(zw, zshift):
        """[BN, 1, 1] uint32 pairs of fp16 1 + z / 64 (exact) from the packed zero words of the rows."""
        z = ((zw.to(gl.uint32, bitcast=True) >> zshift) & 15).to(gl.float32)
        z1 = (1.0 + z / 64).to(gl.float16).to(gl.uint16, bitcast=True).to(gl.uint32)
        return gl.expand_dims(gl.expand_dims(z1 | (z1 << 16), 1), 2)

    @gluon.jit
    def _mma_step(a, xt_smem, acc, part, sc, t, t0, t_end, TILES_PER_GROUP: gl.constexpr):
        """acc (+)= 64 s * (W' x^T) of one K tile; the product is taken per group (fresh at a group's first
        tile and at this split's first), or, with one group (0), accumulated and scaled after the loop."""
        if TILES_PER_GROUP == 1:
            part = warpgroup_mma(a, xt_smem, part, use_acc=False)
            acc += gl.expand_dims(sc.to(gl.float32) * 64, 1) * part
        elif TILES_PER_GROUP == 0:
            acc = warpgroup_mma(a, xt_smem, acc)
        else:
            part = warpgroup_mma(a, xt_smem, part, use_acc=(t != t0) & (t % TILES_PER_GROUP != 0))
            if ((t + 1) % TILES_PER_GROUP == 0) | (t == t_end - 1):
                acc += gl.expand_dims(sc.to(gl.float32) * 64, 1) * part
        return acc, part

    @gluon.jit
    def _store_out(acc, out_ptr, partials, counters, scales, sn, smask, M, N, stride_om, pid_n, pid_k, SPLIT_K,
                   BN: gl.constexpr, ACC_L: gl.constexpr, TILES_PER_GROUP: gl.constexpr):
        """out^T tile [BN, 16] in fp16, through split-K's partials and arrival counter (kernels/splitk.py)."""
        if TILES_PER_GROUP == 0:
            s = gl.load(scales + sn, mask=smask, other=0.0).to(gl.float32)
            acc = gl.expand_dims(s * 64, 1) * acc
        om = gl.arange(0, 16, layout=gl.SliceLayout(0, ACC_L))
        omask = gl.expand_dims(smask, 1) & gl.expand_dims(om < M, 0)
        out = out_ptr + gl.expand_dims(om, 0) * stride_om + gl.expand_dims(sn, 1)
        if SPLIT_K == 1:
            gl.store(out, acc.to(gl.float16), mask=omask)
        else:
            pofs = gl.expand_dims(om, 0) * N + gl.expand_dims(sn, 1)
            gl.store(partials + pid_k * M * N + pofs, acc, mask=omask)
            gl.thread_barrier()  # every thread's partial is written before the counter says so
            arrived = gl.atomic_add(counters + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = gl.zeros([BN, 16], gl.float32, ACC_L)
                for k in range(0, SPLIT_K):
                    total += gl.load(partials + k * M * N + pofs, mask=omask, other=0.0, cache_modifier=".cg")
                gl.store(out, total.to(gl.float16), mask=omask)
                gl.atomic_xchg(counters + pid_n, 0)

    @gluon.jit
    def wint_mma_kernel(x_ptr, out_ptr, tiles, qzeros, scales, partials, counters, M, N, K, stride_xm, stride_om,
                        n_zero_words, SPLIT_K, GROUP: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                        WORDS_L: gl.constexpr, A_L: gl.constexpr, ACC_L: gl.constexpr, X_L: gl.constexpr,
                        XS_L: gl.constexpr):
        C2: gl.constexpr = BK // 32
        TILE_WORDS: gl.constexpr = BN * BK // 8
        TILES_PER_GROUP: gl.constexpr = 0 if GROUP == 0 else GROUP // BK
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        k_tiles = K // BK
        per_split = gl.cdiv(k_tiles, SPLIT_K)
        t0 = pid_k * per_split
        t_end = gl.minimum(t0 + per_split, k_tiles)

        # word offsets in a tile [BN rows, 4 (t), C2], row major
        rows = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WORDS_L)))
        ts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WORDS_L)))
        cs = gl.arange(0, C2, layout=gl.SliceLayout(0, gl.SliceLayout(1, WORDS_L)))
        off = (gl.expand_dims(gl.expand_dims(rows * (4 * C2), 1), 2) + gl.expand_dims(gl.expand_dims(ts * C2, 0), 2)
               + gl.expand_dims(gl.expand_dims(cs, 0), 1))
        off = gl.max_contiguous(gl.multiple_of(off, [1, 1, C2]), [1, 1, C2])  # C2 words: one vector load
        tile_ptr = tiles + pid_n.to(gl.int64) * k_tiles * TILE_WORDS + off
        zn = pid_n * BN + rows
        zmask = zn < N
        zshift = ((zn % 8) * 4).to(gl.uint32)
        sn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, ACC_L))
        smask = sn < N

        xm = gl.arange(0, 16, layout=gl.SliceLayout(1, X_L))
        xk = gl.arange(0, BK, layout=gl.SliceLayout(0, X_L))
        x_ptrs = x_ptr + gl.expand_dims(xm, 1) * stride_xm + gl.expand_dims(xk, 0)
        x_mask = gl.expand_dims(xm < M, 1)
        xs = gl.allocate_shared_memory(gl.float16, [2, 16, BK], XS_L)

        acc = gl.zeros([BN, 16], gl.float32, ACC_L)
        part = gl.zeros([BN, 16], gl.float32, ACC_L)
        # loads run one K tile ahead of the math (registers as the pipeline; two ahead was slower on the
        # H200: 128 registers a thread)
        tf = gl.minimum(t0, k_tiles - 1)  # a split past the end (no tiles) still loads in bounds
        words = gl.load(tile_ptr + tf * TILE_WORDS)
        xt = gl.load(x_ptrs + tf * BK, mask=x_mask, other=0.0)
        g = 0 if GROUP == 0 else tf * BK // GROUP
        zw = gl.load(qzeros + g * n_zero_words + zn // 8, mask=zmask, other=0)
        sc = gl.load(scales + g * N + sn, mask=smask, other=0.0)
        for t in range(t0, t_end):
            tn = gl.minimum(t + 1, t_end - 1)
            gn = 0 if GROUP == 0 else tn * BK // GROUP
            words_n = gl.load(tile_ptr + tn * TILE_WORDS)
            xt_n = gl.load(x_ptrs + tn * BK, mask=x_mask, other=0.0)
            zw_n = gl.load(qzeros + gn * n_zero_words + zn // 8, mask=zmask, other=0)
            sc_n = gl.load(scales + gn * N + sn, mask=smask, other=0.0)  # loaded with the words: no stall after the MMA

            a = _weights(words.to(gl.uint32, bitcast=True), _zero_pairs(zw, zshift), BN, BK, A_L)
            buf = xs.index(t % 2)
            buf.store(xt)
            fence_async_shared()
            gl.thread_barrier()
            acc, part = _mma_step(a, buf.permute((1, 0)), acc, part, sc, t, t0, t_end, TILES_PER_GROUP)
            words = words_n
            xt = xt_n
            zw = zw_n
            sc = sc_n
        _store_out(acc, out_ptr, partials, counters, scales, sn, smask, M, N, stride_om, pid_n, pid_k, SPLIT_K, BN,
                   ACC_L, TILES_PER_GROUP)

    @functools.lru_cache(maxsize=None)  # built once per (BLOCK_K, warps), not on every call
    def mma_layouts(BK: int, warps: int) -> dict:
        """The kernel's layouts for BLOCK_K and 4 or 8 warps (one or two warpgroups, stacked along N)."""
        BN = tile_shape(BK, warps)
        c2_bases = [[0, 0, 1 << i] for i in range((BK // 32).bit_length() - 1)]
        warp_bases = [[16 << i, 0, 0] for i in range((warps // 4).bit_length() + 1)]
        words = gl.DistributedLinearLayout(reg_bases=c2_bases + [[8, 0, 0]],
                                           lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                           warp_bases=warp_bases, block_bases=[], shape=[BN, 4, BK // 32])
        acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, 16, 16])
        tk = BK // 8
        return dict(WORDS_L=words, A_L=gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2), ACC_L=acc,
                    X_L=gl.BlockedLayout([1, 8], [32 // tk, tk], [warps, 1], [1, 0]),
                    XS_L=gl.NVMMASharedLayout.get_default_for([16, BK], gl.float16))


def usable(device: torch.device) -> bool:
    """Gluon present, not interpreted, and a Hopper GPU (wgmma)."""
    return (gluon is not None and not interpreted() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == 9)


def mma_configs(M: int, N: int, K: int, bits: int, group: int, dtype: torch.dtype, device: torch.device,
                n_sm: int) -> list[dict]:
    """Configs of wint_mma_kernel (2 <= M <= 16, 4 bits, fp16): K tiles of 64 or 128 inside a group, one
    or two warpgroups, the K range split so that two to eight programs per SM fill the GPU."""
    if not 2 <= M <= 16 or bits != 4 or dtype != torch.float16 or not usable(device):
        return []
    configs = []
    for bk, warps in ((128, 4), (64, 4), (128, 8)):
        if K % bk or (group and group % bk):
            continue
        for split in wave_splits(K // bk, cdiv(N, tile_shape(bk, warps)), n_sm, (2, 3, 4, 6, 8)):
            configs.append({"KERNEL": "wint_mma", "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps})
    return configs


def run_mma(cfg: dict, x2: torch.Tensor, qweight, qzeros, scales, bits: int, group: int, N: int) -> torch.Tensor:
    M, K = x2.shape
    bk, warps = cfg["BLOCK_K"], cfg["num_warps"]
    bn = tile_shape(bk, warps)
    if bits != 4 or M > 16 or K % bk or (group and group % bk) or x2.dtype != torch.float16:
        raise ValueError(f"wint_mma: 4 bits, fp16, M <= 16, BLOCK_K {bk} dividing K {K} and the group {group}")
    tiles = mma_layout(qweight, N, K, bk, bn)
    split = cfg["SPLIT_K"]
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    out, partials, counters = split_buffers(x2, N, split, bn)
    grid = (cdiv(N, bn), split)
    layouts = mma_layouts(bk, warps)
    wint_mma_kernel[grid](x2, out, tiles, qzeros, scales, partials, counters, M, N, K, x2.stride(0), out.stride(0),
                          qzeros.shape[1], split, GROUP=group, BN=bn, BK=bk, **layouts, num_warps=warps)
    return out
