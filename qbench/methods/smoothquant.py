"""SmoothQuant (Xiao et al. 2022), written from the paper and the mit-han-lab/smoothquant reference
(calibration.py get_act_scales, smooth.py smooth_ln_fcs_llama_like, fake_quant.py W8A8Linear).

1. calibration: one pass of the unquantized model over the calibration windows records, for every
   linear, max over tokens of |x_j| per input channel j (the reference's act_scales);
2. smoothing, per group of linears reading one operator's output (qbench.quant.blocks ARCHS "scales"):
       s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (max|W_j| over the group's rows, both clamped at 1e-5)
   1/s folded into the operator before, s into the linears' input columns (AWQ's fold, apply_scale), so
   the float model is unchanged and the activations' outlier channels shrink by s. `smooth=norms` (the
   reference for Llama) smooths input_layernorm -> q/k/v and post_attention_layernorm -> gate/up;
   `smooth=all` also o_proj and down_proj: folded into v_proj / up_proj's output rows where those feed
   them exactly (per-row weight scales absorb it), else (o_proj under grouped-query attention) an explicit
   per-channel multiply of the layer's input before it is quantized;
3. W8A8 for every linear: int8 weights, one absmax scale per output row; int8 activations with one
   absmax scale per token computed on the fly (`activations=dynamic`), or one static scale per layer
   from the calibration maxima, max_j(max|X_j| / s_j) / 127 (`activations=static`, the paper's
   per-tensor static setting); int32 accumulation (qbench.quant.int8, kernels/w8a8.py).
Without smoothing (alpha = 0 is s_j = 1 / max|W_j|, not the identity) the baseline is method=int8
with method.threshold=0: the same W8A8 on the unsmoothed model.
"""

import time

import torch
from torch import nn

from qbench.calib import calibration_ids
from qbench.methods.awq import apply_scale, scalable
from qbench.quant.blocks import arch_of, batch_size_for, decoder_layers
from qbench.quant.int8 import Int8Linear, int8_matmul
from qbench.quant.kernel_choice import use_triton
from qbench.quant.modules import quantizable_linears, replace_linears


class SmoothQuantLinear(Int8Linear):
    """Plain W8A8 (Int8Linear without outlier columns), with an optional explicit input multiplier
    `smooth` [in] (1/s where s could not be folded) and an optional static activation scale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None,
                 act_scale: float | None = None, kernel: str = "auto"):
        super().__init__(weight, bias, threshold=0.0, kernel=kernel)
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self.register_buffer("act_scale", None if act_scale is None else torch.tensor(float(act_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.smooth is not None:
            x2d = x2d * self.smooth.to(x2d.dtype)
        if use_triton(self.kernel, x):
            from qbench.kernels import int8_matmul as triton_int8_matmul

            y = triton_int8_matmul(x2d, self.weight_int8, self.weight_scale, act_scale=self.act_scale)
        else:
            y = self.forward_static(x2d) if self.act_scale is not None else self.forward_torch(
                x2d, torch.zeros(self.in_features, dtype=torch.bool, device=x.device))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def forward_static(self, x2d: torch.Tensor) -> torch.Tensor:
        """Torch reference of static activations: x_q = round(x / act_scale), exact int32 products."""
        x_int8 = torch.round(x2d.float() / self.act_scale).clamp(-127, 127).to(torch.int8)
        acc = int8_matmul(x_int8, self.weight_int8)
        return (acc.float() * self.act_scale * self.weight_scale[None, :]).to(x2d.dtype)

    def extra_repr(self) -> str:
        static = "static" if self.act_scale is not None else "dynamic"
        return f"in={self.in_features}, out={self.out_features}, activations={static}, explicit_smooth={self.smooth is not None}"


@torch.no_grad()
def activation_absmax(model: nn.Module, ids: torch.Tensor, names: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """name -> float32 [in]: max over the calibration tokens of |x_j| at the input of each named linear."""
    device = next(model.parameters()).device
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            amax = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            found[name] = amax if name not in found else torch.maximum(found[name], amax)
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


def smooth_scales(amax: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the weight maximum over all the group's rows."""
    w_max = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in linears]).amax(dim=0).clamp(min=1e-5)
    return (amax.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_model(model: nn.Module, amax: dict[str, torch.Tensor], alpha: float, smooth_all: bool) -> tuple[dict, dict]:
    """Fold the smoothing scales into the model (its float function unchanged). Returns (name -> s folded
    into that linear's inputs, name -> s left as an explicit input multiplier)."""
    arch = arch_of(model)
    folded, explicit = {}, {}
    for index, block in enumerate(decoder_layers(model, arch)):
        prefix = f"{arch['layers']}.{index}."
        for prev_name, linear_names, _ in arch["scales"]:
            prev = block.get_submodule(prev_name)
            if isinstance(prev, nn.Linear) and not smooth_all:
                continue  # the reference smooths the norm-fed linears only
            linears = [block.get_submodule(n) for n in linear_names]
            s = smooth_scales(amax[prefix + linear_names[0]], linears, alpha)
            if scalable(block, prev_name, linear_names):
                apply_scale(prev, linears, s)
                folded.update({prefix + n: s for n in linear_names})
            else:  # e.g. v_proj -> o_proj with grouped-query attention: x / s at the layer's input
                for lin in linears:
                    lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
                explicit.update({prefix + n: s for n in linear_names})
    return folded, explicit


def _settings(cfg) -> dict:
    m = cfg.method
    s = {"alpha": float(m.alpha), "smooth": str(m.smooth), "activations": str(m.activations)}
    if not 0 <= s["alpha"] <= 1:
        raise ValueError(f"method.alpha must be in [0, 1], got {s['alpha']}")
    return s


@torch.no_grad()
def quantize(model, cfg, ctx) -> dict:
    s = _settings(cfg)
    targets = quantizable_linears(model, cfg.quantize_lm_head)
    count = len(targets)
    t0 = time.perf_counter()
    ids, calib_info = calibration_ids(cfg, ctx.tokenizer, ctx.cache)
    amax = activation_absmax(model, ids, list(targets), batch_size_for(ids.shape[1]))
    t1 = time.perf_counter()
    folded, explicit = smooth_model(model, amax, s["alpha"], s["smooth"] == "all")
    del targets  # the walk below holds the only references, so each float weight goes once replaced

    def make_layer(name, linear):
        scale = folded.get(name, explicit.get(name))
        act_scale = None
        if s["activations"] == "static":  # the largest smoothed calibration activation -> 127
            act_scale = float((amax[name] if scale is None else amax[name] / scale).max()) / 127 or 1.0
        smooth = 1 / explicit[name] if name in explicit else None
        return SmoothQuantLinear(linear.weight.data, linear.bias, smooth, act_scale, cfg.kernel)

    replace_linears(model, cfg, ctx, make_layer)
    ratio = [float((a.max() / a.median().clamp(min=1e-8))) for a in amax.values()]
    return {"quantized_layers": count,
            "settings": s, "calib": calib_info, "smoothed": len(folded), "explicit": sorted(explicit),
            "act_max_over_median_mean": sum(ratio) / max(len(ratio), 1),
            "timings": {"calib_s": t1 - t0, "smooth_quantize_s": time.perf_counter() - t1}}
