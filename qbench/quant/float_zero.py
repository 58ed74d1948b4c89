"""Integer codes with float zero points (HQQ): W = (q - z) * s, z a real number per (group, output).

The integer kernels take integer zeros, and a per-group min term (GGUF's Q4_1/Q4_K, kernels/gguf.py):
    W = (q - z_int) * s - m
so a float zero z is stored as z_int = clamp(round(z), 0, 2**bits - 1) plus m = (z - z_int) * s in
float16. Only the remainder goes into m (|m| <= s / 2 while z lies on the grid), so its float16
rounding is below s / 4096, finer than an fp16 z of 8-15 (steps of 1/128) would be. The layer is a
QuantLinear (same packed codes, zeros, scales, g_idx) plus `mins` [G, N] float16; forward is the
torch reference (dequantize, then matmul) or kernels/wint.py's wint_min_matmul.
"""

import torch
from torch import nn

from qbench.quant.grid import QuantizedWeight, default_g_idx
from qbench.quant.kernel_choice import use_triton
from qbench.quant.qlinear import QuantLinear


def split_zero(zero: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer zero, float16 min) with (q - z) * s == (q - z_int) * s - min up to the min's rounding."""
    z_int = torch.round(zero).clamp(0, 2**bits - 1)
    return z_int.to(torch.uint8), ((zero - z_int) * scale.float()).half()


class FloatZeroLinear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, n_groups: int,
                 bias: bool, kernel: str = "auto"):
        super().__init__(in_features, out_features, bits, group_size, n_groups, False, bias, kernel)
        self.register_buffer("mins", torch.zeros(n_groups, out_features, dtype=torch.float16))

    @classmethod
    def from_float_zero(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                        group_size: int, bias: torch.Tensor | None, kernel: str = "auto") -> "FloatZeroLinear":
        """codes [out, in] integers, scales [G, out] (stored in float16), zeros [G, out] floats."""
        out_features, in_features = codes.shape
        z_int, mins = split_zero(zeros.float(), scales.half(), bits)
        qw = QuantizedWeight(codes, scales.half(), z_int, default_g_idx(in_features, group_size, codes.device),
                             bits, group_size, False)
        layer = cls(in_features, out_features, bits, group_size, scales.shape[0], bias is not None, kernel)
        base = QuantLinear.from_quantized(qw, bias, kernel)
        layer.load_state_dict({**base.state_dict(), "mins": mins}, strict=True)
        return layer

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.unpacked().dequantize() - self.mins.float()[g].T).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not use_triton(self.kernel, x):
            return nn.functional.linear(x, self.dequantize(x.dtype), bias)
        from qbench.kernels.wint import wint_min_matmul

        y = wint_min_matmul(x, self.qweight, self.qzeros, self.scales, self.mins, self.bits, self.group_size)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, float zeros"
