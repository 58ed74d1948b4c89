"""A linear layer holding raw GGML blocks (the bytes of a GGUF tensor), dequantized on the fly.

    qweight uint8 [out_features, (in_features // block_elems) * block_bytes]   (layout: gguf_quants.py)
    bias    float32 [out_features] or None
The blocks (and their integer copy, `wint_layout`) go through the Triton kernels (kernels/gguf.py) where
the shared kernel rule says so (qbench.quant.kernel_choice: kernel=auto on CUDA, kernel=triton);
kernel=torch (and a type not in KERNEL_TYPES) uses the torch reference, which dequantizes the weight and
multiplies.
"""

import torch
from torch import nn

from qbench.quant.gguf_quants import TYPES, dequantize, integer_form, quantize, row_bytes
from qbench.quant.kernel_choice import use_triton
from qbench.quant.packing import pack_cols, pack_rows

KERNEL_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # with a Triton kernel


def wint_layout(raw: torch.Tensor, qtype: str, K: int) -> tuple:
    """(qweight, qzeros, scales fp16 [G, N], mins fp16 [G, N] or None, bits, group) of a GGUF weight in the
    integer kernels' layout (kernels/wint.py: codes packed along K by qbench/quant/packing.py), the copy that
    kernels/gguf.py's integer kernels read; cached on `raw` until it changes."""
    key = (raw._version, qtype, K)
    cached = getattr(raw, "_qbench_wint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    form = integer_form(raw, qtype.upper(), K)
    bits = form.bits if form.bits in (2, 3, 4, 8) else 8  # 5- and 6-bit codes take 8: no such kernel path
    groups = form.scales.shape[1]
    qweight = pack_rows(form.codes.T, bits)
    qzeros = pack_cols(torch.full((groups, raw.shape[0]), form.zero, dtype=torch.int32, device=raw.device), bits)
    mins = None if form.mins is None else form.mins.T.contiguous().half()
    layout = (qweight, qzeros, form.scales.T.contiguous().half(), mins, bits, form.group)
    raw._qbench_wint = (key, layout)
    return layout


def _triton_matmul(layer: "GGUFLinear", x: torch.Tensor) -> torch.Tensor | None:
    """x @ W.T by the Triton kernel reading the raw blocks, or None when the torch path should run."""
    if layer.qtype not in KERNEL_TYPES or not use_triton(layer.kernel, x):
        return None
    from qbench.kernels.gguf import gguf_matmul

    raw, qtype = layer.qweight, layer.qtype.lower()
    return gguf_matmul(x, raw, qtype, integer_copy=lambda: wint_layout(raw, qtype, layer.in_features))


class GGUFLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.qtype, self.kernel = in_features, out_features, qtype, kernel
        self.register_buffer("qweight", torch.zeros(out_features, row_bytes(qtype, in_features), dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str, kernel: str = "auto", imatrix=None) -> "GGUFLinear":
        """imatrix: [in_features] importance of each input column (ggml's quant_weights), or None."""
        layer = cls(linear.in_features, linear.out_features, qtype, linear.bias is not None, kernel)
        layer.qweight.copy_(quantize(linear.weight.data, qtype, imatrix=imatrix))
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone().float()
        return layer.to(linear.weight.device)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """[out, in] weight (torch reference path)."""
        return dequantize(self.qweight, self.qtype, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = _triton_matmul(self, x)
        if out is not None:
            return out if bias is None else out + bias
        return nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def bits_per_weight(self) -> float:
        return 8 * TYPES[self.qtype].block_bytes / TYPES[self.qtype].block_elems

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.qtype}"
