"""FP8: every linear becomes an FP8Linear (E4M3/E5M2 weights, optional per-token FP8 activations)."""

from qbench.quant.fp8 import FP8Linear
from qbench.quant.modules import quantizable_linears, set_module


def quantize(model, cfg, ctx) -> dict:
    m = cfg.method
    linears = quantizable_linears(model, cfg.quantize_lm_head)
    count = len(linears)
    for name in ctx.progress(list(linears), "fp8", total=count):
        linear = linears.pop(name)  # its last reference: the float weight is freed once replaced
        set_module(model, name, FP8Linear(linear.weight.data, linear.bias, m.format, m.scale, m.activations, cfg.kernel))
    return {"quantized_layers": count, "format": m.format, "scale": m.scale, "activations": m.activations}
