"""FP4 (bitsandbytes' 4-bit float): the NF4 method with the FP4 code book (chosen by the method name)."""

from qbench.methods.nf4 import quantize  # noqa: F401
