"""AWQ (Lin et al., 2023), written from the paper and the mit-han-lab/llm-awq reference (auto_scale.py,
auto_clip.py, pre_quant.py).

Block by block, on the calibration activations of the unquantized model (the reference feeds each
block the float outputs of the block before it, computed before that block is scaled or clipped):
1. record the inputs of every linear of the block;
2. scale search, per group of linears reading one operator's output (qbench.quant.blocks ARCHS
   "scales": input_layernorm -> q/k/v judged on self_attn's output, v_proj -> o_proj, post-attention
   norm -> gate/up judged on the MLP's output, up_proj -> down_proj): s = mean|x|^alpha per input
   channel, alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}, clamped at 1e-4 and normalised by
   sqrt(max(s) * min(s)); the linears' weights become Q(W * s) / s and the alpha with the smallest
   mean squared error of the judged output wins (alpha = 0 is s = 1, kept unless strictly beaten).
   As in the reference only the activation term is used (no weight-magnitude term), and v_proj -> o_proj
   is searched only when v_proj's outputs are o_proj's inputs: with grouped-query attention (fewer k/v
   heads) its shapes differ and o_proj is not scaled, as the reference does;
3. fold: the operator before is divided by s (RMSNorm weight; rows of v_proj/up_proj), the linears'
   input columns multiplied by s, the recorded inputs divided by s. The block's function is unchanged;
4. clip search for every linear but q/k: per (output row, group), max_val = absmax * (1 - i/n_grid),
   i < max_shrink * n_grid, minimising the mean squared error of the group's partial products on 512
   tokens taken with a stride from the recorded inputs (through each group's Gram matrix: the same
   value with fewer operations); the weights are clamped to [-max_val, max_val];
5. grouped round-to-nearest onto qbench.quant.grid -> QuantLinear. By default on the reference's grid
   (`method.zero_in_range` false: each group's own [min, max], as pseudo_quantize_tensor), which steps
   2-4 use too; `method.zero_in_range=true` keeps 0 inside every group's range (the GPTQ/RTN default,
   and qbench's AWQ before the option existed). Unlike the reference, partial last groups are allowed.
"""

import time

import torch
from torch import nn

from qbench.calib import each_block, start_blockwise
from qbench.config import resolved_bits, resolved_group_size
from qbench.quant.blocks import block_output, record_inputs, synchronize
from qbench.quant.grid import fake_quantize, find_params, rtn_quantize
from qbench.quant.qlinear import replace_with_quantized


def _fake_quant_rows(w: torch.Tensor, bits: int, sym: bool, zero_in_range: bool = True) -> torch.Tensor:
    """Each row of a 2-D tensor rounded onto its own grid."""
    scale, zero = find_params(w, bits, sym, zero_in_range)
    return fake_quantize(w, scale[:, None], zero[:, None], bits)


def group_fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool, zero_in_range: bool = True) -> torch.Tensor:
    """Grouped RTN of a [out, in] weight in float32, vectorised (equals rtn_quantize(...).dequantize())."""
    w = w.float()
    out_f, in_f = w.shape
    size = in_f if group_size == -1 else group_size
    full = in_f // size * size
    parts = [_fake_quant_rows(w[:, :full].reshape(-1, size), bits, sym, zero_in_range).reshape(out_f, full)]
    if full < in_f:
        parts.append(_fake_quant_rows(w[:, full:], bits, sym, zero_in_range))
    return torch.cat(parts, dim=1)


def _spans(in_f: int, group_size: int) -> list[tuple[int, int, int]]:
    """(start, width, group size) runs of equal groups: the full groups, then the partial last one."""
    size = in_f if group_size == -1 else group_size
    full = in_f // size * size
    return ([(0, full, size)] if full else []) + ([(full, in_f - full, in_f - full)] if full < in_f else [])


class _Inputs:
    """The recorded inputs of one linear, batch by batch (replaced by inputs / s once s is folded)."""

    def __init__(self):
        self.batches: list[torch.Tensor] = []

    def tokens(self) -> torch.Tensor:
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.batches])

    def abs_mean(self) -> torch.Tensor:
        total = sum(x.reshape(-1, x.shape[-1]).abs().float().sum(0) for x in self.batches)
        return total / sum(x.numel() // x.shape[-1] for x in self.batches)


@torch.no_grad()
def search_scale(judged: nn.Module, linears: list[nn.Linear], inputs: _Inputs, kwargs: list[dict],
                 bits: int, group_size: int, sym: bool, n_grid: int,
                 zero_in_range: bool = True) -> tuple[torch.Tensor, dict]:
    """The scales s minimising the judged module's output error when the linears are quantized as
    Q(W * s) / s. Returns s (float32, [in]) and {alpha, loss, loss_s1} for the record."""
    originals = [lin.weight.data.clone() for lin in linears]

    def forward():
        return [block_output(judged, x, kw) if kw is not None else judged(x) for x, kw in zip(inputs.batches, kwargs)]

    reference = forward()
    x_mean = inputs.abs_mean()
    best, history = None, []
    for step in range(n_grid):
        alpha = step / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w in zip(linears, originals):
            lin.weight.data = (group_fake_quant(w.float() * s, bits, group_size, sym, zero_in_range) / s).to(w.dtype)
        outs = forward()
        sq = sum((o - r).float().pow(2).sum().item() for o, r in zip(outs, reference))
        loss = sq / sum(r.numel() for r in reference)
        history.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    loss, alpha, s = best
    return s, {"alpha": alpha, "loss": loss, "loss_s1": history[0]}


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold 1/s into the operator before (norm weight or the previous linear's output rows) and s into
    the linears' input columns; the composed function is unchanged up to rounding."""
    if isinstance(prev, nn.Linear):
        rows = prev.weight.data[-s.numel():]
        rows.copy_((rows.float() / s[:, None]).to(rows.dtype))
        if prev.bias is not None:
            prev.bias.data[-s.numel():] = (prev.bias.data[-s.numel():].float() / s).to(prev.bias.dtype)
    else:  # a norm whose weight multiplies its output (LayerNorm, RMSNorm)
        prev.weight.data = (prev.weight.data.float() / s).to(prev.weight.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, zero_in_range: bool = True) -> torch.Tensor:
    """Per (row, group) clipping threshold of a [out, in] weight given its [tokens, in] inputs: the
    shrunk absmax minimising the mean over tokens of (x_g . (Q(clip(w_g)) - w_g))^2, the squared error
    of the group's partial product (every len//n_tokens-th token, as the reference). That mean is
    d^T (X_g^T X_g / T) d with d = Q(clip(w_g)) - w_g, computed from each group's Gram matrix (the
    reference's value with fewer operations). Returns [out, in] thresholds, each group's repeated."""
    x = x[:: max(1, x.shape[0] // n_tokens)].float()
    w = w.float()
    out_f, in_f = w.shape
    best_all = torch.empty_like(w)
    for start, width, size in _spans(in_f, group_size):
        groups = width // size
        xg = x[:, start : start + width].reshape(-1, groups, size).transpose(0, 1)  # groups, tokens, size
        gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]  # groups, size, size
        wg = w[:, start : start + width].reshape(out_f, groups, size).transpose(0, 1)  # groups, out, size
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # groups, out, 1
        best_max, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(wg, max_val), -max_val)
            d = _fake_quant_rows(cur.reshape(-1, size), bits, sym, zero_in_range).reshape(cur.shape) - wg
            err = (torch.bmm(d, gram) * d).sum(dim=-1, keepdim=True)  # groups, out, 1
            better = err < min_err
            min_err[better], best_max[better] = err[better], max_val[better]
        best_all[:, start : start + width] = best_max.expand(wg.shape).transpose(0, 1).reshape(out_f, width)
    return best_all


def _settings(cfg) -> dict:
    m = cfg.method
    return {"bits": resolved_bits(cfg), "group_size": resolved_group_size(cfg), "sym": bool(m.sym),
            "zero_in_range": bool(m.zero_in_range), "n_grid": int(m.n_grid), "clip": bool(m.clip),
            "clip_n_grid": int(m.clip_n_grid), "clip_max_shrink": float(m.clip_max_shrink),
            "clip_n_tokens": int(m.clip_n_tokens),
            "scale": "mean|x|^alpha, normalised by sqrt(max*min)", "block_inputs": "float model"}


def scalable(block: nn.Module, prev_name: str, linear_names: list[str]) -> bool:
    """Can 1/s be folded into the operator before? (a previous linear must feed these inputs exactly)"""
    prev = block.get_submodule(prev_name)
    if isinstance(prev, nn.Linear):
        return prev.out_features == block.get_submodule(linear_names[0]).in_features
    return True


@torch.no_grad()
def awq_block(block: nn.Module, batches: list[tuple], arch: dict, s: dict) -> tuple[list[tuple], dict]:
    """Scale, clip and quantize one block in place. Returns the float block's outputs and a summary."""
    names = [n for n, mod in block.named_modules() if isinstance(mod, nn.Linear)]
    inputs = {n: _Inputs() for n in names}
    outputs = record_inputs(block, batches, names, lambda name, x: inputs[name].batches.append(x))
    kwargs = [kw for _, kw in batches]
    summary = {"scales": {}, "clipped": []}
    for prev_name, linear_names, judged_name in arch["scales"]:
        if not scalable(block, prev_name, linear_names):
            summary["scales"][prev_name] = "skipped: shapes differ (grouped-query attention)"
            continue
        linears = [block.get_submodule(n) for n in linear_names]
        judged = block.get_submodule(judged_name) if judged_name else linears[0]
        judged_kwargs = kwargs if judged_name == arch["attention"] else [None] * len(kwargs)
        scale, info = search_scale(judged, linears, inputs[linear_names[0]], judged_kwargs,
                                   s["bits"], s["group_size"], s["sym"], s["n_grid"], s["zero_in_range"])
        apply_scale(block.get_submodule(prev_name), linears, scale)
        scaled = [(x.float() / scale).to(x.dtype) for x in inputs[linear_names[0]].batches]
        for n in linear_names:  # the recorded inputs now see 1/s (prepares the clip search)
            inputs[n].batches = scaled
        summary["scales"][prev_name] = info
    for name in names:
        lin = block.get_submodule(name)
        if s["clip"] and name not in arch["no_clip"]:
            max_val = search_clip(lin.weight.data, inputs[name].tokens(), s["bits"], s["group_size"], s["sym"],
                                  s["clip_n_grid"], s["clip_max_shrink"], s["clip_n_tokens"], s["zero_in_range"])
            lin.weight.data = torch.maximum(torch.minimum(lin.weight.data.float(), max_val), -max_val).to(lin.weight.dtype)
            summary["clipped"].append(name)
    return outputs, summary


@torch.no_grad()
def quantize(model, cfg, ctx) -> dict:
    s = _settings(cfg)
    t0 = time.perf_counter()
    start = start_blockwise(model, cfg, ctx)
    arch, targets, batches = start.arch, start.targets, start.batches
    timings = {"capture_s": start.capture_s}
    blocks, done = {}, set()
    for prefix, layer in each_block(model, arch, ctx, "awq"):
        batches, blocks[prefix.rstrip(".")] = awq_block(layer, batches, arch, s)
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, nn.Linear) and prefix + name in targets:
                qw = rtn_quantize(lin.weight.data, s["bits"], s["group_size"], s["sym"], s["zero_in_range"])
                replace_with_quantized(layer, name, qw, cfg.kernel)
                done.add(prefix + name)
    for name in sorted(set(targets) - done):  # lm_head (quantize_lm_head=true): plain RTN, as the reference leaves it
        qw = rtn_quantize(targets[name].weight.data, s["bits"], s["group_size"], s["sym"], s["zero_in_range"])
        replace_with_quantized(model, name, qw, cfg.kernel)
        blocks[name] = "rtn (outside the decoder blocks)"
        done.add(name)
    synchronize(ctx.device)
    timings["blocks_s"] = time.perf_counter() - t0 - timings["capture_s"]
    return {"quantized_layers": len(done), "settings": s, "calib": start.info, "timings": timings, "blocks": blocks}


def export(model, cfg, ctx, path: str) -> None:
    """A GPTQ-layout checkpoint without act-order (qbench.quant.gptq_format); the AWQ scales are
    already folded into the weights and norms."""
    from qbench.quant.gptq_format import save_checkpoint

    save_checkpoint(model, ctx.tokenizer, path, "awq", False, {"lm_head": bool(cfg.quantize_lm_head)})
