"""MXFP4 and NVFP4: FP4 E2M1 weights with one scale per block of consecutive input channels.

Elements (both formats): E2M1, sign bit 3 | exponent 2 bits (bias 1) | mantissa 1 bit, no inf/nan;
codes 0..7 = +{0, 0.5, 1, 1.5, 2, 3, 4, 6}, codes 8..15 the same negated (8 = -0). A scaled value is
rounded to the nearest element, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
2.5 -> 2, 3.5 -> 4, 5 -> 4), beyond 6 clamped to 6; the sign is kept, so -0.2 gets code 8 (-0).

MXFP4 (OCP Microscaling Formats spec v1.0, section 6.3, the "minimally supported" conversion; the
same numbers as torchao 0.18 `torchao.prototype.mx_formats.mx_tensor.to_mx`, scaling_mode FLOOR):
    blocks   32 consecutive weights of a row (along K, the input dimension)
    scale    E8M0, uint8 e: 2^(e - 127); e = floor(log2(amax)) - 2 + 127 (2 = emax of E2M1), the
             floor read from amax's float32 exponent bits, clamped to [0, 254]; an all-zero block
             gets e = 0 (2^-127)
    codes    E2M1 of w / 2^(e - 127)   (exact: a division by a power of two)
    The amax of a block may map above 6 (amax = 7.9 -> scale 1): those weights clamp to 6.
    torchao divides by max(scale, 2^-126), which differs only for blocks with amax < 2^-124.
NVFP4 (NVIDIA's two-level scaling as torchao 0.18 `torchao.prototype.mx_formats.nvfp4_tensor`
`per_tensor_amax_to_scale` + `nvfp4_quantize` implements it, the same float32 operations):
    tensor   float32 t = amax(W) / (448 * 6)   (an all-zero weight gets t = 1)
    blocks   16 consecutive weights of a row
    scale    E4M3 (torch.float8_e4m3fn) s = cast(clamp(amax_block / 6 / t, 2^-6, 448)), round to
             nearest even; 2^-6 is E4M3's smallest normal (torchao's floor for the block scale)
    codes    E2M1 of clamp(w * ((1 / t) / s), -6, 6)
    dequant  E2M1 value * (t * s)   (t * s rounded to float32 first, as torchao's get_hp_scales)
Storage (both): codes uint8 [N, Kp / 2], two per byte, element 2i of a row in the LOW nibble
(torchao's pack_uint4 and torch.float4_e2m1fn_x2; bitsandbytes' NF4 layout is the other way round);
scales [N, Kp / block] (uint8 E8M0 | float8_e4m3fn); Kp = K rounded up to the block, padded with
zeros (which change no amax). Dequantization computes in float32 and casts once, so the torch path
here and the Triton kernel (qbench.kernels.fp4_blocks) give the same bits.
"""

import torch
from torch import nn

from qbench.quant.kernel_choice import use_triton

BLOCK = {"mxfp4": 32, "nvfp4": 16}
E2M1_MAX = 6.0
E2M1_EMAX = 2  # floor(log2(6))
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0 ** -6
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_MIDPOINTS = (E2M1_VALUES[:7] + E2M1_VALUES[1:8]) / 2


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 codes (uint8), round to nearest, ties to even code, saturating at 6."""
    mag = x.abs().clamp(max=E2M1_MAX)
    mids = _MIDPOINTS.to(x.device)
    code = torch.bucketize(mag, mids)  # a value on a midpoint gets the lower code
    tie = (code < 7) & (mag == mids[code.clamp(max=6)])
    code = code + (tie & (code % 2 == 1)).long()  # an odd lower code gives the tie to the even one above
    return (code | (torch.signbit(x).long() << 3)).to(torch.uint8)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2m] -> [..., m], element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """2^(e - 127) exactly, from the float32 bits (e = 0: the subnormal 2^-127)."""
    normal = (e.to(torch.int32) << 23).view(torch.float32)
    return torch.where(e == 0, torch.full_like(normal, 2.0 ** -127), normal)


def _blocks(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> float32 [N, Kp / block, block], K zero-padded up to a multiple of the block."""
    w = weight.detach().float()
    w = nn.functional.pad(w, (0, -w.shape[1] % block))
    return w.view(w.shape[0], -1, block)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (packed codes uint8 [N, Kp/2], E8M0 exponents uint8 [N, Kp/32])."""
    w = _blocks(weight, BLOCK["mxfp4"])
    amax = w.abs().amax(dim=-1)
    floor_log2 = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # -127 for 0 (and subnormals)
    e = (floor_log2 - E2M1_EMAX + 127).clamp(0, 254).to(torch.uint8)
    codes = encode_e2m1(w / e8m0_to_float(e)[..., None])
    return pack_nibbles(codes.flatten(1)), e


def quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (packed codes uint8 [N, Kp/2], E4M3 scales [N, Kp/16], float32 tensor scale [1])."""
    w = _blocks(weight, BLOCK["nvfp4"])
    amax = w.abs().max().reshape(1)
    t = torch.where(amax > 0, amax / (E4M3_MAX * E2M1_MAX), torch.ones_like(amax))
    block_scale = w.abs().amax(dim=-1) / E2M1_MAX
    s = torch.clamp(block_scale / t, E4M3_MIN_NORMAL, E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = torch.clamp(w * ((1.0 / t) / s.float())[..., None], -E2M1_MAX, E2M1_MAX)
    return pack_nibbles(encode_e2m1(scaled).flatten(1)), s, t


def block_scales(fmt: str, scales: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 [N, Kp / block]: the factor each block's E2M1 values are multiplied by."""
    if fmt == "mxfp4":
        return e8m0_to_float(scales)
    return tensor_scale * scales.float()


def dequantize(fmt: str, packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor | None, K: int,
               dtype=torch.float32) -> torch.Tensor:
    """The torch reference: [N, K] weights in dtype."""
    values = decode_e2m1(unpack_nibbles(packed))
    per_block = block_scales(fmt, scales, tensor_scale)
    w = values.view(*per_block.shape, -1) * per_block[..., None]
    return w.flatten(1)[:, :K].to(dtype)


class LinearFP4Blocks(nn.Module):
    """A W4A16 linear with MXFP4 or NVFP4 weights (buffers as in the module docstring)."""

    def __init__(self, linear: nn.Linear, fmt: str, kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.fmt, self.block, self.kernel = fmt, BLOCK[fmt], kernel
        if fmt == "mxfp4":
            packed, scales, tensor_scale = *quantize_mxfp4(linear.weight), None
        else:
            packed, scales, tensor_scale = quantize_nvfp4(linear.weight)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("tensor_scale", tensor_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone().float())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.fmt, self.packed, self.scales, self.tensor_scale, self.in_features, dtype)

    def dequantize_triton(self, dtype) -> torch.Tensor:
        from qbench.kernels.fp4_blocks import dequant_fp4_blocks

        return dequant_fp4_blocks(self.fmt, self.packed, self.scales, self.tensor_scale, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize to x's dtype (Triton on GPU, torch on CPU), then one matmul."""
        w = self.dequantize_triton(x.dtype) if use_triton(self.kernel, x) else self.dequantize(x.dtype)
        y = nn.functional.linear(x, w)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight_bits(self) -> float:
        """Stored bits per weight: codes, block scales and the tensor scale (padding included)."""
        stored = self.packed.numel() * 8 + self.scales.numel() * 8
        if self.tensor_scale is not None:
            stored += 32
        return stored / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt}, block={self.block}"
