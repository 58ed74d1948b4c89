"""Round-to-nearest: each linear's weight rounded onto the integer grid (qbench.quant.grid), no calibration."""

from qbench.config import resolved_bits, resolved_group_size
from qbench.quant.grid import rtn_quantize
from qbench.quant.modules import quantizable_linears, set_module
from qbench.quant.qlinear import QuantLinear


def quantize(model, cfg, ctx) -> dict:
    bits, group_size, sym = resolved_bits(cfg), resolved_group_size(cfg), bool(cfg.method.sym)
    zero_in_range = bool(cfg.method.zero_in_range)
    linears = quantizable_linears(model, cfg.quantize_lm_head)
    for name, linear in ctx.progress(linears.items(), "rtn", total=len(linears)):
        qw = rtn_quantize(linear.weight.data, bits, group_size, sym, zero_in_range)
        layer = QuantLinear.from_quantized(qw, linear.bias, kernel=cfg.kernel).to(linear.weight.device)
        set_module(model, name, layer)
    return {"quantized_layers": len(linears)}
