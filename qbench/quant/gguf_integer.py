"""Every GGML block type as integer codes with a per-group scale, an integer zero and a per-group min.

    W[n, k] = scales[n, g] * (codes[n, k] - zero) - mins[n, g]      g = k // group

computed in float32 this is bitwise the value `gguf_quants.dequantize` gives (tests/test_gguf_kernel.py),
because it is the same operations on the same operands: the block fields are only taken apart here, not
rounded. That form is what the integer decode kernels (kernels/wint_h2.py) multiply from, so a GGUF
weight can be repacked into their layout (kernels/gguf.py) instead of being decoded from bytes per element.

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

from dataclasses import dataclass

import torch

from qbench.quant.gguf_quants import (TYPES, _bits32, _crumbs_out, _half, _k4_unpack, _nibbles, _q4_k_low,
                                      _shifts)

BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


@dataclass
class IntegerForm:
    codes: torch.Tensor  # uint8 [rows, cols], 0 <= code < 2**bits
    scales: torch.Tensor  # float32 [rows, cols // group]
    mins: torch.Tensor | None  # float32 [rows, cols // group], or None for none
    zero: int
    group: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], the operations of gguf_quants.dequantize."""
        rows, cols = self.codes.shape
        q = (self.codes.float() - self.zero).view(rows, -1, self.group)
        w = self.scales[..., None] * q
        if self.mins is not None:
            w = w - self.mins[..., None]
        return w.reshape(rows, cols)


def _legacy(b, qs: int, high: int | None, with_min: bool, zero: int):
    """Q4_0/Q4_1/Q5_0/Q5_1: d (| m) (| qh) | nibbles, one group per 32-element block."""
    q = _nibbles(b[:, qs:qs + 16])
    if high is not None:
        q = q | (_bits32(b[:, high:high + 4]) << 4)
    mins = -_half(b[:, 2:4]) if with_min else None
    return q, _half(b[:, 0:2]), mins, zero


def _q8_0(b):
    q = (b[:, 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return q, _half(b[:, 0:2]), None, 128


def _q2_k(b):
    sc = b[:, 0:16]
    d, dmin = _half(b[:, 80:82]), _half(b[:, 82:84])
    return _crumbs_out(b[:, 16:80]), d * (sc & 15).float(), dmin * (sc >> 4).float(), 0


def _q3_k(b):
    n = b.shape[0]
    hmask, s, d = b[:, 0:32], b[:, 96:108], _half(b[:, 108:110])
    low = _crumbs_out(b[:, 32:96]).reshape(n, 8, 32)
    high = (hmask[:, None, :] >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1
    q = (low + 4 * high).reshape(n, 256)  # (low - 4 (1 - high)) + 4
    lo = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)
    hi = (s[:, 8:12].repeat(1, 4) >> _shifts(*[2 * (j // 4) for j in range(16)], device=b.device)) & 3
    return q, d * ((lo | (hi << 4)).float() - 32), None, 4


def _q45_k(b, high: bool):
    n = b.shape[0]
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, mn = _k4_unpack(b[:, 4:16])
    q = _q4_k_low(b[:, 48:176] if high else b[:, 16:144])
    if high:
        q = q | (((b[:, None, 16:48] >> _shifts(*range(8), device=b.device).view(1, 8, 1)) & 1) << 4)
    return q.reshape(n, 256), d * sc, dmin * mn, 0


def _q6_k(b):
    n = b.shape[0]
    ql = (b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, device=b.device).view(1, 1, 2, 1)) & 15
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)) & 3
    q = ql.reshape(n, 256) | (qh.reshape(n, 256) << 4)
    return q, _half(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float(), None, 32


_FIELDS = {"Q4_0": lambda b: _legacy(b, 2, None, False, 8), "Q4_1": lambda b: _legacy(b, 4, None, True, 0),
           "Q5_0": lambda b: _legacy(b, 6, 2, False, 16), "Q5_1": lambda b: _legacy(b, 8, 4, True, 0),
           "Q8_0": _q8_0, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": lambda b: _q45_k(b, False),
           "Q5_K": lambda b: _q45_k(b, True), "Q6_K": _q6_k}


def integer_form(raw: torch.Tensor, qtype: str, cols: int) -> IntegerForm:
    """uint8 [rows, row_bytes] GGUF rows -> their IntegerForm (on raw's device)."""
    t = TYPES[qtype]
    rows = raw.shape[0]
    q, scales, mins, zero = _FIELDS[qtype](raw.reshape(-1, t.block_bytes))
    groups = scales.shape[1]  # per block
    group = t.block_elems // groups
    scales = scales.reshape(rows, cols // group)
    mins = None if mins is None else mins.reshape(rows, cols // group)
    return IntegerForm(q.to(torch.uint8).reshape(rows, cols), scales, mins, zero, group, BITS[qtype])
