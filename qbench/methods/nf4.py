"""NF4 (and, through qbench.methods.fp4, FP4): every linear becomes a Linear4bit in bitsandbytes' layout."""

import torch

from qbench.config import resolved_group_size
from qbench.quant.modules import quantizable_linears, set_module
from qbench.quant.nf4 import Linear4bit

COMPUTE_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantize(model, cfg, ctx) -> dict:
    quant_type = cfg.method.name  # nf4 | fp4: the code book
    blocksize, double_quant = resolved_group_size(cfg), bool(cfg.method.double_quant)
    compute_dtype = COMPUTE_DTYPES[cfg.method.compute_dtype]
    linears = quantizable_linears(model, cfg.quantize_lm_head)
    stored_bits, weights = 0.0, 0
    count = len(linears)
    for name in ctx.progress(list(linears), quant_type, total=count):
        linear = linears.pop(name)  # its last reference: the float weight is freed once replaced
        layer = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype, cfg.kernel)
        set_module(model, name, layer)
        stored_bits += layer.weight_bits() * linear.weight.numel()
        weights += linear.weight.numel()
    return {"quantized_layers": count, "quant_type": quant_type, "blocksize": blocksize,
            "double_quant": double_quant, "compute_dtype": cfg.method.compute_dtype,
            "bits_per_weight": stored_bits / max(weights, 1)}
