"""FP8: every linear becomes an FP8Linear (E4M3/E5M2 weights, optional per-token FP8 activations)."""

from qbench.quant.fp8 import FP8Linear
from qbench.quant.modules import replace_linears


def quantize(model, cfg, ctx) -> dict:
    m = cfg.method
    count = replace_linears(model, cfg, ctx, lambda name, linear: FP8Linear(
        linear.weight.data, linear.bias, m.format, m.scale, m.activations, cfg.kernel))
    return {"quantized_layers": count, "format": m.format, "scale": m.scale, "activations": m.activations}
