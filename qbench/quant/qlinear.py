"""A linear layer holding packed integer weights (RTN, GPTQ, AWQ), dequantized on the fly.

Packed layout (the GPTQ checkpoint layout, see packing.py), with K = in_features, N = out_features:
    qweight [ceil(K*bits/32), N] int32   codes packed along K
    qzeros  [G, ceil(N*bits/32)] int32   zero points packed along N (no "-1" offset; export adds it)
    scales  [G, N] float16
    g_idx   [K] int32                     group of each input channel (act-order permutes it)
"""

import torch
from torch import nn

from qbench.quant.grid import QuantizedWeight
from qbench.quant.kernel_choice import use_triton
from qbench.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


def group_order(layer: "QuantLinear") -> tuple | None:
    """(perm, qweight') of an act-order layer: perm [K] int64 sorts the input channels by group and
    qweight' holds the codes in that order, so x[..., perm] @ W'^T = x @ W^T with groups of
    consecutive channels, which the fast decode kernels need (they read no g_idx; exllama reorders
    the same way). None when sorted g_idx is not k // group_size (groups of other sizes); then the
    g_idx kernel runs. Built once per weight and kept on the layer: a second packed weight in memory,
    one gather of the activations per call."""
    key = (layer.qweight.data_ptr(), layer.qweight._version, layer.g_idx.data_ptr(), layer.g_idx._version)
    cached = getattr(layer, "_group_order", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    K, size = layer.in_features, layer.group_size if 0 < layer.group_size < layer.in_features else layer.in_features
    perm = torch.argsort(layer.g_idx.long(), stable=True)
    default = torch.arange(K, device=perm.device) // size
    order = None
    if torch.equal(layer.g_idx.long()[perm], default):
        codes = unpack_rows(layer.qweight, layer.bits, K)  # [K, N]
        order = (perm, pack_rows(codes[perm], layer.bits))
    layer._group_order = (key, order)
    return order


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, n_groups: int,
                 sym: bool, bias: bool, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.kernel = bits, group_size, sym, kernel
        self.register_buffer("qweight", torch.zeros(-(-in_features * bits // 32), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, -(-out_features * bits // 32), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, kernel: str = "auto") -> "QuantLinear":
        out_features, in_features = qw.codes.shape
        layer = cls(in_features, out_features, qw.bits, qw.group_size, qw.scales.shape[0], qw.sym, bias is not None, kernel)
        layer.qweight.copy_(pack_rows(qw.codes.T, qw.bits))
        layer.qzeros.copy_(pack_cols(qw.zeros, qw.bits))
        layer.scales.copy_(qw.scales)
        layer.g_idx.copy_(qw.g_idx)
        if bias is not None:
            layer.bias = bias.detach().clone().float()
        return layer

    def unpacked(self) -> QuantizedWeight:
        codes = unpack_rows(self.qweight, self.bits, self.in_features).T
        zeros = unpack_cols(self.qzeros, self.bits, self.out_features)
        return QuantizedWeight(codes, self.scales, zeros, self.g_idx, self.bits, self.group_size, self.sym)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """[out, in] weight in dtype (torch reference path)."""
        return self.unpacked().dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not use_triton(self.kernel, x):
            return nn.functional.linear(x, self.dequantize(x.dtype), bias)
        from qbench.kernels.wint import is_default_g_idx, wint_matmul

        stamp = (self.g_idx.data_ptr(), self.g_idx._version)  # act-order is checked once per g_idx content
        if getattr(self, "_g_idx_stamp", None) != stamp:
            self._g_idx_stamp, self._act_order = stamp, not is_default_g_idx(self.g_idx, self.group_size)
        order = group_order(self) if self._act_order else None
        if order is not None:  # act-order as consecutive groups: the decode kernels without g_idx apply
            perm, qweight = order
            y = wint_matmul(x.index_select(-1, perm), qweight, self.qzeros, self.scales, None, self.bits, self.group_size)
        else:
            g_idx = self.g_idx if self._act_order else None
            y = wint_matmul(x, self.qweight, self.qzeros, self.scales, g_idx, self.bits, self.group_size)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, sym={self.sym}"


def replace_with_quantized(parent: nn.Module, name: str, qw: QuantizedWeight, kernel: str = "auto") -> None:
    """parent.<name>, an nn.Linear, becomes the QuantLinear of qw with the linear's bias, on its device."""
    from qbench.quant.modules import set_module

    linear = parent.get_submodule(name)
    set_module(parent, name, QuantLinear.from_quantized(qw, linear.bias, kernel).to(linear.weight.device))
