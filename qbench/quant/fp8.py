"""FP8 weights (E4M3 or E5M2, OCP FP8 formats as torch.float8_e4m3fn / torch.float8_e5m2).

Storage (the layout of qbench.kernels.fp8_matmul): weight_fp8 [out, in] in the fp8 dtype and
weight_scale float32, [1] (per tensor) or [out] (per output channel):
    scale = max |w| / FMAX  over the tensor or the row   (FMAX = 448 for E4M3, 57344 for E5M2)
    weight_fp8 = cast(w / scale)  (round to nearest even, |w / scale| <= FMAX by construction)
    w ~ weight_fp8 * scale
Activations (activations=dynamic, W8A8): per token, s_x = max |x| / 448, x_fp8 = cast_e4m3(x / s_x);
activations are E4M3 whatever the weight format (E5M2's extra range buys nothing after scaling, and
its 2-bit mantissa would only lose precision). y = (x_fp8 @ weight_fp8^T) * s_x * scale.
CPU: emulated exactly with the torch casts, the matmul in float32 on the upcast values. CUDA:
torch._scaled_mm (real fp8 tensor-core matmul), or the Triton kernel (kernel=auto|triton).
"""

import torch
from torch import nn

from qbench.quant.kernel_choice import use_triton

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
ACT_DTYPE = torch.float8_e4m3fn


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (fp8 [rows, cols], float32 scale [rows] or [1]). An all-zero tensor/row gets scale 1."""
    w = w.float()
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().max().reshape(1)
    scale = torch.where(absmax > 0, absmax / fp8_max(dtype), torch.ones_like(absmax))
    q = (w / (scale[:, None] if per_channel else scale)).clamp(-fp8_max(dtype), fp8_max(dtype)).to(dtype)
    return q, scale


def quantize_tokens(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) dynamic E4M3 quantization -> (fp8 [tokens, in], float32 scale [tokens])."""
    return quantize_fp8(x2d, ACT_DTYPE, per_channel=True)


class FP8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str = "e4m3", scale: str = "tensor",
                 activations: str = "none", kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fmt, self.scale_mode, self.activations, self.kernel = fmt, scale, activations, kernel
        q, s = quantize_fp8(weight.detach(), FORMATS[fmt], per_channel=scale == "channel")
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        s = self.weight_scale[:, None] if self.weight_scale.numel() > 1 else self.weight_scale
        return (self.weight_fp8.float() * s).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.activations == "none":
            y = x2d @ self.dequantize(x.dtype).t()
        elif use_triton(self.kernel, x):
            y = self.forward_triton(x2d)
        else:
            y = self.forward_torch(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def forward_torch(self, x2d: torch.Tensor) -> torch.Tensor:
        """W8A8 reference: per-token E4M3 activations; torch._scaled_mm on CUDA, exact emulation on CPU."""
        x_fp8, x_scale = quantize_tokens(x2d)
        w_scale = self.weight_scale.expand(self.out_features)
        if x2d.is_cuda and self._scaled_mm_fits(x2d):
            y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale[:, None].contiguous(),
                                 scale_b=w_scale[None, :].contiguous(), out_dtype=torch.bfloat16)
            return y.to(x2d.dtype)
        y = (x_fp8.float() @ self.weight_fp8.float().t()) * x_scale[:, None] * w_scale[None, :]
        return y.to(x2d.dtype)

    def _scaled_mm_fits(self, x2d: torch.Tensor) -> bool:
        """torch._scaled_mm wants K and N multiples of 16 and an E4M3 operand (row-wise scales, bf16 out)."""
        return self.in_features % 16 == 0 and self.out_features % 16 == 0

    def forward_triton(self, x2d: torch.Tensor) -> torch.Tensor:
        """THE Triton path of FP8 W8A8 layers (qbench.kernels.fp8_matmul, same layout)."""
        from qbench.kernels import fp8_matmul

        return fp8_matmul(x2d, self.weight_fp8, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, format={self.fmt}, scale={self.scale_mode}, "
                f"activations={self.activations}")
