"""GGML block formats: our quantizers (numpy float32) and dequantizers (torch, any device).

The quantizers follow ggml's reference C quantizers (`quantize_row_<type>_ref` in ggml-quants.c, the
path llama.cpp's quantize takes without an importance matrix) operation by operation in float32:
same rounding (`nearest_int`'s magic-number trick, `roundf`, truncating casts), same left-to-right
sums, same search loops. So the bytes are identical to llama.cpp's (tests/test_gguf_llamacpp.py).
Loops run over the elements of a block, vectorized over all blocks of a tensor at once.

Storage layout (exactly as in a GGUF file; GGUFLinear stores it and the Triton kernels read it):
    qweight: uint8 [out_features, (in_features // block_elems) * block_bytes]
Row r of the weight is a run of blocks; block b covers input columns [b*block_elems, (b+1)*block_elems).
All multi-byte fields are little endian; d/dmin/m are float16; "nibble" = low 4 bits first.

  Q4_0  32 el, 18 B: d | qs[16]            q_j = nibble j of qs (j<16: low of qs[j], else high of qs[j-16]); w = d*(q-8)
  Q4_1  32 el, 20 B: d | m | qs[16]        as Q4_0; w = d*q + m
  Q5_0  32 el, 22 B: d | qh[4] | qs[16]    q_j = nibble j | bit j of qh (uint32) << 4; w = d*(q-16)
  Q5_1  32 el, 24 B: d | m | qh[4] | qs[16]  w = d*q + m
  Q8_0  32 el, 34 B: d | qs[32] int8       w = d*q
  Super-blocks of 256 elements (K-quants); e = element index in the super-block:
  Q2_K  84 B: scales[16] | qs[64] | d | dmin
        q = (qs[32*(e//128) + e%32] >> 2*((e//32)%4)) & 3; sc = scales[e//16]; w = d*(sc&15)*q - dmin*(sc>>4)
  Q3_K  110 B: hmask[32] | qs[64] | scales[12] | d
        low 2 bits as Q2_K; q = low - (0 if hmask[e%32] bit (e//32) else 4); 16 6-bit scales s
        (s_j = low nibble of scales[j%8] (high nibble for j>=8) | bits 2*(j//4) of scales[8+j%4] << 4); w = d*(s_{e//16}-32)*q
  Q4_K  144 B: d | dmin | scales[12] | qs[128]
        q = (qs[32*(e//64) + e%32] >> 4*((e//32)%2)) & 15; 8 6-bit (scale, min) pairs for e//32 packed as
        ggml's get_scale_min_k4; w = d*sc*q - dmin*m
  Q5_K  176 B: d | dmin | scales[12] | qh[32] | qs[128]   q = Q4_K's q | bit (e//32) of qh[e%32] << 4
  Q6_K  210 B: ql[128] | qh[64] | scales[16] int8 | d
        q = (nibble of ql[64*(e//128) + e%64], high nibble when (e%128) >= 64) | ((qh[32*(e//128) + e%32] >> 2*((e%128)//32)) & 3) << 4;
        w = d*scales[e//16]*(q-32)
"""

import functools
from dataclasses import dataclass

import numpy as np

import torch

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
QK_K = 256


@dataclass(frozen=True)
class BlockType:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_elems: int
    block_bytes: int


TYPES = {t.name: t for t in [
    BlockType("Q4_0", 2, 32, 18), BlockType("Q4_1", 3, 32, 20), BlockType("Q5_0", 6, 32, 22),
    BlockType("Q5_1", 7, 32, 24), BlockType("Q8_0", 8, 32, 34), BlockType("Q2_K", 10, 256, 84),
    BlockType("Q3_K", 11, 256, 110), BlockType("Q4_K", 12, 256, 144), BlockType("Q5_K", 13, 256, 176),
    BlockType("Q6_K", 14, 256, 210),
]}


def row_bytes(qtype: str, n: int) -> int:
    t = TYPES[qtype]
    if n % t.block_elems:
        raise ValueError(f"{qtype} needs rows that are a multiple of {t.block_elems}, got {n}")
    return n // t.block_elems * t.block_bytes


# ---------------------------------------------------------------- float32 helpers (as the C code computes)

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 v + 1.5*2**23, low mantissa bits; bit for bit, also out of range."""
    with np.errstate(all="ignore"):
        bits = (np.asarray(v, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 (a C `for` loop; np.sum may sum pairwise)."""
    total = a[0].astype(F32, copy=True)
    for row in a[1:]:
        total += row
    return total


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return _f16(v).reshape(-1, 1).view(np.uint8)


def _absmax_value(x: np.ndarray) -> np.ndarray:
    """The value with the largest |x| over the last axis, first one on ties (C: `if (ax > amax)`)."""
    idx = np.argmax(np.abs(x), axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes -> [n, 16] bytes: code j in the low nibble of byte j, code j+16 in the high one."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


# ---------------------------------------------------------------- 32-element block formats

def _q4_0(x):
    d = _absmax_value(x)[:, None] / F32(-8)
    q = np.minimum(15, np.trunc(x * _inv(d) + F32(8.5)).astype(np.int32))
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def _q4_1(x):
    mn, mx = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (mx - mn) / F32(15)
    q = np.minimum(15, np.trunc((x - mn) * _inv(d) + F32(0.5)).astype(np.int32))
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], axis=1)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """bit 4 of each of the 32 codes -> 4 bytes (a little-endian uint32, code j at bit j)."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


def _q5_0(x):
    d = _absmax_value(x)[:, None] / F32(-16)
    q = np.minimum(31, np.trunc(x * _inv(d) + F32(16.5)).astype(np.int32))
    return np.concatenate([_f16_bytes(d), _high_bits(q), _pack_nibbles(q & 15)], axis=1)


def _q5_1(x):
    mn, mx = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (mx - mn) / F32(31)
    q = np.trunc((x - mn) * _inv(d) + F32(0.5)).astype(np.int32) & 0xFF
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _high_bits(q), _pack_nibbles(q & 15)], axis=1)


def _q8_0(x):
    d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
    v = (x * _inv(d)).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # roundf: half away from zero (exact in float64)
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


# ---------------------------------------------------------------- K-quant helpers (ggml's make_*_quants)

def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """Scale and min of asymmetric sub-blocks by a search over scales; returns (scale, -min, L).

    x, w: [n, M], element i of sub-block m at [i, m] (sums over axis 0 then run contiguously)."""
    with np.errstate(all="ignore"):
        mn = np.minimum(x.min(axis=0), F32(0))
        mx = x.max(axis=0)
        flat, flat_min = mx == mn, -mn
        sum_w, sum_x = _seqsum(w), _seqsum(w * x)

        def error(scale, mn, L):
            diff = scale * L + mn - x
            return _seqsum(w * (np.abs(diff) if use_mad else diff * diff))

        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
        best = error(scale, mn, L)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            Laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
            wl = w * Laux  # C: w*l*l and w*l*x[i] are (w*l)*l and (w*l)*x[i]
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * Laux), _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, Laux)
            better = (D > 0) & (cur < best)
            L = np.where(better, Laux, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    return (np.where(flat, F32(0), scale).astype(F32), np.where(flat, flat_min, -mn).astype(F32),
            np.where(flat, 0, L).astype(np.int32))


def _make_qx_quants(x, nmax):
    """Symmetric sub-blocks (rmse_type=1, no importance weights), x: [n, M]; returns (scale, L in [0, 2*nmax))."""
    with np.errstate(all="ignore"):
        mx = _absmax_value(x.T)
        zero = np.abs(mx) < GROUP_MAX_EPS
        w = x * x

        def levels(iscale):
            l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
            return l, _seqsum(w * x * l), _seqsum(w * l * l)

        l, sumlx, suml2 = levels(F32(-nmax) / mx)
        L = l + F32(nmax)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = levels(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l + F32(nmax), L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, 0, L).astype(np.int32)


def _make_q3_quants(x, nmax):
    """Symmetric 3-bit sub-blocks with ggml's coordinate-descent refinement, x: [n, M]; returns (scale, L in [0, 2*nmax))."""
    with np.errstate(all="ignore"):
        mx = _absmax_value(x.T)
        zero = np.abs(mx) < GROUP_MAX_EPS
        w = x * x
        L = np.clip(_nearest_int((F32(-nmax) / mx) * x), -nmax, nmax - 1).astype(F32)
        sumlx, suml2 = _seqsum(w * x * L), _seqsum(w * L * L)
        for _ in range(5):  # a pass that changes nothing is a fixed point, so no early exit is needed
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(F32)
                slx2 = slx + wi * xi * new_l
                sl2_2 = sl2 + wi * new_l * new_l
                take = (slx > 0) & (new_l != li) & (sl2_2 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2_2)
                L[i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl2_2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, 0, L + F32(nmax)).astype(np.int32)


def _sub_blocks(x, size):
    """[N, 256] super-blocks -> [size, N*256/size] (element i of every sub-block on row i)."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _requantize(x, d, L, lo, hi, offset=0, dm=None):
    """ggml's second pass: codes from the stored (float16 x integer) scales; sub-blocks with d == 0 keep L."""
    with np.errstate(all="ignore"):
        v = x if dm is None else x + dm[..., None]
        new = np.clip(_nearest_int(v / d[..., None]), lo, hi) + offset
    return np.where((d != 0)[..., None], new, L)


def _crumbs(L):
    """[n, 256] 2-bit codes -> [n, 64] bytes: byte 32h+l holds codes 128h+l+32k at bits 2k."""
    L = L.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64).astype(np.uint8)


def _k4_scales(ls, lm):
    """8 six-bit scales and mins -> ggml's 12-byte packing (inverse of get_scale_min_k4)."""
    s = np.zeros((ls.shape[0], 12), dtype=np.int32)
    s[:, 0:4], s[:, 4:8] = ls[:, :4], lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return s.astype(np.uint8)


def _kx_super(x, nsub, nmax, rmin, rdelta, nstep):
    """Q4_K/Q5_K: per-32 (scale, min) by make_qkx2_quants, then 6-bit scales under float16 super scales."""
    n = x.shape[0]
    xs = x.reshape(n, nsub, 32)
    xt = _sub_blocks(x, 32)
    w = np.sqrt(_seqsum(xt * xt) / F32(32)) + np.abs(xt)
    scales, mins, L = _make_qkx2_quants(xt, w, nmax, rmin, rdelta, nstep, False)
    scales, mins, L = scales.reshape(n, nsub), mins.reshape(n, nsub), L.T.reshape(n, nsub, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF)
    d, dmin = _f16(max_scale / F32(63)), _f16(max_min / F32(63))
    sd = d.astype(F32)[:, None] * ls.astype(F32)
    sm = dmin.astype(F32)[:, None] * lm.astype(F32)
    L = _requantize(xs, sd, L, 0, nmax, dm=sm)
    head = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), _k4_scales(ls, lm)], axis=1)
    return head, L


def _q4_k(x):
    head, L = _kx_super(x, 8, 15, -1.0, 0.1, 20)
    qs = (L[:, 0::2] | (L[:, 1::2] << 4)).reshape(-1, 128).astype(np.uint8)
    return np.concatenate([head, qs], axis=1)


def _q5_k(x):
    head, L = _kx_super(x, 8, 31, -0.5, 0.1, 15)
    qh = np.zeros((x.shape[0], 32), dtype=np.int32)
    for s in range(8):
        qh |= (L[:, s] >> 4) << s
    low = L & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128).astype(np.uint8)
    return np.concatenate([head, qh.astype(np.uint8), qs], axis=1)


def _q2_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    xt = _sub_blocks(x, 16)
    scales, mins, L = _make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(n, 16), mins.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(all="ignore"):
        ls = np.where(max_scale[:, None] > 0, _nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, _nearest_int((F32(15) / max_min)[:, None] * mins), 0)
    packed = (ls | (lm << 4)) & 0xFF
    d = np.where(max_scale > 0, _f16(max_scale / F32(15)), np.float16(0))
    dmin = np.where(max_min > 0, _f16(max_min / F32(15)), np.float16(0))
    sd = d.astype(F32)[:, None] * (packed & 15).astype(F32)
    sm = dmin.astype(F32)[:, None] * (packed >> 4).astype(F32)
    L = _requantize(xs, sd, L, 0, 3, dm=sm)
    return np.concatenate([packed.astype(np.uint8), _crumbs(L.reshape(n, 256)),
                           d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8)], axis=1)


def _q3_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    scales, L = _make_q3_quants(_sub_blocks(x, 16), 4)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _absmax_value(scales)
    with np.errstate(all="ignore"):
        iscale = F32(-32) / max_scale
        l8 = ((_nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # stored in an int8_t
        d = _f16(F32(1) / iscale)
    l = np.where((max_scale != 0)[:, None], np.clip(l8, -32, 31) + 32, 0)
    d = np.where(max_scale != 0, d, np.float16(0))
    s = np.zeros((n, 12), dtype=np.int32)
    s[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    for j in range(16):
        s[:, 8 + j % 4] |= (l[:, j] >> 4) << (2 * (j // 4))
    sd = d.astype(F32)[:, None] * (l - 32).astype(F32)
    L = _requantize(xs, sd, L, -4, 3, offset=4).reshape(n, 256)
    hmask = np.zeros((n, 32), dtype=np.int32)
    for b in range(8):
        hmask |= (L[:, 32 * b : 32 * b + 32] > 3).astype(np.int32) << b
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask.astype(np.uint8), _crumbs(L), s.astype(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)


def _q6_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    scales, L = _make_qx_quants(_sub_blocks(x, 16), 32)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _absmax_value(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = F32(-128) / max_scale
        d = _f16(F32(1) / iscale)
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales))
    sc = ((sc + 128) & 0xFF) - 128  # int8_t
    L = _requantize(xs, d.astype(F32)[:, None] * sc.astype(F32), L, -32, 31, offset=32).reshape(n, 2, 4, 32)
    ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                          sc.astype(np.int8).view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
    out[zero] = 0
    return out


_QUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
               "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(weight, qtype: str, chunk_blocks: int = 1 << 15) -> torch.Tensor:
    """[rows, cols] float weight -> uint8 [rows, row_bytes(qtype, cols)], the GGUF bytes of each row."""
    t = TYPES[qtype]
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, dtype=F32)
    rows, cols = w.shape
    nbytes = row_bytes(qtype, cols)
    blocks = np.ascontiguousarray(w, dtype=F32).reshape(-1, t.block_elems)
    out = np.empty((blocks.shape[0], t.block_bytes), dtype=np.uint8)
    for start in range(0, blocks.shape[0], chunk_blocks):
        out[start : start + chunk_blocks] = _QUANTIZERS[qtype](blocks[start : start + chunk_blocks])
    return torch.from_numpy(out.reshape(rows, nbytes))


# ---------------------------------------------------------------- block fields (torch; runs where the bytes are)

def _half(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (float16 little endian)."""
    return b.contiguous().view(torch.float16).float()


@functools.lru_cache(maxsize=None)
def _shift_table(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _shifts(*values, device):
    """A constant uint8 tensor, made once per device and reused: making it is a host-to-device copy,
    which a CUDA graph capture (eval.speed's graph decode) refuses. Never modify it in place."""
    return _shift_table(values, torch.device(device))


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] codes: low nibbles first, then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32) -> [n, 32] bits."""
    return ((qh[:, :, None] >> _shifts(*range(8), device=qh.device)) & 1).reshape(-1, 32)


def _crumbs_out(qs):
    """[n, 64] bytes -> [n, 256] 2-bit codes (inverse of _crumbs)."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=qs.device).view(1, 1, 4, 1)) & 3).reshape(n, 256)


def _k4_unpack(s):
    """ggml's get_scale_min_k4 for all 8 sub-blocks: [n, 12] -> (scale, min) as [n, 8] float32."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _q4_k_low(qs):
    """[n, 128] bytes -> [n, 8, 32] low 4-bit codes of Q4_K/Q5_K."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _shifts(0, 4, device=qs.device).view(1, 1, 2, 1)) & 15).reshape(n, 8, 32)


# ---------------------------------------------------------------- integer form and dequantization (torch)

# Every type as integer codes with a per-group scale, an integer zero and a per-group min:
#
#     W[n, k] = scales[n, g] * (codes[n, k] - zero) - mins[n, g]      g = k // group
#
# computed in float32 with ggml's dequantizers' operations (dequantize below; equal to gguf-py's,
# tests/test_gguf_quants.py): the block fields are only taken apart, never rounded. The same form is what the
# integer decode kernels (kernels/wint_h2.py) multiply from, so a GGUF weight is repacked into their layout
# (kernels/gguf.py) instead of being decoded from bytes element by element.
#
# | type | bits of the codes | group | zero | scale | min |
# | --- | --- | --- | --- | --- | --- |
# | Q4_0 | 4 | 32 | 8 | d | - |
# | Q4_1 | 4 | 32 | 0 | d | -m |
# | Q5_0 | 5 | 32 | 16 | d | - |
# | Q5_1 | 5 | 32 | 0 | d | -m |
# | Q8_0 | 8 (q + 128) | 32 | 128 | d | - |
# | Q2_K | 2 | 16 | 0 | d * (sc & 15) | dmin * (sc >> 4) |
# | Q3_K | 3 (q + 4) | 16 | 4 | d * (sc - 32) | - |
# | Q4_K | 4 | 32 | 0 | d * sc | dmin * m |
# | Q5_K | 5 | 32 | 0 | d * sc | dmin * m |
# | Q6_K | 6 | 16 | 32 | d * sc | - |

INTEGER_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


@dataclass
class IntegerForm:
    codes: torch.Tensor  # uint8 [rows, cols], 0 <= code < 2**bits
    scales: torch.Tensor  # float32 [rows, cols // group]
    mins: torch.Tensor | None  # float32 [rows, cols // group], or None for none
    zero: int
    group: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]."""
        rows, cols = self.codes.shape
        q = (self.codes.float() - self.zero).view(rows, -1, self.group)
        w = self.scales[..., None] * q
        if self.mins is not None:
            w = w - self.mins[..., None]
        return w.reshape(rows, cols)


def _fields_legacy(b, qs: int, high: int | None, with_min: bool, zero: int):
    """Q4_0/Q4_1/Q5_0/Q5_1: d (| m) (| qh) | nibbles, one group per 32-element block."""
    q = _nibbles(b[:, qs:qs + 16])
    if high is not None:
        q = q | (_bits32(b[:, high:high + 4]) << 4)
    mins = -_half(b[:, 2:4]) if with_min else None
    return q, _half(b[:, 0:2]), mins, zero


def _fields_q8_0(b):
    q = (b[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return q, _half(b[:, 0:2]), None, 128


def _fields_q2_k(b):
    sc = b[:, 0:16]
    d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
    return _crumbs_out(b[:, 16:80]), d * (sc & 15).float(), dmin * (sc >> 4).float(), 0


def _fields_q3_k(b):
    n = b.shape[0]
    hmask, s, d = b[:, 0:32], b[:, 96:108], _half(b[:, 108:110])
    low = _crumbs_out(b[:, 32:96]).reshape(n, 8, 32)
    high = (hmask[:, None, :] >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1
    q = (low + 4 * high).reshape(n, 256)  # (low - 4 (1 - high)) + 4
    lo = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)
    hi = (s[:, 8:12].repeat(1, 4) >> _shifts(*[2 * (j // 4) for j in range(16)], device=b.device)) & 3
    return q, d * ((lo | (hi << 4)).float() - 32), None, 4


def _fields_q45_k(b, high: bool):
    n = b.shape[0]
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, mn = _k4_unpack(b[:, 4:16])
    q = _q4_k_low(b[:, 48:176] if high else b[:, 16:144])
    if high:
        q = q | (((b[:, None, 16:48] >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1) << 4)
    return q.reshape(n, 256), d * sc, dmin * mn, 0


def _fields_q6_k(b):
    n = b.shape[0]
    ql = (b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, device=b.device).view(1, 1, 2, 1)) & 15
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)) & 3
    q = ql.reshape(n, 256) | (qh.reshape(n, 256) << 4)
    return q, _half(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float(), None, 32


_FIELDS = {"Q4_0": lambda b: _fields_legacy(b, 2, None, False, 8), "Q4_1": lambda b: _fields_legacy(b, 4, None, True, 0),
           "Q5_0": lambda b: _fields_legacy(b, 6, 2, False, 16), "Q5_1": lambda b: _fields_legacy(b, 8, 4, True, 0),
           "Q8_0": _fields_q8_0, "Q2_K": _fields_q2_k, "Q3_K": _fields_q3_k, "Q4_K": lambda b: _fields_q45_k(b, False),
           "Q5_K": lambda b: _fields_q45_k(b, True), "Q6_K": _fields_q6_k}


def integer_form(raw: torch.Tensor, qtype: str, cols: int) -> IntegerForm:
    """uint8 [rows, row_bytes] GGUF rows -> their IntegerForm (on raw's device)."""
    t = TYPES[qtype]
    rows = raw.shape[0]
    q, scales, mins, zero = _FIELDS[qtype](raw.reshape(-1, t.block_bytes))
    groups = scales.shape[1]  # per block
    group = t.block_elems // groups
    scales = scales.reshape(rows, cols // group)
    mins = None if mins is None else mins.reshape(rows, cols // group)
    return IntegerForm(q.to(torch.uint8).reshape(rows, cols), scales, mins, zero, group, INTEGER_BITS[qtype])


def dequantize(raw: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] GGUF rows -> float32 [rows, cols] (on raw's device): the integer form's
    float32 formula, equal to gguf-py's dequantizer (tests/test_gguf_quants.py)."""
    return integer_form(raw, qtype, cols).dequantize()
