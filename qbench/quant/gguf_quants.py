"""GGML block formats, one class per type: its block layout, quantizer (numpy float32) and fields (torch).

The quantizers follow ggml's reference C quantizers (`quantize_row_<type>_ref` in ggml-quants.c, the
path llama.cpp's quantize takes without an importance matrix) operation by operation in float32
(qbench/quant/ggml_math.py: same rounding, same left-to-right sums, same search loops), so the bytes are
identical to llama.cpp's (tests/test_gguf_llamacpp.py). Loops run over the elements of a block,
vectorized over all blocks of a tensor at once.

With an importance matrix (imatrix[j]: the mean squared input activation of column j, qbench/quant/imatrix.py)
each type follows ggml's `quantize_<type>` with quant_weights instead (tests/test_gguf_imatrix.py), with
the element weights ggml uses there, w_j = imatrix[j] * sqrt(sigma2 + x_j^2):
- Q4_0/Q5_0: make_qx_quants (weighted symmetric fit), sigma2 = mean x^2 of the whole row;
- Q4_1/Q5_1: make_qkx3_quants (weighted asymmetric search), the same sigma2;
- Q2_K: make_qkx3_quants per 16, sigma2 = mean x^2 of the super-block; the 4-bit sub-scales and mins by
  make_qp_quants weighted by each sub-block's sum of w;
- Q3_K: make_qx_quants per 16, sigma2 = 2 * mean x^2 of the super-block; the 6-bit scales by make_qx_quants
  weighted by the sub-block sums of w;
- Q4_K/Q5_K: make_qkx3_quants per 32, sigma2 = 2 * mean x^2 of the super-block; the 6-bit scales and mins by
  make_qp_quants weighted by the sub-block sums of w;
- Q6_K: make_qx_quants per 16 weighted by imatrix[j] alone (ggml's sigma2 term is commented out there);
- Q8_0: ignores it (ggml does).

Storage layout (exactly as in a GGUF file; GGUFLinear stores it and the Triton kernels read it):
    qweight: uint8 [out_features, (in_features // block_elems) * block_bytes]
Row r of the weight is a run of blocks; block b covers input columns [b*block_elems, (b+1)*block_elems).
All multi-byte fields are little endian; d/dmin/m are float16; "nibble" = low 4 bits first. Each
type's docstring gives its block's bytes; K-quants are super-blocks of 256 elements, e = the element's
index in the super-block.

Every type is also integer codes with a per-group scale, an integer zero and a per-group min:

    W[n, k] = scales[n, g] * (codes[n, k] - zero) - mins[n, g]      g = k // group

computed in float32 with ggml's dequantizers' operations (`dequantize`; equal to gguf-py's,
tests/test_gguf_quants.py): a type's `fields` only take its block apart, never round. The same form is
what the integer decode kernels (kernels/wint_h2.py) multiply from, so a GGUF weight is repacked into
their layout (qbench/quant/gguf_linear.py) instead of being decoded from bytes element by element.

| type | bits of the codes | group | zero | scale | min |
| --- | --- | --- | --- | --- | --- |
| Q4_0 | 4 | 32 | 8 | d | - |
| Q4_1 | 4 | 32 | 0 | d | -m |
| Q5_0 | 5 | 32 | 16 | d | - |
| Q5_1 | 5 | 32 | 0 | d | -m |
| Q8_0 | 8 (q + 128) | 32 | 128 | d | - |
| Q2_K | 2 | 16 | 0 | d * (sc & 15) | dmin * (sc >> 4) |
| Q3_K | 3 (q + 4) | 16 | 4 | d * (sc - 32) | - |
| Q4_K | 4 | 32 | 0 | d * sc | dmin * m |
| Q5_K | 5 | 32 | 0 | d * sc | dmin * m |
| Q6_K | 6 | 16 | 32 | d * sc | - |
"""

import functools
from dataclasses import dataclass

import numpy as np

import torch

from qbench.quant.ggml_math import (F32, GROUP_MAX_EPS, absmax_value, f16, f16_bytes, inv, make_q3_quants,
                                    make_qkx2_quants, make_qkx3_quants, make_qp_quants, make_qx_quants, nearest_int,
                                    seqsum)


class BlockType:
    """A GGML type. Subclasses set the class attributes and the two methods; TYPES holds one of each."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_elems: int
    block_bytes: int
    bits: int  # of the integer form's codes
    zero: int  # the integer form's zero

    def quantize_blocks(self, x: np.ndarray, qw: np.ndarray | None = None, row_sigma2: np.ndarray | None = None) -> np.ndarray:
        """float32 [n, block_elems] -> uint8 [n, block_bytes], as ggml's reference quantizer; with qw (the
        importance matrix's value of each element's column, [n, block_elems]) as ggml's quantize_<type>
        with quant_weights. row_sigma2 [n, 1]: the mean x^2 of each block's whole row (the 32-element
        types weigh by it; the K-quants by their super-block's own)."""
        raise NotImplementedError

    def fields(self, b: torch.Tensor) -> tuple:
        """uint8 [n, block_bytes] -> (codes [n, block_elems], scales float32 [n, groups], mins float32
        [n, groups] or None): the integer form of each block."""
        raise NotImplementedError


# ---------------------------------------------------------------- byte packing (numpy) and fields (torch)

def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes -> [n, 16] bytes: code j in the low nibble of byte j, code j+16 in the high one."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """bit 4 of each of the 32 codes -> 4 bytes (a little-endian uint32, code j at bit j)."""
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


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


def _legacy_codes(b: torch.Tensor, qs: int, high: int | None) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_0/Q5_1: the 32 codes of the nibbles at byte qs (| bit 4 from the uint32 at byte high)."""
    q = _nibbles(b[:, qs:qs + 16])
    if high is not None:
        q = q | (_bits32(b[:, high:high + 4]) << 4)
    return q


def _legacy_weights(x, qw, row_sigma2):
    """ggml's element weights of the 32-element types: qw * sqrt(sigma2 + x^2), sigma2 of the whole row."""
    return np.ascontiguousarray((qw * np.sqrt(row_sigma2 + x * x)).T)


def _weighted_symmetric(x, qw, row_sigma2, nmax):
    """Q4_0/Q5_0 with an importance matrix: (d [n, 1], codes [n, 32]) of the weighted make_qx_quants."""
    d, L = make_qx_quants(np.ascontiguousarray(x.T), nmax, _legacy_weights(x, qw, row_sigma2))
    return d[:, None], L.T


def _weighted_asymmetric(x, qw, row_sigma2, nmax):
    """Q4_1/Q5_1 with an importance matrix: (d, m = -min, codes) of make_qkx3_quants."""
    d, the_min, L = make_qkx3_quants(np.ascontiguousarray(x.T), _legacy_weights(x, qw, row_sigma2), nmax)
    return d[:, None], -the_min[:, None], L.T


# ---------------------------------------------------------------- 32-element block formats

class Q4_0(BlockType):
    """32 el, 18 B: d | qs[16]; q_j = nibble j of qs (j<16: low of qs[j], else high of qs[j-16]); w = d*(q-8)."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q4_0", 2, 32, 18, 4, 8

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        if qw is not None:
            d, L = _weighted_symmetric(x, qw, row_sigma2, 8)
            return np.concatenate([f16_bytes(d), _pack_nibbles(L)], axis=1)
        d = absmax_value(x)[:, None] / F32(-8)
        q = np.minimum(15, np.trunc(x * inv(d) + F32(8.5)).astype(np.int32))
        return np.concatenate([f16_bytes(d), _pack_nibbles(q)], axis=1)

    def fields(self, b):
        return _legacy_codes(b, 2, None), _half(b[:, 0:2]), None


class Q4_1(BlockType):
    """32 el, 20 B: d | m | qs[16]; codes as Q4_0; w = d*q + m."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q4_1", 3, 32, 20, 4, 0

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        if qw is not None:
            d, m, L = _weighted_asymmetric(x, qw, row_sigma2, 15)
            return np.concatenate([f16_bytes(d), f16_bytes(m), _pack_nibbles(L)], axis=1)
        mn, mx = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (mx - mn) / F32(15)
        q = np.minimum(15, np.trunc((x - mn) * inv(d) + F32(0.5)).astype(np.int32))
        return np.concatenate([f16_bytes(d), f16_bytes(mn), _pack_nibbles(q)], axis=1)

    def fields(self, b):
        return _legacy_codes(b, 4, None), _half(b[:, 0:2]), -_half(b[:, 2:4])


class Q5_0(BlockType):
    """32 el, 22 B: d | qh[4] | qs[16]; q_j = nibble j | bit j of qh (uint32) << 4; w = d*(q-16)."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q5_0", 6, 32, 22, 5, 16

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        if qw is not None:
            d, L = _weighted_symmetric(x, qw, row_sigma2, 16)
            return np.concatenate([f16_bytes(d), _high_bits(L), _pack_nibbles(L & 15)], axis=1)
        d = absmax_value(x)[:, None] / F32(-16)
        q = np.minimum(31, np.trunc(x * inv(d) + F32(16.5)).astype(np.int32))
        return np.concatenate([f16_bytes(d), _high_bits(q), _pack_nibbles(q & 15)], axis=1)

    def fields(self, b):
        return _legacy_codes(b, 6, 2), _half(b[:, 0:2]), None


class Q5_1(BlockType):
    """32 el, 24 B: d | m | qh[4] | qs[16]; codes as Q5_0; w = d*q + m."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q5_1", 7, 32, 24, 5, 0

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        if qw is not None:
            d, m, L = _weighted_asymmetric(x, qw, row_sigma2, 31)
            return np.concatenate([f16_bytes(d), f16_bytes(m), _high_bits(L), _pack_nibbles(L & 15)], axis=1)
        mn, mx = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        d = (mx - mn) / F32(31)
        q = np.trunc((x - mn) * inv(d) + F32(0.5)).astype(np.int32) & 0xFF
        return np.concatenate([f16_bytes(d), f16_bytes(mn), _high_bits(q), _pack_nibbles(q & 15)], axis=1)

    def fields(self, b):
        return _legacy_codes(b, 8, 4), _half(b[:, 0:2]), -_half(b[:, 2:4])


class Q8_0(BlockType):
    """32 el, 34 B: d | qs[32] int8; w = d*q (integer form: codes q + 128, zero 128)."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q8_0", 8, 32, 34, 8, 128

    def quantize_blocks(self, x, qw=None, row_sigma2=None):  # ggml's quantize_q8_0 ignores quant_weights
        d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
        v = (x * inv(d)).astype(np.float64)
        q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # roundf: half away from zero (exact in float64)
        return np.concatenate([f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)

    def fields(self, b):
        q = (b[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return q, _half(b[:, 0:2]), None


# ---------------------------------------------------------------- K-quant helpers (ggml's second pass, packing)

def _sub_blocks(x, size):
    """[N, 256] super-blocks -> [size, N*256/size] (element i of every sub-block on row i)."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _symmetric_sub16(x, search, nmax, weights=None):
    """Q3_K/Q6_K: ([n, 16, 16] sub-blocks of x, scales [n, 16], codes L [n, 16, 16]) of ggml's symmetric
    search `search` (make_q3_quants or make_qx_quants) over the 16-element sub-blocks (weighted by the
    [size, n*16] `weights` when given)."""
    n = x.shape[0]
    scales, L = search(_sub_blocks(x, 16), nmax) if weights is None else search(_sub_blocks(x, 16), nmax, weights)
    return x.reshape(n, 16, 16), scales.reshape(n, 16), L.T.reshape(n, 16, 16)


def _super_weights(x, qw, size, factor):
    """ggml's K-quant element weights qw * sqrt(sigma2 + x^2), sigma2 = factor * mean x^2 of the super-block,
    as [size, n*256/size] sub-block columns (_sub_blocks), and each sub-block's sum of them [n, 256/size]."""
    sigma2 = F32(factor) * seqsum(np.ascontiguousarray((x * x).T)) / F32(256)
    xt = _sub_blocks(x, size)
    w = _sub_blocks(qw, size) * np.sqrt(np.repeat(sigma2, 256 // size)[None, :] + xt * xt)
    return w, seqsum(w).reshape(x.shape[0], 256 // size)


def _requantize(x, d, L, lo, hi, offset=0, dm=None):
    """ggml's second pass: codes from the stored (float16 x integer) scales; sub-blocks with d == 0 keep L."""
    with np.errstate(all="ignore"):
        v = x if dm is None else x + dm[..., None]
        new = np.clip(nearest_int(v / d[..., None]), lo, hi) + offset
    return np.where((d != 0)[..., None], new, L)


def _crumbs(L):
    """[n, 256] 2-bit codes -> [n, 64] bytes: byte 32h+l holds codes 128h+l+32k at bits 2k."""
    L = L.reshape(-1, 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64).astype(np.uint8)


def _crumbs_out(qs):
    """[n, 64] bytes -> [n, 256] 2-bit codes (inverse of _crumbs)."""
    n = qs.shape[0]
    return ((qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=qs.device).view(1, 1, 4, 1)) & 3).reshape(n, 256)


def _k4_scales(ls, lm):
    """8 six-bit scales and mins -> ggml's 12-byte packing (inverse of get_scale_min_k4)."""
    s = np.zeros((ls.shape[0], 12), dtype=np.int32)
    s[:, 0:4], s[:, 4:8] = ls[:, :4], lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return s.astype(np.uint8)


def _k4_unpack(s):
    """ggml's get_scale_min_k4 for all 8 sub-blocks: [n, 12] -> (scale, min) as [n, 8] float32."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _kx_super(x, nsub, nmax, rmin, rdelta, nstep, qw=None):
    """Q4_K/Q5_K: per-32 (scale, min) by make_qkx2_quants, then 6-bit scales under float16 super scales
    (with an importance matrix qw: make_qkx3_quants, then make_qp_quants for the 6-bit scales)."""
    n = x.shape[0]
    xs = x.reshape(n, nsub, 32)
    xt = _sub_blocks(x, 32)
    if qw is not None:
        w, sw = _super_weights(x, qw, 32, 2)
        scales, mins, L = make_qkx3_quants(xt, w, nmax)
        scales, mins, L = scales.reshape(n, nsub), mins.reshape(n, nsub), L.T.reshape(n, nsub, 32)
        d_block, ls = make_qp_quants(np.ascontiguousarray(scales.T), 63, np.ascontiguousarray(sw.T))
        m_block, lm = make_qp_quants(np.ascontiguousarray(mins.T), 63, np.ascontiguousarray(sw.T))
        return _kx_pack(xs, L, nmax, f16(d_block), f16(m_block), ls.T, lm.T)
    w = np.sqrt(seqsum(xt * xt) / F32(32)) + np.abs(xt)
    scales, mins, L = make_qkx2_quants(xt, w, nmax, rmin, rdelta, nstep, False)
    scales, mins, L = scales.reshape(n, nsub), mins.reshape(n, nsub), L.T.reshape(n, nsub, 32)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
    return _kx_pack(xs, L, nmax, f16(max_scale / F32(63)), f16(max_min / F32(63)), ls, lm)


def _kx_pack(xs, L, nmax, d, dmin, ls, lm):
    """Q4_K/Q5_K's second pass and head: codes from the stored scales, then d | dmin | 12 scale bytes."""
    sd = d.astype(F32)[:, None] * ls.astype(F32)
    sm = dmin.astype(F32)[:, None] * lm.astype(F32)
    L = _requantize(xs, sd, L, 0, nmax, dm=sm)
    head = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), _k4_scales(ls, lm)], axis=1)
    return head, L


def _k4_low_codes(qs):
    """[n, 128] bytes -> [n, 8, 32] low 4-bit codes of Q4_K/Q5_K."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _shifts(0, 4, device=qs.device).view(1, 1, 2, 1)) & 15).reshape(n, 8, 32)


# ---------------------------------------------------------------- K-quants: super-blocks of 256 elements

class Q2_K(BlockType):
    """84 B: scales[16] | qs[64] | d | dmin;
    q = (qs[32*(e//128) + e%32] >> 2*((e//32)%4)) & 3; sc = scales[e//16]; w = d*(sc&15)*q - dmin*(sc>>4)."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q2_K", 10, 256, 84, 2, 0

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        n = x.shape[0]
        xs = x.reshape(n, 16, 16)
        xt = _sub_blocks(x, 16)
        if qw is not None:
            w, sw = _super_weights(x, qw, 16, 1)
            scales, mins, L = make_qkx3_quants(xt, w, 3)
            scales, mins, L = scales.reshape(n, 16), mins.reshape(n, 16), L.T.reshape(n, 16, 16)
            dm, ls = make_qp_quants(np.ascontiguousarray(scales.T), 15, np.ascontiguousarray(sw.T))
            mm, lm = make_qp_quants(np.ascontiguousarray(mins.T), 15, np.ascontiguousarray(sw.T))
            packed, d, dmin = (ls.T | (lm.T << 4)) & 0xFF, f16(dm), f16(mm)
        else:
            scales, mins, L = make_qkx2_quants(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
            scales, mins, L = scales.reshape(n, 16), mins.reshape(n, 16), L.T.reshape(n, 16, 16)
            max_scale = np.maximum(scales.max(axis=1), F32(0))
            max_min = np.maximum(mins.max(axis=1), F32(0))
            with np.errstate(all="ignore"):
                ls = np.where(max_scale[:, None] > 0, nearest_int((F32(15) / max_scale)[:, None] * scales), 0)
                lm = np.where(max_min[:, None] > 0, nearest_int((F32(15) / max_min)[:, None] * mins), 0)
            packed = (ls | (lm << 4)) & 0xFF
            d = np.where(max_scale > 0, f16(max_scale / F32(15)), np.float16(0))
            dmin = np.where(max_min > 0, f16(max_min / F32(15)), np.float16(0))
        sd = d.astype(F32)[:, None] * (packed & 15).astype(F32)
        sm = dmin.astype(F32)[:, None] * (packed >> 4).astype(F32)
        L = _requantize(xs, sd, L, 0, 3, dm=sm)
        return np.concatenate([packed.astype(np.uint8), _crumbs(L.reshape(n, 256)),
                               d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8)], axis=1)

    def fields(self, b):
        sc = b[:, 0:16]
        d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
        return _crumbs_out(b[:, 16:80]), d * (sc & 15).float(), dmin * (sc >> 4).float()


class Q3_K(BlockType):
    """110 B: hmask[32] | qs[64] | scales[12] | d; low 2 bits as Q2_K; q = low - (0 if hmask[e%32] bit (e//32)
    else 4); 16 6-bit scales s (s_j = low nibble of scales[j%8] (high nibble for j>=8) | bits 2*(j//4) of
    scales[8+j%4] << 4); w = d*(s_{e//16}-32)*q (integer form: codes q + 4, zero 4)."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q3_K", 11, 256, 110, 3, 4

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        n = x.shape[0]
        if qw is not None:
            w, sw = _super_weights(x, qw, 16, 2)
            xs, scales, L = _symmetric_sub16(x, make_qx_quants, 4, w)
            d_block, l = make_qx_quants(np.ascontiguousarray(scales.T), 32, np.ascontiguousarray(sw.T))
            d, l = f16(d_block), l.T
        else:
            xs, scales, L = _symmetric_sub16(x, make_q3_quants, 4)
            max_scale = absmax_value(scales)
            with np.errstate(all="ignore"):
                iscale = F32(-32) / max_scale
                l8 = ((nearest_int(iscale[:, None] * scales) + 128) & 0xFF) - 128  # stored in an int8_t
                d = f16(F32(1) / iscale)
            l = np.where((max_scale != 0)[:, None], np.clip(l8, -32, 31) + 32, 0)
            d = np.where(max_scale != 0, d, np.float16(0))
        s = np.zeros((n, 12), dtype=np.int32)
        s[:, :8] = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
        for j in range(16):
            s[:, 8 + j % 4] |= (l[:, j] >> 4) << (2 * (j // 4))
        sd = d.astype(F32)[:, None] * (l - 32).astype(F32)
        L = _requantize(xs, sd, L, -4, 3, offset=4).reshape(n, 256)
        hmask = np.zeros((n, 32), dtype=np.int32)
        for blk in range(8):
            hmask |= (L[:, 32 * blk : 32 * blk + 32] > 3).astype(np.int32) << blk
        L = np.where(L > 3, L - 4, L)
        return np.concatenate([hmask.astype(np.uint8), _crumbs(L), s.astype(np.uint8), d.reshape(-1, 1).view(np.uint8)],
                              axis=1)

    def fields(self, b):
        n = b.shape[0]
        hmask, s, d = b[:, 0:32], b[:, 96:108], _half(b[:, 108:110])
        low = _crumbs_out(b[:, 32:96]).reshape(n, 8, 32)
        high = (hmask[:, None, :] >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1
        q = (low + 4 * high).reshape(n, 256)  # (low - 4 (1 - high)) + 4
        lo = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)
        hi = (s[:, 8:12].repeat(1, 4) >> _shifts(*[2 * (j // 4) for j in range(16)], device=b.device)) & 3
        return q, d * ((lo | (hi << 4)).float() - 32), None


class Q4_K(BlockType):
    """144 B: d | dmin | scales[12] | qs[128]; q = (qs[32*(e//64) + e%32] >> 4*((e//32)%2)) & 15; 8 6-bit
    (scale, min) pairs for e//32 packed as ggml's get_scale_min_k4; w = d*sc*q - dmin*m."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q4_K", 12, 256, 144, 4, 0

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        head, L = _kx_super(x, 8, 15, -1.0, 0.1, 20, qw)
        qs = (L[:, 0::2] | (L[:, 1::2] << 4)).reshape(-1, 128).astype(np.uint8)
        return np.concatenate([head, qs], axis=1)

    def fields(self, b):
        sc, mn = _k4_unpack(b[:, 4:16])
        q = _k4_low_codes(b[:, 16:144])
        return q.reshape(b.shape[0], 256), _half(b[:, 0:2]) * sc, _half(b[:, 2:4]) * mn


class Q5_K(BlockType):
    """176 B: d | dmin | scales[12] | qh[32] | qs[128]; q = Q4_K's q | bit (e//32) of qh[e%32] << 4;
    w = d*sc*q - dmin*m."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q5_K", 13, 256, 176, 5, 0

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        head, L = _kx_super(x, 8, 31, -0.5, 0.1, 15, qw)
        qh = np.zeros((x.shape[0], 32), dtype=np.int32)
        for s in range(8):
            qh |= (L[:, s] >> 4) << s
        low = L & 15
        qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128).astype(np.uint8)
        return np.concatenate([head, qh.astype(np.uint8), qs], axis=1)

    def fields(self, b):
        sc, mn = _k4_unpack(b[:, 4:16])
        q = _k4_low_codes(b[:, 48:176])
        q = q | (((b[:, None, 16:48] >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1) << 4)
        return q.reshape(b.shape[0], 256), _half(b[:, 0:2]) * sc, _half(b[:, 2:4]) * mn


class Q6_K(BlockType):
    """210 B: ql[128] | qh[64] | scales[16] int8 | d;
    q = (nibble of ql[64*(e//128) + e%64], high nibble when (e%128) >= 64) | ((qh[32*(e//128) + e%32] >>
    2*((e%128)//32)) & 3) << 4; w = d*scales[e//16]*(q-32)."""

    name, ggml_type, block_elems, block_bytes, bits, zero = "Q6_K", 14, 256, 210, 6, 32

    def quantize_blocks(self, x, qw=None, row_sigma2=None):
        n = x.shape[0]
        xs, scales, L = _symmetric_sub16(x, make_qx_quants, 32, None if qw is None else _sub_blocks(qw, 16))
        max_scale = absmax_value(scales)
        zero = np.abs(max_scale) < GROUP_MAX_EPS
        with np.errstate(all="ignore"):
            iscale = F32(-128) / max_scale
            d = f16(F32(1) / iscale)
            sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
        sc = ((sc + 128) & 0xFF) - 128  # int8_t
        L = _requantize(xs, d.astype(F32)[:, None] * sc.astype(F32), L, -32, 31, offset=32).reshape(n, 2, 4, 32)
        ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)],
                            axis=2)
        qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        out = np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                              sc.astype(np.int8).view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1)
        out[zero] = 0
        return out

    def fields(self, b):
        n = b.shape[0]
        ql = (b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, device=b.device).view(1, 1, 2, 1)) & 15
        qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)) & 3
        q = ql.reshape(n, 256) | (qh.reshape(n, 256) << 4)
        return q, _half(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float(), None


TYPES = {t.name: t for t in (Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q8_0(), Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())}


# ---------------------------------------------------------------- whole tensors

def row_bytes(qtype: str, n: int) -> int:
    t = TYPES[qtype]
    if n % t.block_elems:
        raise ValueError(f"{qtype} needs rows that are a multiple of {t.block_elems}, got {n}")
    return n // t.block_elems * t.block_bytes


def quantize(weight, qtype: str, imatrix=None, chunk_blocks: int = 1 << 15) -> torch.Tensor:
    """[rows, cols] float weight -> uint8 [rows, row_bytes(qtype, cols)], the GGUF bytes of each row;
    imatrix: [cols] importance of each input column (ggml's quant_weights), or None (the reference path)."""
    t = TYPES[qtype]
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, dtype=F32)
    rows, cols = w.shape
    nbytes = row_bytes(qtype, cols)
    w = np.ascontiguousarray(w, dtype=F32)
    blocks = w.reshape(-1, t.block_elems)
    out = np.empty((blocks.shape[0], t.block_bytes), dtype=np.uint8)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=F32).reshape(-1)
        if imatrix.size != cols:
            raise ValueError(f"an importance matrix of {imatrix.size} values for rows of {cols}")
        per_row = cols // t.block_elems
        qw = imatrix.reshape(per_row, t.block_elems)
        # ggml's sum_x2 / n_per_row of the 32-element types: a left-to-right float32 sum over the row
        sigma2 = seqsum(np.ascontiguousarray((w * w).T)) / F32(cols)
        chunk_blocks = max(per_row, chunk_blocks // per_row * per_row)  # chunks of whole rows
    for start in range(0, blocks.shape[0], chunk_blocks):
        part = blocks[start : start + chunk_blocks]
        if imatrix is None:
            out[start : start + chunk_blocks] = t.quantize_blocks(part)
        else:
            first, count = start // per_row, part.shape[0] // per_row
            qw_part = np.tile(qw, (count, 1))
            row_sigma2 = np.repeat(sigma2[first : first + count], per_row)[:, None]
            out[start : start + chunk_blocks] = t.quantize_blocks(part, qw_part, row_sigma2)
    return torch.from_numpy(out.reshape(rows, nbytes))


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


def integer_form(raw: torch.Tensor, qtype: str, cols: int) -> IntegerForm:
    """uint8 [rows, row_bytes] GGUF rows -> their IntegerForm (on raw's device)."""
    t = TYPES[qtype]
    rows = raw.shape[0]
    q, scales, mins = t.fields(raw.reshape(-1, t.block_bytes))
    groups = scales.shape[1]  # per block
    group = t.block_elems // groups
    scales = scales.reshape(rows, cols // group)
    mins = None if mins is None else mins.reshape(rows, cols // group)
    return IntegerForm(q.to(torch.uint8).reshape(rows, cols), scales, mins, t.zero, group, t.bits)


def dequantize(raw: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] GGUF rows -> float32 [rows, cols] (on raw's device): the integer form's
    float32 formula, equal to gguf-py's dequantizer (tests/test_gguf_quants.py)."""
    return integer_form(raw, qtype, cols).dequantize()
