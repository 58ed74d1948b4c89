"""Which kernels compete for each weight format at each number of tokens, and how each one is launched.

CANDIDATES lists, per format and token range, the kernel families whose configs the tuner (kernels/tune.py)
times on the GPU, in the order it lists them (the CPU interpreter runs the first config; the last one is the
tuner's reference). A family's configs function still returns [] where its kernel does not apply (activation
dtype, bit width, block size, act-order, GPU generation), so a listed family may sit out some shapes.
RUNNERS maps the "KERNEL" name in a config to its launcher (the skeleton's fused configs have no KERNEL).

| format | decode (M = 1) | 2-32 tokens | prefill (M > 32) |
| --- | --- | --- | --- |
| wint (W2-8A16) | wint_h2, wint_decode, skeleton | + wint_tc, wint_mma (M <= 16); h2/decode up to M = 4 | skeleton |
| wint_min (HQQ) | wint_h2, wint_skeleton | + wint_tc | wint_skeleton |
| nf4 (NF4/FP4) | nf4_h2, nf4_decode, skeleton | + nf4_tc; h2/decode up to M = 4 | skeleton |
| gguf | gguf_h2, gguf_wint, skeleton | + gguf_tc; h2 up to M = 4 | gguf_wint, skeleton |

skeleton: kernels/matmul.py's fused dequantize-matmul (GEMV / tl.dot / tiled GEMM) and, for M > 4, dequantize
+ cuBLAS; wint_skeleton and gguf_wint: the same on an integer weight, the min term added after it.
"""

from typing import NamedTuple

import torch

from qbench.kernels.matmul import Nf4Layout, WintLayout, candidate_configs, run_skeleton, sm_count
from qbench.kernels.nf4_decode import nf4_decode_configs, run_nf4_decode
from qbench.kernels.nf4_h2 import nf4_h2_configs, run_nf4_h2
from qbench.kernels.nf4_tc import nf4_tc_configs, run_nf4_tc
from qbench.kernels.tune import m_bucket, pick
from qbench.kernels.wint_decode import run_wint_decode, wint_decode_configs
from qbench.kernels.wint_h2 import h2_decode_configs, run_h2_decode
from qbench.kernels.wint_mma import mma_configs, run_mma
from qbench.kernels.wint_tc import run_tc, tc_configs

DECODE, FEW, PREFILL = "decode", "2-32", "prefill"


def token_range(M: int) -> str:
    """M = 1 decode, 2-32 tokens (batched decode, short prompts), more prefill; bounds of the tuner's M buckets."""
    return DECODE if M <= 1 else FEW if M <= 32 else PREFILL


CANDIDATES = {
    "wint": {DECODE: ("wint_h2", "wint_decode", "skeleton"),
             FEW: ("wint_h2", "wint_decode", "wint_tc", "wint_mma", "skeleton"),
             PREFILL: ("skeleton",)},
    "wint_min": {DECODE: ("wint_h2", "wint_skeleton"),
                 FEW: ("wint_h2", "wint_tc", "wint_skeleton"),
                 PREFILL: ("wint_skeleton",)},
    "nf4": {DECODE: ("nf4_h2", "nf4_decode", "skeleton"),
            FEW: ("nf4_h2", "nf4_tc", "nf4_decode", "skeleton"),
            PREFILL: ("skeleton",)},
    "gguf": {DECODE: ("gguf_h2", "gguf_wint", "skeleton"),
             FEW: ("gguf_h2", "gguf_tc", "gguf_wint", "skeleton"),
             PREFILL: ("gguf_wint", "skeleton")},
}


class Call(NamedTuple):
    """What a configs function may look at: the shape, the activations' dtype, the GPU's SM count."""
    M: int
    N: int
    K: int
    dtype: torch.dtype
    device: torch.device
    n_sm: int


# ---------------------------------------------------------------- integer weights (WintLayout)

def _grouped(w: WintLayout, c: Call) -> bool:
    """The decode and tensor-core kernels read groups of consecutive input channels (no g_idx), and with a min
    term only whole groups that tile K."""
    return w.g_idx is None and (w.mins is None or (w.group > 0 and c.K % w.group == 0))


def _h2(c: Call, w: WintLayout) -> list[dict]:
    if not _grouped(w, c):
        return []
    found = h2_decode_configs(c.M, c.N, c.K, w.bits, w.group, c.dtype, c.n_sm)
    return [cfg for cfg in found if w.mins is None or c.K % cfg["BLOCK_K"] == 0]  # a min term: whole K tiles


def _decode(c: Call, w: WintLayout) -> list[dict]:
    # only where the fp16x2 kernel does not apply (other dtypes): that one beat it on every H100 shape
    if w.g_idx is not None or h2_decode_configs(c.M, c.N, c.K, w.bits, w.group, c.dtype, c.n_sm):
        return []
    return wint_decode_configs(c.M, c.N, c.K, w.bits, w.group, c.n_sm)


def _tc(c: Call, w: WintLayout) -> list[dict]:
    return tc_configs(c.M, c.N, c.K, w.bits, w.group, c.dtype, c.n_sm) if _grouped(w, c) else []


def _mma(c: Call, w: WintLayout) -> list[dict]:
    return mma_configs(c.M, c.N, c.K, w.bits, w.group, c.dtype, c.device, c.n_sm) if w.g_idx is None else []


def _integer_args(w: WintLayout) -> tuple:
    return w.qweight, w.qzeros, w.scales, w.bits, w.group, w.N


def skeleton_with_mins(cfg: dict, x2: torch.Tensor, w: WintLayout) -> torch.Tensor:
    """x2 @ W^T on an integer weight through the skeleton (any M), then the min term: out -= (sums of x over each
    group) @ mins. A short last group (the group not dividing K) sums x padded with zeros."""
    out = run_skeleton(cfg, x2, w, w.N)
    if w.mins is None:
        return out
    size = w.group or x2.shape[1]
    padded = torch.nn.functional.pad(x2, (0, w.mins.shape[0] * size - x2.shape[1]))
    sums = padded.view(x2.shape[0], w.mins.shape[0], size).sum(-1, dtype=torch.float32)
    return torch.addmm(out.float(), sums, w.mins.float(), alpha=-1).to(x2.dtype)


# ---------------------------------------------------------------- NF4/FP4 (Nf4Layout)

def _words(w: Nf4Layout, K: int) -> torch.Tensor | None:
    """The codes as int32 words of 8 (the decode kernels' view), or None when rows are not whole words."""
    flat = w.codes.view(-1)
    return flat.view(torch.int32) if K % 8 == 0 and flat.data_ptr() % 4 == 0 else None


def _nf4(configs):
    """The NF4 kernels read the codes as words: none of them where the codes are not word-aligned."""
    return lambda c, w: [] if _words(w, c.K) is None else configs(c, w)


def _nf4_args(w: Nf4Layout) -> tuple:
    return w.absmax2, w.code2, w.offset, w.N, w.blocksize


def _run_nf4_decode(cfg, x2, w: Nf4Layout):
    absmax = w.absmax.view(-1) if w.absmax2 is not None else w.absmax.view(-1).float()
    return run_nf4_decode(cfg, x2, _words(w, x2.shape[1]), absmax, w.lut, *_nf4_args(w))


# ---------------------------------------------------------------- GGUF (GgufLayout: the integer copy's kernels)

def _on_integer(configs, kernel: str):
    """configs of an integer kernel on a GGUF weight's integer copy, named `kernel` (none without a copy)."""
    return lambda c, g: [] if g.integer is None else [{**cfg, "KERNEL": kernel} for cfg in configs(c, g.integer())]


CONFIGS = {
    "skeleton": lambda c, w: candidate_configs(c.M, c.N, c.K, c.device),
    "wint_h2": _h2,
    "wint_decode": _decode,
    "wint_tc": _tc,
    "wint_mma": _mma,
    "wint_skeleton": lambda c, w: [{"KERNEL": "wint_skeleton", "WINT": cfg}
                                   for cfg in candidate_configs(c.M, c.N, c.K, c.device)],
    "nf4_h2": _nf4(lambda c, w: nf4_h2_configs(c.M, c.N, c.K, w.blocksize, w.lut, c.dtype, c.n_sm)),
    "nf4_tc": _nf4(lambda c, w: nf4_tc_configs(c.M, c.N, c.K, w.blocksize, w.lut, c.dtype, c.n_sm)),
    "nf4_decode": _nf4(lambda c, w: nf4_decode_configs(c.M, c.N, c.K, w.blocksize, c.n_sm)),
    "gguf_h2": _on_integer(_h2, "gguf_h2"),
    "gguf_tc": _on_integer(_tc, "gguf_tc"),
    "gguf_wint": lambda c, g: [] if g.integer is None else [{"KERNEL": "gguf_wint", "WINT": cfg}
                                                            for cfg in candidate_configs(c.M, c.N, c.K, c.device)],
}

RUNNERS = {
    "tiled": lambda cfg, x2, w: run_skeleton(cfg, x2, w, w.N),
    "dequant_cublas": lambda cfg, x2, w: run_skeleton(cfg, x2, w, w.N),
    "wint_h2": lambda cfg, x2, w: run_h2_decode(cfg, x2, *_integer_args(w), mins=w.mins),
    "wint_decode": lambda cfg, x2, w: run_wint_decode(cfg, x2, *_integer_args(w)),
    "wint_tc": lambda cfg, x2, w: run_tc(cfg, x2, *_integer_args(w), mins=w.mins),
    "wint_mma": lambda cfg, x2, w: run_mma(cfg, x2, *_integer_args(w)),
    "wint_skeleton": lambda cfg, x2, w: skeleton_with_mins(cfg["WINT"], x2, w),
    "nf4_h2": lambda cfg, x2, w: run_nf4_h2(cfg, x2, w.codes, w.absmax, w.lut, *_nf4_args(w)),
    "nf4_tc": lambda cfg, x2, w: run_nf4_tc(cfg, x2, w.codes, w.absmax, w.lut, *_nf4_args(w)),
    "nf4_decode": _run_nf4_decode,
    "gguf_h2": lambda cfg, x2, g: RUNNERS["wint_h2"](cfg, x2, g.integer()),
    "gguf_tc": lambda cfg, x2, g: RUNNERS["wint_tc"](cfg, x2, g.integer()),
    "gguf_wint": lambda cfg, x2, g: skeleton_with_mins(cfg["WINT"], x2, g.integer()),
}


def tuned_matmul(fmt: str, name: str, key: tuple, x: torch.Tensor, layout, config: dict | None = None) -> torch.Tensor:
    """x [..., K] times the [N, K] weight in `layout` -> [..., N] in x's dtype, by `config` or else by the config
    the tuner picks among CANDIDATES[fmt] for this token range (tuned as `name`, key + (M bucket, N, K, dtype))."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], layout.N

    def configs():
        call = Call(M, N, K, x.dtype, x.device, sm_count(x.device))
        return [cfg for family in CANDIDATES[fmt][token_range(M)] for cfg in CONFIGS[family](call, layout)]

    def run(cfg):
        return RUNNERS[cfg.get("KERNEL", "tiled")](cfg, x2, layout).to(x.dtype)

    if config is None:
        config = pick(name, key + (m_bucket(M), N, K, str(x.dtype)), configs, run, x.device)
    return run(config).reshape(*x.shape[:-1], N)
