"""GGUF weights times activations: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

    raw uint8 [N, K/block_elems*block_bytes]: each row of W as the GGUF file stores it (see dequant.py)
    block layouts: kernels/dequant.py

Two ways to multiply, compared by the tuner per shape:
- straight from the block bytes (the dequant-matmul skeleton, kernels/matmul.py, every type and M);
- on a copy of the weight in the integer formats' layout (`wint_layout`, made once per weight and kept
  on `raw`): for decode (M <= 4, fp16 activations) the integer fp16x2 kernel of kernels/wint_h2.py, for
  any M the integer formats' skeleton configs (tiled tl.dot, or dequantize + cuBLAS: aligned 32-bit
  words instead of bytes at 18-34-byte strides) with the min term added by one cuBLAS call. Every GGML
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
from qbench.kernels.matmul import GGUF, WINT, candidate_configs, dequant_matmul, sm_count
from qbench.kernels.wint_h2 import h2_decode_configs, run_h2_decode
from qbench.kernels.wint_tc import run_tc, tc_configs

BLOCKS = {"q4_0": (Q4_0, 32, 18), "q8_0": (Q8_0, 32, 34), "q4_k": (Q4_K, 256, 144),  # type, elems, bytes
          "q4_1": (Q4_1, 32, 20), "q5_0": (Q5_0, 32, 22), "q5_1": (Q5_1, 32, 24), "q5_k": (Q5_K, 256, 176),
          "q6_k": (Q6_K, 256, 210), "q2_k": (Q2_K, 256, 84), "q3_k": (Q3_K, 256, 110)}


def wint_layout(raw: torch.Tensor, qtype: str, K: int) -> tuple:
    """(qweight, qzeros, scales fp16 [G, N], mins fp16 [G, N] or None, bits, group) of a GGUF weight in the
    integer kernels' layout (kernels/wint.py: codes packed along K by qbench/quant/packing.py); cached on
    `raw` until it changes."""
    key = (raw._version, qtype, K)
    cached = getattr(raw, "_qbench_wint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    from qbench.quant.gguf_quants import integer_form
    from qbench.quant.packing import pack_cols, pack_rows

    form = integer_form(raw, qtype.upper(), K)
    bits = form.bits if form.bits in (2, 3, 4, 8) else 8  # 5- and 6-bit codes take 8: no such kernel path
    groups = form.scales.shape[1]
    qweight = pack_rows(form.codes.T, bits)
    qzeros = pack_cols(torch.full((groups, raw.shape[0]), form.zero, dtype=torch.int32, device=raw.device), bits)
    mins = None if form.mins is None else form.mins.T.contiguous().half()
    layout = (qweight, qzeros, form.scales.T.contiguous().half(), mins, bits, form.group)
    raw._qbench_wint = (key, layout)
    return layout


def wint_with_mins(x2: torch.Tensor, qweight, qzeros, scales, mins, bits: int, group: int, N: int, config: dict):
    """x2 @ W^T on the integer copy through the integer formats' dequant-matmul skeleton (any M: its tiled
    tl.dot paths, or dequantize + cuBLAS), the min term after it: out -= (sums of x over each group) @ mins."""
    M, K = x2.shape
    out = dequant_matmul(WINT, x2, N, (qweight, qzeros, scales), (bits, group, False), i0=qzeros.shape[1],
                         config=config)
    if mins is None:
        return out
    sums = x2.view(M, K // group, group).sum(-1, dtype=torch.float32)
    return torch.addmm(out.float(), sums, mins.float(), alpha=-1).to(x2.dtype)


def gguf_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: str, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N], W given as ggml blocks of type qtype (a key of BLOCKS)."""
    code, elems, nbytes = BLOCKS[qtype]
    K, N = x.shape[-1], raw.shape[0]
    if K % elems or raw.shape[1] != K // elems * nbytes or raw.dtype != torch.uint8:
        raise ValueError(f"{qtype}: raw {tuple(raw.shape)} {raw.dtype} does not fit K={K}")
    M = x.numel() // K if K else 0

    def configs():
        _, _, _, _, bits, group = wint_layout(raw, qtype, K)
        n_sm = sm_count(x.device)
        found = h2_decode_configs(M, N, K, bits, group, x.dtype, n_sm)
        return [{**c, "KERNEL": "gguf_h2"} for c in found] + \
            [{**c, "KERNEL": "gguf_tc"} for c in tc_configs(M, N, K, bits, group, x.dtype, n_sm)] + \
            [{"KERNEL": "gguf_wint", "WINT": c} for c in candidate_configs(M, N, K, x.device)]

    def run(cfg, x2):
        qweight, qzeros, scales, mins, bits, group = wint_layout(raw, qtype, K)
        if cfg["KERNEL"] == "gguf_h2":
            return run_h2_decode(cfg, x2, qweight, qzeros, scales, bits, group, N, mins=mins)
        if cfg["KERNEL"] == "gguf_tc":
            return run_tc(cfg, x2, qweight, qzeros, scales, bits, group, N, mins=mins)
        return wint_with_mins(x2, qweight, qzeros, scales, mins, bits, group, N, cfg["WINT"])
    return dequant_matmul(GGUF, x, N, (raw.contiguous(),), (code,), i0=raw.shape[1], name=qtype, config=config,
                          fast=(configs, run))
