"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 matmul with mixed-precision decomposition.

Storage (the layout of qbench.kernels.int8_matmul): weight_int8 [out, in] int8 and weight_scale [out]
float32 = (max |w| of the row) / 127, so w ~ weight_int8 * weight_scale. Nothing else is kept: as in
bitsandbytes, the outlier columns use the dequantized int8 weights in the 16-bit matmul.

Forward for inputs X [tokens, in] (paper eq. 1-2 and section 3.2):
    O = {input features h : max over tokens |X[:, h]| > threshold}      (threshold 0 -> O is empty)
    Y = X[:, O] @ dequant(W)[:, O]^T                                       16-bit matmul (input dtype)
      + s_x s_w^T * (X_i8 @ W_i8^T)                                        int8 x int8 -> int32
where X_R = X with the columns O zeroed, s_x [tokens] = per-token max |X_R| / 127 and
X_i8 = round(X_R / s_x). threshold=0 is plain vector-wise W8A8. Each layer counts the outlier
columns it sees, so a run can record the outlier fraction per layer.
"""

import torch
from torch import nn

from qbench.quant.kernel_choice import use_triton

_EXACT_CHUNK = 1024  # input features per float32 matmul in the CPU emulation of int8 x int8 -> int32


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 per row of a 2-D tensor -> (int8 codes, float32 scale [rows] = absmax / 127).
    A zero row gets codes 0 and scale 0."""
    scale = x.float().abs().amax(dim=1) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round(x.float() * inv[:, None]).clamp(-127, 127).to(torch.int8), scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [n, k]^T -> exact int32 [m, n].

    CUDA: torch._int_mm where its shape rules allow. Otherwise float32 matmuls over chunks of 1024
    input features: every partial sum within a chunk is an integer of magnitude <= 128*128*1024 = 2**24,
    which float32 holds exactly, so each chunk is exact whatever the summation order; the chunks are
    added in int32 (an integer matmul emulated, not approximated)."""
    m, k = a.shape
    if a.is_cuda and m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t())
    acc = torch.zeros((m, b.shape[0]), dtype=torch.int32, device=a.device)
    for k0 in range(0, k, _EXACT_CHUNK):
        acc += (a[:, k0 : k0 + _EXACT_CHUNK].float() @ b[:, k0 : k0 + _EXACT_CHUNK].float().t()).to(torch.int32)
    return acc


def _decode_tokens() -> int:
    from qbench.kernels.w8a8 import DECODE_TOKENS  # the Triton path only: importing it imports triton

    return DECODE_TOKENS


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float = 6.0, kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.threshold, self.kernel = float(threshold), kernel
        codes, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        # Outlier statistics over forward calls, kept on the input's device (no host sync per call; a call
        # captured in a CUDA graph counts at every replay, the call count included).
        self.calls = None  # int64 scalar: forward calls
        self.outlier_cols_sum = None  # int64 scalar: sum over calls of the number of outlier columns
        self.outlier_cols_ever = None  # bool [in]: columns that were outliers in some call

    def dequantize(self, dtype=torch.float32, cols: torch.Tensor | None = None) -> torch.Tensor:
        """[out, in] weights in dtype, or only the input columns `cols`."""
        codes = self.weight_int8 if cols is None else self.weight_int8[:, cols]
        return (codes.float() * self.weight_scale[:, None]).to(dtype)

    def outlier_columns(self, x2d: torch.Tensor) -> torch.Tensor:
        """Bool [in]: the input features whose magnitude exceeds the threshold in some token."""
        if self.threshold <= 0:
            return torch.zeros(self.in_features, dtype=torch.bool, device=x2d.device)
        return x2d.abs().amax(dim=0) > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        triton = use_triton(self.kernel, x)
        if triton and self.threshold > 0 and x2d.shape[0] <= _decode_tokens():
            y = self.forward_triton_decode(x2d)
        else:
            outliers = self.outlier_columns(x2d)
            self._count(outliers)
            y = self.forward_triton(x2d, outliers) if triton else self.forward_torch(x2d, outliers)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def forward_torch(self, x2d: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
        """Reference path: int8 part with exact int32 accumulation plus the 16-bit outlier part."""
        x_int8, x_scale = quantize_rows(x2d.masked_fill(outliers, 0))
        acc = int8_matmul(x_int8, self.weight_int8)
        y = (acc.float() * x_scale[:, None] * self.weight_scale[None, :]).to(x2d.dtype)
        if outliers.any():
            cols = outliers.nonzero().squeeze(1)
            y = y + x2d[:, cols] @ self.dequantize(x2d.dtype, cols).t()
        return y

    def forward_triton(self, x2d: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
        """The Triton path of int8 layers for plain W8A8 and for more than DECODE_TOKENS tokens (qbench.kernels.int8_matmul,
        the outlier columns as an index list with their dequantized weights)."""
        from qbench.kernels import int8_matmul as triton_int8_matmul

        if self.threshold <= 0:
            return triton_int8_matmul(x2d, self.weight_int8, self.weight_scale)
        cols = outliers.nonzero().squeeze(1)
        return triton_int8_matmul(x2d, self.weight_int8, self.weight_scale, cols, self.dequantize(x2d.dtype, cols))

    def forward_triton_decode(self, x2d: torch.Tensor) -> torch.Tensor:
        """At most DECODE_TOKENS (32) tokens: outliers found, split off and counted in two launches before the matmul
        (qbench.kernels.llm_int8_decode), on the device: no host sync, CUDA-graph capturable."""
        from qbench.kernels import llm_int8_decode

        return llm_int8_decode(x2d, self.weight_int8, self.weight_scale, self.threshold, self._counters(x2d.device))

    def _counters(self, device: torch.device) -> tuple:
        if self.outlier_cols_sum is None or self.outlier_cols_sum.device != device:
            self.calls = torch.zeros((), dtype=torch.int64, device=device)
            self.outlier_cols_sum = torch.zeros((), dtype=torch.int64, device=device)
            self.outlier_cols_ever = torch.zeros(self.in_features, dtype=torch.bool, device=device)
        return self.calls, self.outlier_cols_sum, self.outlier_cols_ever

    def _count(self, outliers: torch.Tensor) -> None:
        self._counters(outliers.device)
        self.calls += 1
        self.outlier_cols_sum += outliers.sum()
        self.outlier_cols_ever |= outliers

    def outlier_stats(self) -> dict:
        """outlier_fraction: mean over forward calls of the fraction of input columns that were outliers;
        outlier_fraction_any: fraction of columns that were outliers in at least one call."""
        calls = 0 if self.calls is None else int(self.calls)
        if not calls:
            return {"outlier_fraction": None, "outlier_fraction_any": None, "calls": 0}
        return {
            "outlier_fraction": int(self.outlier_cols_sum) / (calls * self.in_features),
            "outlier_fraction_any": float(self.outlier_cols_ever.float().mean()),
            "calls": calls,
        }

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}"
