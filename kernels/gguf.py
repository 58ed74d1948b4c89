"""GGUF weights times activations: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

    raw uint8 [N, K/block_elems*block_bytes]: each row of W as the GGUF file stores it (see dequant.py)
    block layouts: kernels/dequant.py

Two ways to multiply, compared by the tuner per shape:
- straight from the block bytes (the dequant-matmul skeleton, kernels/matmul.py, every type and M);
- on a copy of the weight in the integer formats' layout (`integer_copy`: the caller makes it once per
  weight, qbench/quant/gguf_linear.py's wint_layout, and keeps it on `raw`): for decode (M <= 4, fp16
  activations) the integer fp16x2 kernel of kernels/wint_h2.py, for any M the integer formats' skeleton configs (tiled tl.dot, or dequantize + cuBLAS: aligned 32-bit
  words instead of bytes at 18-34-byte strides) with the min term added by one cuBLAS call (the candidates
  per token range: kernels/registry.py). Every GGML
  type is integer codes with a per-group scale, an integer zero and a per-group min (`integer_form` in
  qbench/quant/gguf_quants.py):
  Q4_0, Q4_1, Q4_K become 4-bit codes in groups of 32, Q5_0, Q5_1, Q5_K, Q8_0 8-bit codes (the 5-bit
  ones take 8 bits here: the kernel has no 5-bit path) in groups of 32, Q6_K 8-bit codes in groups of
  16; the min term (Q4_1, Q5_1, Q4_K, Q5_K) is subtracted in the fp16x2 kernel as (sum of x over a
  tile) * min. For 2-32 tokens the tensor-core kernel of kernels/wint_tc.py (4- and 8-bit codes, the
  min term per K tile) joins the candidates.
  Scales and mins are stored in fp16, which rounds the K-quants' float32 products d * sc and dmin * m
  (relative 2**-11, the rounding the torch path applies to every dequantized weight in an fp16 model);
  Q4_0, Q5_0, Q8_0 and the legacy mins are fp16 values already, so those copies are exact. The
  block bytes decoded one field at a time made Q5_0 and Q6_K decode at 0.34x / 0.27x fp16 on the
  H200 (reports/kernels/NOTES.md); the copy costs the memory of the weight again (at most 9 bits per
  weight), as the NF4 column copy does. Q2_K and Q3_K (groups of 16 at 2 and 3 bits, which the fp16x2
  kernel's tiles do not fit) take only the skeleton configs on the copy.
"""

import torch

from qbench.kernels.dequant import Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from qbench.kernels.matmul import GgufLayout, WintLayout
from qbench.kernels.registry import tuned_matmul

BLOCKS = {"q4_0": (Q4_0, 32, 18), "q8_0": (Q8_0, 32, 34), "q4_k": (Q4_K, 256, 144),  # type, elems, bytes
          "q4_1": (Q4_1, 32, 20), "q5_0": (Q5_0, 32, 22), "q5_1": (Q5_1, 32, 24), "q5_k": (Q5_K, 256, 176),
          "q6_k": (Q6_K, 256, 210), "q2_k": (Q2_K, 256, 84), "q3_k": (Q3_K, 256, 110)}


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str, config: dict | None = None,
                integer_copy=None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N], W given as ggml blocks of type qtype (a key of BLOCKS).

    integer_copy: a function returning (qweight, qzeros, scales, mins or None, bits, group), the weight in the
    integer kernels' layout, called only when a kernel on it is tuned or run; None offers only the kernels
    that read the blocks."""
    code, elems, nbytes = BLOCKS[qtype]
    K = x.shape[-1]
    if K % elems or raw.shape[1] != K // elems * nbytes or raw.dtype != torch.uint8:
        raise ValueError(f"{qtype}: raw {tuple(raw.shape)} {raw.dtype} does not fit K={K}")
    integer = None
    if integer_copy is not None:
        def integer():
            qweight, qzeros, scales, mins, bits, group = integer_copy()
            return WintLayout(qweight, qzeros, scales, None, bits, group, mins)
    layout = GgufLayout(raw.contiguous(), code, integer)
    return tuned_matmul("gguf", qtype, layout.tune_key(), x, layout, config)
