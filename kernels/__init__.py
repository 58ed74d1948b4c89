"""qbench's Triton kernels: plain @triton.jit kernels and thin launchers, one file per weight format.

    wint_matmul   W{2..8}A16 grouped integer (RTN/GPTQ/AWQ), act-order    kernels/wint.py (wint_decode.py, wint_h2.py, wint_tc.py, wint_mma.py)
    nf4_matmul    NF4/FP4 blockwise absmax, double quant                   kernels/nf4.py (decode: nf4_decode.py, nf4_h2.py; nf4_tc.py)
    gguf_matmul   GGUF Q4_0/1, Q5_0/1, Q8_0, Q2_K .. Q6_K                  kernels/gguf.py
    int8_matmul   W8A8 int8 and LLM.int8() with 16-bit outlier columns     kernels/w8a8.py
    llm_int8_decode  LLM.int8() for <= 32 tokens, outliers found on device  kernels/w8a8.py
    fp8_matmul    FP8 (E4M3/E5M2) weights, per-token FP8 activations       kernels/w8a8.py
Which kernels compete for each format and token range: kernels/registry.py.
Importing this package imports triton; on a CPU, run under TRITON_INTERPRET=1.
"""

import importlib.machinery
import sys
from pathlib import Path


def _hugging_faces_kernels():
    """The spec of a `kernels` package outside this checkout, or None (then this one serves the name)."""
    root = Path(__file__).resolve().parent.parent
    return importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != root])


_spec = _hugging_faces_kernels() if __name__ == "kernels" else None
if _spec is not None:
    # Imported as a top-level `kernels` because the repo root is on sys.path (`python -m ...` run there):
    # that name belongs to Hugging Face's kernels package, which transformers (>= 5.2x) imports. Hand the
    # name over to it; qbench's kernels are `qbench.kernels` and are not affected.
    import importlib.util

    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds at the end
    _spec.loader.exec_module(_module)
else:
    from qbench.kernels.gguf import gguf_matmul
    from qbench.kernels.nf4 import nf4_matmul
    from qbench.kernels.w8a8 import fp8_matmul, int8_matmul, llm_int8_decode, quantize_rows
    from qbench.kernels.wint import is_default_g_idx, wint_matmul

    __all__ = ["wint_matmul", "is_default_g_idx", "nf4_matmul", "gguf_matmul", "int8_matmul", "fp8_matmul",
               "llm_int8_decode", "quantize_rows"]
