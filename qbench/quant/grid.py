"""The uniform integer grid shared by RTN, GPTQ and AWQ.

A weight W of shape [out_features, in_features] is split along its input dimension into groups
(group_size=-1: a single group; otherwise groups of group_size, the last one shorter when the size
does not divide in_features). Each (output row, group) has a scale and an integer zero point:
    q = clamp(round(w / scale) + zero, 0, 2**bits - 1),   w ~ scale * (q - zero)
Asymmetric grids come in two conventions (`zero_in_range`):
- true, the GPTQ reference (IST-DASLab/gptq quant.py): the range [min(w, 0), max(w, 0)] maps onto
  [0, maxq], so 0 is always a grid point; an all-zero group gets the range [-1, 1];
- false, llm-awq (`pseudo_quantize_tensor`): the range [min(w), max(w)] itself, its width clamped at
  1e-5, and zero = round(-min / scale) clamped to [0, maxq]. A group of one sign then spends every
  level on its values, but its zero is clamped: an all-positive group loses the top of its range (the
  largest weights are clipped), an all-negative one the bottom.
Symmetric: absmax range with the zero fixed at (maxq + 1) / 2 (0 lies in it either way, so
`zero_in_range` changes nothing). Scales are rounded to float16 *before* the codes are computed, so
a packed layer (float16 scales) reproduces the fake-quantized weights exactly. That, and float32
arithmetic throughout, are where qbench differs from both references: they compute the codes from
unrounded scales (the GPTQ reference in float32, llm-awq in the weight's dtype, float16 on a GPU).
"""

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Integer codes plus their grid, in the GPTQ layout convention (groups along the input dim)."""

    codes: torch.Tensor  # [out, in] integers in [0, 2**bits)
    scales: torch.Tensor  # [n_groups, out] float16
    zeros: torch.Tensor  # [n_groups, out] integers in [0, 2**bits)
    g_idx: torch.Tensor  # [in] int32, the group of each input channel
    bits: int
    group_size: int  # -1 = one group per output row
    sym: bool

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] weights."""
        g = self.g_idx.long()
        scale = self.scales.float()[g].T  # [out, in]
        zero = self.zeros.float()[g].T
        return scale * (self.codes.float() - zero)


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // size).to(torch.int32)


def find_params(w: torch.Tensor, bits: int, sym: bool, zero_in_range: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w ([rows, cols]) over its columns. Returns float32 scale, zero [rows]."""
    if sym or zero_in_range:
        return _zero_in_range_params(w.float(), 2**bits - 1, sym)
    return _min_max_params(w.float(), 2**bits - 1)


def _zero_in_range_params(w: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ reference's grid: 0 inside the range (symmetric or not)."""
    zero_t = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = _stored_scale((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _min_max_params(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-awq's asymmetric grid: the values' own min/max, 0 not forced in (see the module docstring)."""
    xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    scale = _stored_scale((xmax - xmin).clamp(min=1e-5) / maxq)
    zero = torch.round(-xmin / scale).clamp(0, maxq)  # = llm-awq's -round(min / scale): round is odd
    return scale, zero


def _stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as float16 stores it (see the module docstring); one that underflows to 0 becomes the
    smallest float16 step, so no division by zero follows."""
    scale = scale.half().float()
    return torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w given per-row (broadcastable) scale and zero."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, zero_in_range: bool = True) -> QuantizedWeight:
    """Round-to-nearest of a [out, in] weight, group by group."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, in_features, size):
        block = weight[:, start : start + size]
        scale, zero = find_params(block, bits, sym, zero_in_range)
        codes[:, start : start + size] = quantize_codes(block, scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=codes,
        scales=torch.stack(scales).half(),
        zeros=torch.stack(zeros).to(torch.uint8),
        g_idx=default_g_idx(in_features, group_size, weight.device),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
