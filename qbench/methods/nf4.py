"""NF4 (and, through qbench.methods.fp4, FP4): every linear becomes a Linear4bit in bitsandbytes' layout."""

import torch

from qbench.config import resolved_group_size
from qbench.quant.modules import replace_linears
from qbench.quant.nf4 import Linear4bit

COMPUTE_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantize(model, cfg, ctx) -> dict:
    quant_type = cfg.method.name  # nf4 | fp4: the code book
    blocksize, double_quant = resolved_group_size(cfg), bool(cfg.method.double_quant)
    compute_dtype = COMPUTE_DTYPES[cfg.method.compute_dtype]
    stored = {"bits": 0.0, "weights": 0}

    def make_layer(name, linear):
        layer = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype, cfg.kernel)
        stored["bits"] += layer.weight_bits() * linear.weight.numel()
        stored["weights"] += linear.weight.numel()
        return layer

    count = replace_linears(model, cfg, ctx, make_layer, quant_type)
    return {"quantized_layers": count, "quant_type": quant_type, "blocksize": blocksize,
            "double_quant": double_quant, "compute_dtype": cfg.method.compute_dtype,
            "bits_per_weight": stored["bits"] / max(stored["weights"], 1)}
