"""fp16x2 helpers: two fp16 values packed in one uint32 register (low half in bits 0-15), the operand format of
the packed half2 instructions (sub.f16x2, fma.rn.f16x2, mul.rn.f16x2) that the decode and tensor-core kernels
issue through inline PTX. Under TRITON_INTERPRET=1 those kernels compute the same steps on the halves
these helpers split and join."""

import triton
import triton.language as tl


@triton.jit
def unpack_h2(u):
    """uint32 -> (low fp16, high fp16)."""
    lo = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    hi = (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def pack_h2(lo, hi):
    """(fp16, fp16) -> uint32 with lo in bits 0-15."""
    return lo.to(tl.uint16, bitcast=True).to(tl.uint32) | (hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
