"""MXFP4 (and, through qbench.methods.nvfp4, NVFP4): every linear becomes a LinearFP4Blocks, E2M1
weights with block scales (the format is the method's name; layout in qbench/quant/fp4_blocks.py)."""

from qbench.quant.fp4_blocks import BLOCK, LinearFP4Blocks
from qbench.quant.modules import replace_linears


def quantize(model, cfg, ctx) -> dict:
    fmt = cfg.method.name  # mxfp4 | nvfp4
    stored = {"bits": 0.0, "weights": 0}

    def make_layer(name, linear):
        layer = LinearFP4Blocks(linear, fmt, cfg.kernel)
        stored["bits"] += layer.weight_bits() * linear.weight.numel()
        stored["weights"] += linear.weight.numel()
        return layer

    count = replace_linears(model, cfg, ctx, make_layer, fmt)
    return {"quantized_layers": count, "format": fmt, "blocksize": BLOCK[fmt],
            "bits_per_weight": stored["bits"] / max(stored["weights"], 1)}
