"""W8A8: int8 or FP8 weights times activations quantized per token on the fly.

Layouts (K = in_features, N = out_features):
    int8:  w_q int8 [N, K], w_scale float32 [N]            W ~ w_q * w_scale[:, None] (absmax / 127 per row)
    fp8:   w_q float8_e4m3fn or float8_e5m2 [N, K], w_scale float32 [1] (per tensor) or [N] (per channel)
    LLM.int8(): the int8 layout plus outlier_idx int32 [n_out] (input columns kept in 16 bit) and
           w_outlier fp16/bf16 [N, n_out]; those columns of x are zeroed before x is quantized.
           Or, for M <= DECODE_TOKENS (32), outlier_mask bool [K] instead (no index list, so no host
           sync and the call can be captured in a CUDA graph): the 16-bit part is x * mask times the int8 weight
           tile the int8 part loads anyway, converted to x's dtype, scaled by w_scale after the sum.
Activations: s_x[m] = absmax(x[m, kept]) / QMAX (127 for int8, 448 for e4m3; a zero row gets scale 1),
x_q = round-half-away(x / s_x) clamped to +-127 for int8, x / s_x cast to e4m3 for fp8.
    out = (x_q @ w_q^T) * s_x[:, None] * w_scale  (+ x[:, outlier_idx] @ w_outlier^T)
The matmul accumulates int8 products in int32 and fp8 products in fp32 on the tensor cores.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.matmul import grouped_tile, output_tile
from qbench.kernels.splitk import split_tiles
from qbench.kernels.tune import cdiv, m_bucket, pick

INT8_MAX, E4M3_MAX = 127.0, 448.0
# Up to this many tokens LLM.int8() finds its outlier columns on the device (outlier_split, the mask path):
# decode steps, batch 32 included. Beyond, the index list (a nonzero(), one host sync per layer) gathers
# only the outlier columns, where the mask path's second, dense 16-bit product would cost a GEMM.
DECODE_TOKENS = 32


@triton.jit
def round_e4m3(v):
    """v rounded to the nearest e4m3 value (ties to even) in float32 arithmetic, so the cast is exact
    whatever the conversion instruction does (the CPU interpreter's rounds wrongly across binades)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    step = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits, subnormals below 2^-6
    r = v / step
    return ((r + 12582912.0) - 12582912.0) * step  # 1.5 * 2**23: round half to even


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, keep_ptr, K, stride_x, stride_q,
                         QMAX: tl.constexpr, IS_INT: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.abs(tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32))
        if HAS_KEEP:
            v = tl.where(tl.load(keep_ptr + offs, mask=offs < K, other=0) != 0, v, 0.0)
        amax = tl.maximum(amax, v)
    top = tl.max(amax, axis=0)
    scale = tl.where(top > 0, tl.div_rn(top, QMAX), 1.0)  # IEEE division: codes match torch exactly
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.div_rn(v, scale)
        if HAS_KEEP:
            v = tl.where(tl.load(keep_ptr + offs, mask=offs < K, other=0) != 0, v, 0.0)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if IS_INT:
            v = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))
        else:
            v = round_e4m3(v)
        tl.store(q_ptr + row * stride_q + offs, v.to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows(x2: torch.Tensor, dtype: torch.dtype, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) quantization of x2 [M, K] to int8 or an fp8 dtype -> (x_q [M, K], scale [M] float32)."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=dtype, device=x2.device)
    s = torch.empty(M, dtype=torch.float32, device=x2.device)
    is_int = dtype == torch.int8
    qmax = INT8_MAX if is_int else E4M3_MAX if dtype == torch.float8_e4m3fn else torch.finfo(dtype).max
    block = min(max(1 << max(K - 1, 0).bit_length(), 16), 2048)  # next power of 2 (triton's costs a call)
    quantize_rows_kernel[(M,)](x2, q, s, keep, K, x2.stride(0), q.stride(0), QMAX=float(qmax), IS_INT=is_int,
                               HAS_KEEP=keep is not None, BLOCK_K=block, num_warps=4 if block <= 1024 else 8)
    return q, s


@triton.jit
def outlier_find_kernel(x_ptr, keep_ptr, x16_ptr, amax_ptr, count_ptr, ever_ptr, M, K, threshold, stride_x, stride_x16,
                        COUNT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """outlier_split, step 1, one program per BLOCK_K input columns: the outlier columns (|x| > threshold
    in some token), keep (int8, 0 at the outliers), x16 (x with every other column zeroed), each token's
    absmax over this block's other columns (amax [blocks, BLOCK_M]) and with COUNT the block's number of
    outlier columns (count [blocks]) and the columns ever outliers (ever |= outliers)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    mask = (offs_m[:, None] < M) & kmask[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0)
    ax = tl.abs(x.to(tl.float32))
    out = tl.max(ax, axis=0) > threshold
    tl.store(keep_ptr + offs_k, tl.where(out, 0, 1).to(tl.int8), mask=kmask)
    tl.store(x16_ptr + offs_m[:, None] * stride_x16 + offs_k[None, :], tl.where(out[None, :], x, 0.0), mask=mask)
    tl.store(amax_ptr + pid * BLOCK_M + offs_m, tl.max(tl.where(out[None, :], 0.0, ax), axis=1))
    if COUNT:
        tl.store(count_ptr + pid, tl.sum((out & kmask).to(tl.int32), axis=0))
        ever = tl.load(ever_ptr + offs_k, mask=kmask, other=0)
        tl.store(ever_ptr + offs_k, ever | out, mask=kmask)


@triton.jit
def outlier_quantize_kernel(x_ptr, q_ptr, s_ptr, keep_ptr, amax_ptr, count_ptr, calls_ptr, cols_sum_ptr, M, K, n_blocks,
                            stride_x, stride_q, COUNT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCKS: tl.constexpr):
    """outlier_split, step 2, one program per BLOCK_K input columns: each token's scale from the blocks'
    absmax (every program reduces the few partial maxima itself; the first one stores the scales and
    adds the counts to the layer's statistics) and the int8 codes of the kept columns, with
    quantize_rows_kernel's arithmetic."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    offs_b = tl.arange(0, BLOCKS)
    part = tl.load(amax_ptr + offs_b[:, None] * BLOCK_M + offs_m[None, :], mask=(offs_b < n_blocks)[:, None], other=0.0)
    amax = tl.max(part, axis=0)
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)  # IEEE division: codes match torch exactly
    if pid == 0:
        tl.store(s_ptr + offs_m, scale, mask=mmask)
        if COUNT:
            n_out = tl.sum(tl.load(count_ptr + offs_b, mask=offs_b < n_blocks, other=0), axis=0)
            tl.store(calls_ptr, tl.load(calls_ptr) + 1)
            tl.store(cols_sum_ptr, tl.load(cols_sum_ptr) + n_out.to(tl.int64))
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    mask = mmask[:, None] & kmask[None, :]
    v = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.div_rn(v, scale[:, None])
    v = tl.where(tl.load(keep_ptr + offs_k, mask=kmask, other=0)[None, :] != 0, v, 0.0)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    v = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(0.5 - v))
    tl.store(q_ptr + offs_m[:, None] * stride_q + offs_k[None, :], v.to(tl.int8), mask=mask)


def outlier_split(x2: torch.Tensor, threshold: float, counters: tuple | None = None) -> tuple:
    """LLM.int8()'s outlier split of x2 [M <= DECODE_TOKENS, K] in two launches over column blocks -> (x_q int8 [M, K],
    s_x float32 [M], keep int8 [K], x16 [M, K]): what int8_matmul's outlier_mask path computes with
    several torch ops (see the module docstring). counters: (calls int64 [], cols_sum int64 [], ever
    bool [K]) updated in place, on the device (no host sync: the call can be captured in a CUDA graph)."""
    M, K = x2.shape
    if M > DECODE_TOKENS:
        raise ValueError(f"outlier_split serves M <= {DECODE_TOKENS} (decode), got M={M}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dev = x2.device
    block_m = 1 << max(M - 1, 0).bit_length()
    block_k = min(4096 // block_m, max(16, 1 << max(K - 1, 0).bit_length()))  # tiles of <= 4096 values
    blocks = cdiv(K, block_k)
    xq, sx = torch.empty((M, K), dtype=torch.int8, device=dev), torch.empty(M, dtype=torch.float32, device=dev)
    keep, x16 = torch.empty(K, dtype=torch.int8, device=dev), torch.empty_like(x2)
    amax = torch.empty((blocks, block_m), dtype=torch.float32, device=dev)
    count = torch.empty(blocks, dtype=torch.int32, device=dev) if counters is not None else None
    calls, cols_sum, ever = counters if counters is not None else (None, None, None)
    warps = 4 if block_m * block_k <= 1024 else 8
    outlier_find_kernel[(blocks,)](x2, keep, x16, amax, count, ever, M, K, float(threshold), x2.stride(0),
                                   x16.stride(0), COUNT=counters is not None, BLOCK_M=block_m, BLOCK_K=block_k,
                                   num_warps=warps)
    outlier_quantize_kernel[(blocks,)](x2, xq, sx, keep, amax, count, calls, cols_sum, M, K, blocks, x2.stride(0),
                                       xq.stride(0), COUNT=counters is not None, BLOCK_M=block_m, BLOCK_K=block_k,
                                       BLOCKS=max(2, 1 << max(blocks - 1, 0).bit_length()), num_warps=warps)
    return xq, sx, keep, x16


@triton.jit
def w8a8_kernel(xq_ptr, sx_ptr, wq_ptr, sw_ptr, out_ptr, x16_ptr, oidx_ptr, wo_ptr,
                M, N, K, n_out, stride_xq, stride_x16, stride_om, SPLIT_K,
                IS_INT: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr, DENSE_OUTLIERS: tl.constexpr = False):
    """DENSE_OUTLIERS: x16_ptr is x [M, K] with every column but the outliers zeroed (see the module
    docstring); otherwise the HAS_OUTLIERS part gathers the n_out columns of oidx_ptr."""
    pid_k = tl.program_id(1)
    offs_m, mmask, offs_n, nmask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    t_start, t_end = split_tiles(tl.cdiv(K, BLOCK_K), SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
    acc16 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # DENSE_OUTLIERS: x[:, outliers] @ w_q^T
    for t in range(t_start, t_end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no K mask: the loads stay unpredicated along K (vectorized, pipelined)
            xmask = mmask[:, None]
            a = tl.load(xq_ptr + offs_m[:, None] * stride_xq + offs_k[None, :], mask=xmask, other=0.0)
            b = tl.load(wq_ptr + offs_n[None, :] * K + offs_k[:, None], mask=nmask[None, :], other=0.0)
        else:
            kmask = offs_k < K
            xmask = mmask[:, None] & kmask[None, :]
            a = tl.load(xq_ptr + offs_m[:, None] * stride_xq + offs_k[None, :], mask=xmask, other=0.0)
            b = tl.load(wq_ptr + offs_n[None, :] * K + offs_k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if IS_INT:
            acc += tl.dot(a, b, out_dtype=tl.int32)
        else:
            acc += tl.dot(a, b)
        if DENSE_OUTLIERS:  # int8 codes are exact in fp16/bf16/fp32
            xo = tl.load(x16_ptr + offs_m[:, None] * stride_x16 + offs_k[None, :], mask=xmask, other=0.0)
            if x16_ptr.dtype.element_ty == tl.float32:
                acc16 += tl.dot(xo, b.to(tl.float32), input_precision="ieee")
            else:
                acc16 += tl.dot(xo, b.to(xo.dtype))
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0) if PER_CHANNEL else tl.load(sw_ptr)
    y = acc.to(tl.float32) * tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)[:, None] * sw
    if DENSE_OUTLIERS:
        y += acc16 * sw
    if HAS_OUTLIERS:
        if pid_k == 0:
            for o0 in range(0, n_out, 16):
                offs_o = o0 + tl.arange(0, 16)
                omask = offs_o < n_out
                cols = tl.load(oidx_ptr + offs_o, mask=omask, other=0)
                xo = tl.load(x16_ptr + offs_m[:, None] * stride_x16 + cols[None, :], mask=mmask[:, None] & omask[None, :], other=0.0)
                wo = tl.load(wo_ptr + offs_n[None, :] * n_out + offs_o[:, None], mask=omask[:, None] & nmask[None, :], other=0.0)
                if x16_ptr.dtype.element_ty == tl.float32:
                    y += tl.dot(xo, wo.to(tl.float32), input_precision="ieee")
                else:
                    y += tl.dot(xo, wo.to(xo.dtype))
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, y, mask=mmask[:, None] & nmask[None, :])
    else:
        tl.store(out, y, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def w8a8_tma_kernel(xq_desc, sx_ptr, wq_desc, sw_ptr, out_ptr, M, N, K, stride_om,
                    IS_INT: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Prefill variant without outlier columns: both operands through tensor descriptors (TMA on
    Hopper: bulk asynchronous tile copies, zero fill outside the matrix, so no masks in the loop)."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = xq_desc.load([pid_m * BLOCK_M, k0])
        b = wq_desc.load([pid_n * BLOCK_N, k0])
        if IS_INT:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    sw = tl.load(sw_ptr + offs_n, mask=nmask, other=0.0) if PER_CHANNEL else tl.load(sw_ptr)
    y = acc.to(tl.float32) * tl.load(sx_ptr + offs_m, mask=mmask, other=0.0)[:, None] * sw
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mmask[:, None] & nmask[None, :])


def _cfg(bm, bn, bk, warps, stages, split=1, group_m=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "GROUP_M": group_m,
            "num_warps": warps, "num_stages": stages}


def candidate_configs(M: int, N: int, K: int, device: torch.device) -> list[dict]:
    if M <= 16:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        configs = []
        for bn, bk, warps, stages in [(64, 256, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3)]:
            k_tiles = cdiv(K, bk)
            want = max(1, (4 * sms) // cdiv(N, bn))
            split = min(1 << (want.bit_length() - 1), k_tiles)
            for s in sorted({1, split, min(2 * split, k_tiles)}):
                configs.append(_cfg(16, bn, bk, warps, stages, split=s, group_m=1))
        return configs
    tma = [dict(_cfg(bm, bn, bk, w, st), KERNEL="tma") for bm, bn, bk, w, st in
           [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 8, 4), (128, 128, 256, 8, 3), (256, 128, 128, 8, 3)]]
    return tma + [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(128, 128, 128, 4, 4), _cfg(64, 128, 128, 4, 4),
            _cfg(128, 256, 64, 8, 4), _cfg(128, 256, 128, 8, 4), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 256, 8, 3),
            _cfg(128, 256, 128, 8, 3, group_m=16)]


def _w8a8(x, w_q, w_scale, act_dtype, outlier_idx=None, w_outlier=None, config=None, name="w8a8", outlier_mask=None,
          prologue=None, act_scale=None):
    K, N = x.shape[-1], w_q.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    dense = outlier_mask is not None or prologue is not None
    if dense and M > DECODE_TOKENS:
        raise ValueError(f"outlier_mask serves M <= {DECODE_TOKENS} (decode), got M={M}: pass outlier_idx and w_outlier")
    has_out = not dense and outlier_idx is not None and outlier_idx.numel() > 0
    keep = None
    if prologue is not None:  # outlier_split's x_q, s_x, keep, x16
        keep, x16 = prologue[2], prologue[3]
    elif dense:  # device ops only: no host sync
        kept = ~outlier_mask
        keep = kept.to(torch.int8)
        x16 = x2.masked_fill(kept, 0)
    elif has_out:
        # index_fill_, not keep[idx] = 0: that copies a host scalar, which a CUDA graph capture refuses
        keep = torch.ones(K, dtype=torch.int8, device=x.device).index_fill_(0, outlier_idx.long(), 0)
        outlier_idx = outlier_idx.to(torch.int32).contiguous()
        w_outlier = w_outlier.contiguous()
    per_channel = w_scale.numel() > 1
    w_scale = w_scale.float().contiguous()
    is_int = act_dtype == torch.int8

    def run(cfg):
        if act_scale is not None:  # static: one calibrated scale for every token (SmoothQuant's per-tensor mode)
            xq = torch.round(x2.float() / act_scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            sx = act_scale.float().reshape(1).expand(M).contiguous()
        else:
            xq, sx = prologue[:2] if prologue is not None else quantize_rows(x2, act_dtype, keep)
        if cfg.get("KERNEL") == "tma":
            return _run_tma(cfg, xq, sx, w_q, w_scale, is_int, per_channel, x.dtype)
        split = cfg["SPLIT_K"]
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1 else \
            torch.empty((M, N), dtype=x.dtype, device=x.device)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), split)
        x16_arg = x16 if dense else x2 if has_out else None
        w8a8_kernel[grid](xq, sx, w_q, w_scale, out, x16_arg, outlier_idx if has_out else None,
                          w_outlier if has_out else None, M, N, K, outlier_idx.numel() if has_out else 0,
                          xq.stride(0), x16.stride(0) if dense else x2.stride(0), out.stride(0), split, IS_INT=is_int,
                          PER_CHANNEL=per_channel, HAS_OUTLIERS=has_out, ATOMIC=split > 1, EVEN_K=K % cfg["BLOCK_K"] == 0,
                          DENSE_OUTLIERS=dense, **{k: v for k, v in cfg.items() if k != "SPLIT_K"})
        return out.to(x.dtype)

    tma_ok = not has_out and not dense and K % 16 == 0 and w_q.data_ptr() % 16 == 0  # TMA: 16-byte aligned rows and base
    if config is None:
        key = (m_bucket(M), N, K, str(x.dtype), str(w_q.dtype), per_channel, has_out) + (("dense",) if dense else ())
        # the dense 16-bit part doubles a tile's accumulators: 16-row tiles (the decode list) up to 32 tokens
        config = pick(name, key, lambda: [c for c in candidate_configs(min(M, 16) if dense else M, N, K, x.device)
                                          if tma_ok or c.get("KERNEL") != "tma"], run, x.device)
    return run(config).reshape(*x.shape[:-1], N)


def _run_tma(cfg, xq, sx, w_q, w_scale, is_int, per_channel, out_dtype):
    from triton.tools.tensor_descriptor import TensorDescriptor

    (M, K), N = xq.shape, w_q.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    xq_desc = TensorDescriptor.from_tensor(xq, [bm, bk])
    wq_desc = TensorDescriptor.from_tensor(w_q, [bn, bk])
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    w8a8_tma_kernel[grid](xq_desc, sx, wq_desc, w_scale, out, M, N, K, out.stride(0), IS_INT=is_int,
                          PER_CHANNEL=per_channel, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _check_int8_weight(x: torch.Tensor, w_q: torch.Tensor) -> None:
    if w_q.dtype != torch.int8 or w_q.shape[1] != x.shape[-1]:
        raise ValueError(f"int8 weight must be int8 [N, {x.shape[-1]}], got {w_q.dtype} {tuple(w_q.shape)}")


def int8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, outlier_idx: torch.Tensor | None = None,
                w_outlier: torch.Tensor | None = None, config: dict | None = None,
                outlier_mask: torch.Tensor | None = None, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 int8 (per-row weight x per-token activation scales); LLM.int8() when outlier columns are given,
    as indices with their 16-bit weights or (at most DECODE_TOKENS) as a bool mask over the input columns.
    act_scale (a float32 scalar tensor): static activations, x_q = round(x / act_scale) clamped to +-127
    (half to even, as the torch reference), instead of per-token scales."""
    _check_int8_weight(x, w_q)
    if act_scale is not None and (outlier_idx is not None or outlier_mask is not None):
        raise ValueError("a static act_scale is for plain W8A8: no outlier columns")
    return _w8a8(x, w_q.contiguous(), w_scale, torch.int8, outlier_idx, w_outlier, config, "int8", outlier_mask,
                 act_scale=act_scale)


def llm_int8_decode(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, threshold: float,
                    counters: tuple | None = None, config: dict | None = None) -> torch.Tensor:
    """LLM.int8() for at most DECODE_TOKENS tokens with the outlier columns found on the device: outlier_split (two
    launches: outliers, their 16-bit part, the int8 codes of the rest, the statistics) and the mask path
    of w8a8_kernel. Same result as int8_matmul(x, ..., outlier_mask=|x| > threshold in some token)."""
    _check_int8_weight(x, w_q)
    x2 = x.reshape(-1, x.shape[-1])
    prologue = outlier_split(x2, threshold, counters)
    return _w8a8(x2, w_q.contiguous(), w_scale, torch.int8, config=config, name="int8", prologue=prologue) \
        .reshape(*x.shape[:-1], w_q.shape[0])


def fp8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """FP8 W8A8: e4m3/e5m2 weight with per-tensor or per-channel scale, per-token e4m3 activations."""
    if w_q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or w_q.shape[1] != x.shape[-1]:
        raise ValueError(f"fp8 weight must be float8 [N, {x.shape[-1]}], got {w_q.dtype} {tuple(w_q.shape)}")
    return _w8a8(x, w_q.contiguous(), w_scale, torch.float8_e4m3fn, config=config, name="fp8")
