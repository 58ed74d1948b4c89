"""HQQ (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"), written from
the paper and checked against the mobiusml/hqq package (0.2.8: hqq/core/optimize.py, quantize.py).

No calibration data: per group of input channels (the package's axis=1) of each linear, with the
min/max grid as the start (inverse scale s = maxq / (max - min), zero z = -min * s, rounded at 4 bits
as the package's BaseQuantizeConfig does), the zero points are fitted to minimise the lp "norm"
(p < 1, robust to the outlier weights) of the weight error,
    min_z  || W - Q_z^-1(Q_z(W)) ||_p^p,    Q_z(W) = clamp(round(W s + z), 0, maxq),  Q_z^-1(q) = (q - z) / s,
by half-quadratic splitting with an auxiliary error W_e (the scale stays fixed), iterated:
    W_q = Q_z(W)                                   codes of the current zero
    W_e = shrink_p(W - Q_z^-1(W_q), beta)          sign(e) relu(|e| - |e|^(p-1) / beta)  (generalised soft threshold)
    z   = mean over the group of (W_q - (W - W_e) s)   the closed-form zero of the quadratic subproblem
    beta <- kappa beta
Defaults as the package's: p = 0.7, beta = 10, kappa = 1.01, 20 iterations, stopped early once the
layer's mean |W - Q_z^-1(Q_z(W))| stops decreasing. There the package returns the zero computed from
the first non-improving one; qbench keeps the best zero it evaluated, so its error is never above the
start's. Optionally the zeros (8 bits, one range per layer) and the scales (8 bits, groups of 128
output channels) are quantized afterwards, the paper's meta-data quantization; the codes are then
rounded again with the stored zeros and scales. The float zeros go through qbench's integer kernels
as an integer zero plus a float16 min term (qbench/quant/float_zero.py). Unlike the package (whose
groups run over the flattened weight and need group_size to divide it), groups never cross rows and
the last one of a row is shorter when group_size does not divide in_features.
"""

import torch

from qbench.config import resolved_bits, resolved_group_size
from qbench.quant.float_zero import FloatZeroLinear
from qbench.quant.modules import replace_linears


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of |x|^p / beta, generalised soft thresholding (paper eq. 6; p = 1: soft threshold)."""
    a = x.abs()
    return torch.sign(x) * (a - a.pow(p - 1) / beta).clamp(min=0) if p < 1 else torch.sign(x) * (a - 1 / beta).clamp(min=0)


def _chunks(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """[rows, size] views of the groups: the full groups of every row, then the short last ones."""
    out_f, in_f = w.shape
    size = in_f if group_size == -1 or group_size >= in_f else group_size
    full = in_f // size * size
    chunks = [w[:, :full].reshape(-1, size)] if full else []
    return chunks + ([w[:, full:]] if full < in_f else [])


def init_grid(w: torch.Tensor, bits: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max start per row of a [rows, size] chunk: (dequantization scale as float16 stores it, zero),
    float32 [rows, 1]. A range under 1e-4 gets scale 1, as the package's."""
    maxq = 2**bits - 1
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    inv = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(lo), maxq / (hi - lo)).clamp(max=2e4)
    scale = (1 / inv).half().float()  # the stored scale; the codes are computed from it
    zero = -lo / scale
    return scale, torch.round(zero) if round_zero else zero


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale + zero), 0, 2**bits - 1)


@torch.no_grad()
def optimize_zeros(chunks: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor], bits: int,
                   lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20,
                   early_stop: bool = True) -> tuple[list[torch.Tensor], dict]:
    """The half-quadratic zero-point solver over one layer's chunks (jointly: the early stop watches the
    layer's mean |error|). Returns the zeros and {iterations, error_start, error}."""
    count = sum(c.numel() for c in chunks)
    best, best_zeros, history = float("inf"), zeros, []
    for _ in range(iters):
        codes = [codes_of(w, s, z, bits) for w, s, z in zip(chunks, scales, zeros)]
        errors = [w - (q - z) * s for w, q, s, z in zip(chunks, codes, scales, zeros)]
        err = sum(e.abs().sum().item() for e in errors) / count
        history.append(err)
        if err < best:
            best, best_zeros = err, zeros
        elif early_stop:
            break
        zeros = [torch.mean(q - (w - shrink_lp(e, beta, lp_norm)) / s, dim=1, keepdim=True)
                 for w, q, s, e in zip(chunks, codes, scales, errors)]
        beta *= kappa
    return best_zeros, {"iterations": len(history), "error_start": history[0], "error": best}


def quantize_meta(v: torch.Tensor, group: int | None) -> torch.Tensor:
    """8-bit min/max round trip of a [G, N] zero or scale tensor: one range for the whole tensor (group
    None, the package's zero setting) or per `group` consecutive output channels (its scale setting: 128)."""
    rows = v.reshape(1, -1) if group is None else v.reshape(-1)[: v.numel() // group * group].reshape(-1, group)
    parts = [rows] + ([] if group is None or v.numel() % group == 0 else [v.reshape(-1)[rows.numel():][None]])
    out = []
    for part in parts:
        scale, zero = init_grid(part.float(), 8, round_zero=False)
        out.append(((codes_of(part.float(), scale, zero, 8) - zero) * scale).reshape(-1))
    return torch.cat(out).reshape(v.shape)


def hqq_quantize(weight: torch.Tensor, bits: int, group_size: int, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """HQQ of a [out, in] weight: (codes [out, in], scales [G, out] float16, zeros [G, out] float32, info)."""
    w = weight.float()
    out_f, in_f = w.shape
    chunks = _chunks(w, group_size)
    starts = [init_grid(c, bits, s["round_zero"]) for c in chunks]
    scales, zeros = [a for a, _ in starts], [b for _, b in starts]
    info = {"iterations": 0}
    if s["optimize"]:
        zeros, info = optimize_zeros(chunks, scales, zeros, bits, s["lp_norm"], s["beta"], s["kappa"], s["iters"],
                                     s["early_stop"])
    # chunks -> [G, out]: a full chunk's rows are (row, group) pairs in row order
    scale_g = torch.cat([x.reshape(out_f, -1) for x in scales], dim=1).T.contiguous()
    zero_g = torch.cat([x.reshape(out_f, -1) for x in zeros], dim=1).T.contiguous()
    if s["quant_scale"]:
        scale_g = quantize_meta(scale_g, 128).half().float()
    if s["quant_zero"]:
        zero_g = quantize_meta(zero_g, None)
    size = in_f if group_size == -1 or group_size >= in_f else group_size
    g = torch.arange(in_f, device=w.device) // size
    codes = codes_of(w, scale_g[g].T, zero_g[g].T, bits).to(torch.uint8)
    return codes, scale_g.half(), zero_g, info


def _settings(cfg) -> dict:
    m, bits = cfg.method, resolved_bits(cfg)
    s = {"bits": bits, "group_size": resolved_group_size(cfg), "lp_norm": float(m.lp_norm), "beta": float(m.beta),
         "kappa": float(m.kappa), "iters": int(m.iters), "early_stop": bool(m.early_stop), "optimize": bool(m.optimize),
         "round_zero": bits == 4 if m.round_zero == "auto" else bool(m.round_zero),
         "quant_zero": bool(m.quant_zero), "quant_scale": bool(m.quant_scale)}
    if not 0.1 <= s["lp_norm"] <= 1 or s["beta"] <= 0 or s["kappa"] < 1 or s["iters"] < 1:  # conf ranges, for direct callers
        raise ValueError(f"hqq needs 0.1 <= lp_norm <= 1, beta > 0, kappa >= 1, iters >= 1; got {s}")
    return s


def storage_bits(bits: int, group_size: int, in_features: int, s: dict) -> float:
    """Bits per weight of HQQ's own storage: the codes, one scale and one zero per group (16 bits each, 8
    with meta-data quantization plus its per-128 fp16 scale and zero for the scales)."""
    size = in_features if group_size == -1 else min(group_size, in_features)
    scale_bits = 8 + 32 / 128 if s["quant_scale"] else 16
    return bits + (scale_bits + (8 if s["quant_zero"] else 16)) / size


@torch.no_grad()
def quantize(model, cfg, ctx) -> dict:
    s = _settings(cfg)
    stored, layers = {"bits": 0.0, "weights": 0}, {}

    def make_layer(name, linear):
        codes, scales, zeros, layers[name] = hqq_quantize(linear.weight.data, s["bits"], s["group_size"], s)
        stored["bits"] += storage_bits(s["bits"], s["group_size"], linear.in_features, s) * linear.weight.numel()
        stored["weights"] += linear.weight.numel()
        return FloatZeroLinear.from_float_zero(codes, scales, zeros, s["bits"], s["group_size"], linear.bias, cfg.kernel)

    count = replace_linears(model, cfg, ctx, make_layer)
    its = [i["iterations"] for i in layers.values()]
    return {"quantized_layers": count, "settings": s, "hqq_bits_per_weight": stored["bits"] / max(stored["weights"], 1),
            "iterations_mean": sum(its) / max(len(its), 1), "layers": layers}
