"""LLM.int8(): every linear becomes an Int8Linear (vector-wise int8 + 16-bit outlier columns)."""

from qbench.quant.int8 import Int8Linear
from qbench.quant.modules import replace_linears


def quantize(model, cfg, ctx) -> dict:
    threshold = float(cfg.method.threshold)
    if threshold < 0:
        raise ValueError(f"method.threshold must be >= 0 (0 = no decomposition), got {threshold}")
    count = replace_linears(model, cfg, ctx,
                            lambda name, linear: Int8Linear(linear.weight.data, linear.bias, threshold, cfg.kernel))
    return {"quantized_layers": count, "threshold": threshold,
            "decomposition": threshold > 0}


def after_eval(model, cfg, ctx) -> dict:
    """Outlier columns seen during evaluation: per layer, and their mean and max over layers. Every
    forward call counts: perplexity windows, and KLD, zero-shot and speed calls (random token ids)
    when those are on."""
    layers = {name: m.outlier_stats() for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    seen = [s["outlier_fraction"] for s in layers.values() if s["calls"]]
    if not seen:
        return {"outliers": layers}
    return {"outlier_fraction_mean": sum(seen) / len(seen), "outlier_fraction_max": max(seen), "outliers": layers}
