"""Round-to-nearest: each linear's weight rounded onto the integer grid (qbench.quant.grid), no calibration."""

from qbench.config import resolved_bits, resolved_group_size
from qbench.quant.grid import rtn_quantize
from qbench.quant.modules import replace_linears
from qbench.quant.qlinear import QuantLinear


def quantize(model, cfg, ctx) -> dict:
    bits, group_size, sym = resolved_bits(cfg), resolved_group_size(cfg), bool(cfg.method.sym)
    zero_in_range = bool(cfg.method.zero_in_range)

    def make_layer(name, linear):
        qw = rtn_quantize(linear.weight.data, bits, group_size, sym, zero_in_range)
        return QuantLinear.from_quantized(qw, linear.bias, kernel=cfg.kernel)

    return {"quantized_layers": replace_linears(model, cfg, ctx, make_layer)}
