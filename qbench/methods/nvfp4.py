"""NVFP4: the MXFP4 method with 16-weight blocks, E4M3 block scales and a float32 tensor scale
(chosen by the method name)."""

from qbench.methods.mxfp4 import quantize  # noqa: F401
