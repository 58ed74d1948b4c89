"""W{2..8}A16 integer weights (RTN, GPTQ, AWQ) times fp16/bf16 activations, from the packed GPTQ layout.

Layout (qbench/quant/qlinear.py, packing.py), K = in_features, N = out_features:
    qweight [ceil(K*bits/32), N] int32   little-endian bit stream of codes along K
    qzeros  [G, ceil(N*bits/32)] int32   the same stream along N, no -1 offset
    scales  [G, N] fp16
    g_idx   [K] int32 or None            None: group k // group_size (act-order passes the permutation)
    W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]

Kernels, chosen per shape by the tuner (kernels/tune.py) among their configs:
- the generic dequantize-matmul skeleton (kernels/matmul.py): every bit width, act-order, any M;
- for decode (M <= 4) with 2, 3, 4 or 8 bits and no act-order: with fp16 activations the fp16x2
  kernel of kernels/wint_h2.py (two weights per instruction; it beat the one below on every H100
  shape), otherwise wint_decode_kernel below, on the CUDA cores in fp32, one program row per token.
  It unpacks a whole int32 word into its 32/bits codes with
  shifts (3 bits: a 24-bit slice of a 3-word chunk into 8 codes, see unpack3), turns codes into
  floats with the exponent trick (code | 0x4B000000 read as float32 is 2**23 + code, exact, no
  int->float conversion instruction) and folds the zero point into that one subtraction; the scale
  is applied once per group on the partial sum. IN_PLACE (a tuner choice) also skips the shift for
  codes that lie below bit 23 where they are: (word & mask) | 2**23 is 2**23 + q * 2**pos, and x is
  pre-scaled by 2**-pos (exact); on sm_90 this cuts the 4-bit loop body from 827 to 764
  instructions (offline compile), but on the H100 it was no faster (within 3 %). The K range is split over SPLIT_K
  programs that add into a float32 output. (A tl.dot variant that padded the tokens to 16
  lost to the skeleton's tl.dot path at every decode shape on the H100 and was removed.)
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.dequant import stream_codes
from qbench.kernels.matmul import WINT, candidate_configs, dequant_matmul, sm_count
from qbench.kernels.tune import cdiv, m_bucket, pick
from qbench.kernels.wint_h2 import h2_decode_configs, run_h2_decode
from qbench.kernels.wint_mma import mma_configs, run_mma
from qbench.kernels.wint_tc import run_tc, tc_configs


def is_default_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when g_idx is k // group_size (no act-order), so the kernel may skip reading it."""
    K = g_idx.numel()
    size = K if group_size <= 0 else group_size
    default = torch.arange(K, device=g_idx.device, dtype=torch.int32) // size
    return bool(torch.equal(g_idx.to(torch.int32), default))


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
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_w = tl.arange(0, WORDS)
    offs_p = tl.arange(0, PER)
    shifts = (offs_p * BITS).to(tl.uint32)
    if IN_PLACE:  # codes whose bits end above bit 23 are first shifted down by 16
        in_bit = offs_p * BITS - tl.where(offs_p * BITS + BITS > 23, 16, 0)
        in_shift = (offs_p * BITS - in_bit).to(tl.uint32)
        in_mask = (((1 << BITS) - 1) << in_bit).to(tl.uint32)
        in_scale = tl.exp2(in_bit.to(tl.float32))
    n_words = tl.cdiv(K, PER)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_end = tl.minimum(pid_k * per_split + per_split, k_tiles)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(pid_k * per_split, t_end):
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
    out = out_ptr + m * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(out, acc, mask=nmask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def decode_configs(M: int, N: int, K: int, bits: int, group: int, device: torch.device) -> list[dict]:
    """Configs of wint_decode_kernel for this shape (empty where it does not apply)."""
    if M > 4 or bits not in (2, 3, 4, 8):
        return []
    configs = []
    for bn, bk, warps in ((128, 128, 4), (256, 128, 8), (256, 64, 4), (64, 256, 4), (512, 64, 8)):
        if group and group % bk:
            continue
        k_tiles = cdiv(K, bk)
        want = max(1, (4 * sm_count(device)) // (cdiv(N, bn) * M))  # about four programs per SM
        split = min(1 << (want.bit_length() - 1), k_tiles)
        for s in sorted({1, max(split // 2, 1), split}):
            for in_place in ((False, True) if bits != 3 else (False,)):
                configs.append({"KERNEL": "wint_decode", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s,
                                "num_warps": warps, "num_stages": 3, "IN_PLACE": in_place})
    return configs


def run_decode(cfg: dict, x2: torch.Tensor, qweight, qzeros, scales, bits: int, group: int, N: int) -> torch.Tensor:
    M, K = x2.shape
    split = cfg["SPLIT_K"]
    out = torch.zeros((M, N), dtype=torch.float32, device=x2.device) if split > 1 else \
        torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (cdiv(N, cfg["BLOCK_N"]), split, M)
    wint_decode_kernel[grid](x2, out, qweight, qzeros, scales, N, K, x2.stride(0), out.stride(0), qzeros.shape[1],
                             split, BITS=bits, GROUP=group, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                             ATOMIC=split > 1, IN_PLACE=cfg.get("IN_PLACE", False), num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"])
    return out.to(x2.dtype)


def wint_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype. group_size -1 (or >= K) is one group per column."""
    K, N = x.shape[-1], scales.shape[1]
    if qweight.shape != (-(-K * bits // 32), N) or qzeros.shape != (scales.shape[0], -(-N * bits // 32)):
        raise ValueError(f"packed shapes {tuple(qweight.shape)}, {tuple(qzeros.shape)} do not fit K={K}, N={N}, bits={bits}")
    group = 0 if group_size <= 0 or group_size >= K else group_size
    act_order = g_idx is not None
    ptrs = (qweight, qzeros, scales, g_idx) if act_order else (qweight, qzeros, scales)
    M = x.numel() // K if K else 0
    fast = None
    if not act_order:
        def configs():
            n_sm = sm_count(x.device)
            # where the fp16x2 kernel applies (fp16 activations) it beat the fp32 one on every H100 shape
            h2 = h2_decode_configs(M, N, K, bits, group, x.dtype, n_sm)
            return ((h2 or decode_configs(M, N, K, bits, group, x.device)) + tc_configs(M, N, K, bits, group, x.dtype, n_sm)
                    + mma_configs(M, N, K, bits, group, x.dtype, x.device, n_sm))

        def run(cfg, x2):
            launch = {"wint_h2": run_h2_decode, "wint_tc": run_tc, "wint_mma": run_mma}.get(cfg["KERNEL"], run_decode)
            return launch(cfg, x2, qweight, qzeros, scales, bits, group, N)
        fast = (configs, run)
    return dequant_matmul(WINT, x, N, ptrs, (bits, group, act_order), i0=qzeros.shape[1], name="wint",
                          config=config, fast=fast)


def wint_min_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    mins: torch.Tensor, bits: int, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T for W = (q - z) * s - mins, mins fp16 [G, N]: integer codes whose zero points are
    floats (HQQ, qbench/quant/float_zero.py), on the same kernels as GGUF's min term (kernels/gguf.py):
    the fp16x2 decode and tensor-core kernels with HAS_MIN where the groups tile K, and for any shape
    the integer skeleton followed by out -= (sums of x over each group) @ mins. A short last group
    (group_size not dividing K) takes the skeleton only: its sums come from x padded with zeros."""
    K, N = x.shape[-1], scales.shape[1]
    if mins.shape != scales.shape:
        raise ValueError(f"mins {tuple(mins.shape)} must have the shape of scales {tuple(scales.shape)}")
    group = 0 if group_size <= 0 or group_size >= K else group_size
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    tiled = group > 0 and K % group == 0  # every group whole: the HAS_MIN kernels apply

    def skeleton(cfg, xm):
        out = dequant_matmul(WINT, xm, N, (qweight, qzeros, scales), (bits, group, False), i0=qzeros.shape[1],
                             config=cfg)
        size = group or K
        padded = torch.nn.functional.pad(xm, (0, mins.shape[0] * size - K))
        sums = padded.view(xm.shape[0], mins.shape[0], size).sum(-1, dtype=torch.float32)
        return torch.addmm(out.float(), sums, mins.float(), alpha=-1).to(xm.dtype)

    def configs():
        n_sm = sm_count(x.device)
        fast = []
        if tiled:
            fast = [c for c in h2_decode_configs(M, N, K, bits, group, x.dtype, n_sm) if K % c["BLOCK_K"] == 0]
            fast += tc_configs(M, N, K, bits, group, x.dtype, n_sm)
        return fast + [{"KERNEL": "wint_skeleton", "WINT": c} for c in candidate_configs(M, N, K, x.device)]

    def run(cfg):
        if cfg["KERNEL"] == "wint_h2":
            return run_h2_decode(cfg, x2, qweight, qzeros, scales, bits, group, N, mins=mins).to(x.dtype)
        if cfg["KERNEL"] == "wint_tc":
            return run_tc(cfg, x2, qweight, qzeros, scales, bits, group, N, mins=mins).to(x.dtype)
        return skeleton(cfg["WINT"], x2)

    if config is None:
        config = pick("wint_min", (bits, group, m_bucket(M), N, K, str(x.dtype)), configs, run, x.device)
    return run(config).reshape(*x.shape[:-1], N)
