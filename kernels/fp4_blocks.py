"""MXFP4 / NVFP4 dequantization: E2M1 codes + block scales -> the [N, K] weight in fp16/bf16/fp32.

    packed        uint8 [N, Kp/2]   two E2M1 codes a byte, element 2i of a row in the LOW nibble
    scales        uint8 [N, Kp/BLOCK] MXFP4: E8M0 exponents, 2^(e - 127); NVFP4: float8_e4m3fn bytes
    tensor_scale  float32 [1]       NVFP4 only; block factor = tensor_scale * e4m3
    W[n, k] = e2m1(code) * factor[n, k // BLOCK], in float32, cast once to the output dtype
The layout and the numbers are qbench/quant/fp4_blocks.py's; its torch dequantize is the reference
(bit for bit). The callers multiply with torch.matmul (dequantize, then cuBLAS); no fused kernel yet.
Scales are decoded from their bits (no fp8 loads), so the kernel runs on any GPU and in the interpreter;
bfloat16 output is rounded to nearest even on the float32 bits (as torch's cast; Triton's interpreter
truncates in its own cast), fp16 through the ordinary cast.
"""

import torch
import triton
import triton.language as tl

MXFP4, NVFP4 = 0, 1
_FORMATS = {"mxfp4": (MXFP4, 32), "nvfp4": (NVFP4, 16)}


@triton.jit
def e2m1_value(code):
    """float32 value of 4-bit E2M1 codes: exponent 0 is subnormal (0, 0.5), else (1 + m/2) * 2^(e - 1)."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (2.0 + m) * (1 << e).to(tl.float32) * 0.25)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def e8m0_value(e):
    """2^(e - 127) from the float32 bits; e = 0 is the subnormal 2^-127."""
    normal = (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 0, 5.877471754111438e-39, normal)


@triton.jit
def e4m3_value(b):
    """float8_e4m3fn bits -> float32 (finite values: block scales are never NaN)."""
    b = b.to(tl.int32)
    exp = (b >> 3) & 15
    mant = b & 7
    normal = (((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)  # bias 7 -> 127
    mag = tl.where(exp == 0, mant.to(tl.float32) * 0.001953125, normal)  # subnormal: mant * 2^-9
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def dequant_fp4_blocks_kernel(packed, scales, tensor_scale, out, N, K, n_bytes, n_blocks,
                              FORMAT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BF16_BITS: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    byte = tl.load(packed + offs_n[:, None] * n_bytes + (offs_k // 2)[None, :], mask=mask, other=0).to(tl.int32)
    code = (byte >> ((offs_k % 2) * 4)[None, :]) & 15
    raw = tl.load(scales + offs_n[:, None] * n_blocks + (offs_k // BLOCK)[None, :], mask=mask, other=0)
    if FORMAT == 0:
        factor = e8m0_value(raw)
    else:
        factor = tl.load(tensor_scale) * e4m3_value(raw)
    w = e2m1_value(code) * factor
    if BF16_BITS:  # out is int16: bfloat16 bits rounded to nearest even by hand (the interpreter truncates)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = bits.to(tl.uint16).to(tl.int16, bitcast=True)
    tl.store(out + offs_n[:, None] * K + offs_k[None, :], w.to(out.dtype.element_ty), mask=mask)


def dequant_fp4_blocks(fmt: str, packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor | None,
                       K: int, dtype=torch.float16, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """[N, K] weight in dtype from MXFP4 (fmt 'mxfp4') or NVFP4 ('nvfp4') codes and scales."""
    form, block = _FORMATS[fmt]
    N = packed.shape[0]
    if packed.shape[1] * 2 < K or scales.shape != (N, packed.shape[1] * 2 // block):
        raise ValueError(f"packed {tuple(packed.shape)} / scales {tuple(scales.shape)} do not fit K={K}, {fmt}")
    out = torch.empty(N, K, dtype=dtype, device=packed.device)
    scale_bytes = scales.view(torch.uint8)
    ts = tensor_scale if tensor_scale is not None else torch.ones(1, device=packed.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    bf16 = dtype == torch.bfloat16
    dequant_fp4_blocks_kernel[grid](packed, scale_bytes, ts, out.view(torch.int16) if bf16 else out, N, K,
                                    packed.shape[1], scales.shape[1], FORMAT=form, BLOCK=block, BLOCK_N=block_n,
                                    BLOCK_K=block_k, BF16_BITS=bf16)
    return out
