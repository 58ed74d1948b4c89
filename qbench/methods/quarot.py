"""QuaRot (Ashkboos et al. 2024), written from the paper and the spcl/QuaRot reference (fake_quant:
rotation_utils.py, hadamard_utils.py, quant_utils.py, main.py).

1. untie lm_head from the embeddings (they get different rotations' partners: E Q vs W_head Q);
2. fuse every RMSNorm scale into the linears that read it (input_layernorm -> q/k/v,
   post_attention_layernorm -> gate/up, the final norm -> lm_head): W <- W diag(g), g <- 1.
   RMSNorm without a scale commutes with an orthogonal Q (it only divides by ||x||), which is what
   lets the residual stream be rotated;
3. rotate the residual stream by a random orthogonal Q [hidden, hidden] (QuaRot's random Hadamard:
   the Hadamard matrix with random signs, diag(s) H / sqrt(n); `rotate_mode=random`: a random
   orthogonal matrix from QR), folded offline, in float64:
       embeddings E <- E Q;  q/k/v/gate/up and lm_head W <- W Q (inputs);  o/down W <- Q^T W, b <- Q^T b
   so every hidden state becomes h Q and the float model computes the same function;
4. online Hadamard before down_proj (`online_hadamard`): x <- x H^T at its input on every call (H the
   normalized Hadamard of size intermediate, qbench.quant.hadamard, fast Kronecker transform), W_down <-
   W_down H^T offline; the product of SiLU(gate) * up cannot be rotated offline;
5. value/output head rotation (`rotate_ov`): the per-head Hadamard of size head_dim folded into v_proj's
   output rows (W_v,h <- H W_v,h, per key/value head) and o_proj's input columns (W_o[:, h] <- W_o[:, h] H^T).
   QuaRot also applies the cross-head Hadamard online at o_proj's input; that needs a Hadamard of order
   num_heads (9 for SmolLM2: none exists) and is not done here;
6. weights: RTN on qbench.quant.grid, optionally with QuaRot's clip search (`w_clip`: per output row
   and group, the range shrunk by the ratio r in 1.00, 0.99, ..., 0.21 minimizing sum |w - q(w)|^2.4,
   the reference's WeightQuantizer mse=True grid=100 maxshrink=0.8), or GPTQ (qbench.methods.gptq:
   Hessians of the rotated inputs, down_proj's after the online Hadamard; no clip search), or none;
7. activations (`act_bits` 8 or 4): fake-quantized per token, symmetric, at the input of every linear
   in the blocks (after down_proj's online Hadamard): s = act_clip * max|x| / (2^(b-1) - 1),
   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) (QuaRot's ActQuantizer; the paper runs act_clip 0.9).
   lm_head stays 16-bit on its input (as QuaRot). Fake quantization: no int4 GEMM here.

KV cache (kv_cache=int8|fp8, qbench.kvcache): the residual rotation leaves q/k/v unchanged, so the cache
sees the same keys; with rotate_ov the values are cached in their per-head rotated basis (which
spreads their outliers before the cache's per-token, per-head absmax). Keys after RoPE are NOT rotated
(QuaRot rotates q and k by a head_dim Hadamard after RoPE inside attention): they are quantized by the
cache in their own basis.
"""

import dataclasses
import time

import torch
from torch import nn

from qbench.config import resolved_bits, resolved_group_size
from qbench.methods.gptq import _one_cpu_thread
from qbench.quant.blocks import arch_of, decoder_layers
from qbench.quant.grid import QuantizedWeight, default_g_idx, find_params, quantize_codes, rtn_quantize
from qbench.quant.hadamard import Hadamard, orthogonal
from qbench.quant.modules import replace_linears, set_module
from qbench.quant.qlinear import QuantLinear

# What the rotation needs to know of a Llama-style block (architecture facts as data; paths as in
# qbench.quant.blocks). "reads": linears fed by the residual stream; "writes": linears adding to it.
LLAMA_ROTATION = {
    "norms": [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
              ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])],
    "reads": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"],
    "writes": ["self_attn.o_proj", "mlp.down_proj"],
    "online": "mlp.down_proj",
    "value": "self_attn.v_proj",
    "out": "self_attn.o_proj",
}
ROTATIONS = {"llama": LLAMA_ROTATION, "mistral": LLAMA_ROTATION, "qwen2": LLAMA_ROTATION, "qwen3": LLAMA_ROTATION}
CLIP_RATIOS = [1 - i / 100 for i in range(80)]  # 1.00 .. 0.21, QuaRot's weight clip search
CLIP_NORM = 2.4


def fake_quant_tokens(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Symmetric per-token (last dim) fake quantization with the range clipped to clip * max|x|."""
    maxq = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) * clip / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(xf / scale), -maxq - 1, maxq) * scale).to(x.dtype)


class QuaRotLinear(nn.Module):
    """A linear (float or QuantLinear) behind QuaRot's online steps: the optional Hadamard of its input,
    then per-token activation fake quantization (act_bits 16: none)."""

    def __init__(self, inner: nn.Module, hadamard: Hadamard | None, act_bits: int, act_clip: float):
        super().__init__()
        self.inner, self.hadamard, self.act_bits, self.act_clip = inner, hadamard, act_bits, act_clip
        device = next(iter([*inner.parameters(), *inner.buffers()])).device
        self.register_buffer("had_base", None if hadamard is None else hadamard.base.float().to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard is not None:
            x = self.hadamard.transform(x.float(), self.had_base).to(x.dtype)
        if self.act_bits < 16:
            x = fake_quant_tokens(x, self.act_bits, self.act_clip)
        return self.inner(x)

    def extra_repr(self) -> str:
        had = "none" if self.hadamard is None else self.hadamard.describe()
        return f"online={had}, act_bits={self.act_bits}, act_clip={self.act_clip}"


def rotation_of(model: nn.Module) -> dict:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATIONS:
        raise ValueError(f"quarot: no rotation description for model_type {model_type!r} (known: {', '.join(sorted(ROTATIONS))})")
    return ROTATIONS[model_type]


def _set_weight(module: nn.Module, w: torch.Tensor) -> None:
    module.weight.data = w.to(module.weight.dtype)


def untie(model: nn.Module) -> bool:
    """lm_head gets its own copy of a tied embedding; returns whether it was tied."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return tied


def fuse_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """W <- W diag(g) for each linear reading the norm, then g <- 1."""
    if getattr(norm, "bias", None) is not None or not hasattr(norm, "weight"):
        raise ValueError(f"quarot: {type(norm).__name__} is not an RMSNorm with a scale only")
    g = norm.weight.data.double()
    for lin in linears:
        _set_weight(lin, lin.weight.data.double() * g[None, :])
    norm.weight.data = torch.ones_like(norm.weight.data)


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    arch, rot = arch_of(model), rotation_of(model)
    for block in decoder_layers(model, arch):
        for norm_name, linear_names in rot["norms"]:
            fuse_norm(block.get_submodule(norm_name), [block.get_submodule(n) for n in linear_names])
    fuse_norm(model.get_submodule(arch["final_norm"]), [model.get_output_embeddings()])


def _per_head(w: torch.Tensor, had: Hadamard, head_dim: int) -> torch.Tensor:
    """The Hadamard of each head_dim-wide chunk of the last dim of w (x -> x H^T per head)."""
    return had.transform(w.reshape(*w.shape[:-1], -1, head_dim)).reshape(w.shape)


@torch.no_grad()
def rotate_model(model: nn.Module, Q: torch.Tensor, online: bool, rotate_ov: bool) -> dict:
    """Untie, fuse the norms and fold Q (float64 [hidden, hidden]) and the per-layer Hadamards into the
    weights (module docstring, steps 1-5). The float model's function is unchanged once down_proj reads
    its input through the online Hadamard (wrap_online). Returns what was done, for the record."""
    arch, rot, config = arch_of(model), rotation_of(model), model.config
    tied = untie(model)
    fuse_norms(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    _set_weight(embed, embed.weight.data.double() @ Q)
    _set_weight(head, head.weight.data.double() @ Q)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    down_had = Hadamard(config.intermediate_size) if online else None
    head_had = Hadamard(head_dim) if rotate_ov else None
    for block in decoder_layers(model, arch):
        for name in rot["reads"]:
            lin = block.get_submodule(name)
            _set_weight(lin, lin.weight.data.double() @ Q)
        for name in rot["writes"]:
            lin = block.get_submodule(name)
            _set_weight(lin, Q.T @ lin.weight.data.double())
            if lin.bias is not None:
                lin.bias.data = (Q.T @ lin.bias.data.double()).to(lin.bias.dtype)
        if online:
            down = block.get_submodule(rot["online"])
            _set_weight(down, down_had.transform(down.weight.data.double()))  # W H^T
        if rotate_ov:
            v, o = block.get_submodule(rot["value"]), block.get_submodule(rot["out"])
            _set_weight(v, _per_head(v.weight.data.double().T, head_had, head_dim).T)  # H W_v,h per head
            if v.bias is not None:
                v.bias.data = _per_head(v.bias.data.double(), head_had, head_dim).to(v.bias.dtype)
            _set_weight(o, _per_head(o.weight.data.double(), head_had, head_dim))  # W_o[:, h] H^T
    return {"untied_embeddings": tied, "head_dim": head_dim,
            "online_down_proj": down_had.describe() if online else None,
            "ov_rotation": head_had.describe() if rotate_ov else None}


def wrap_online(model: nn.Module, online: bool, act_bits: int, act_clip: float) -> int:
    """Every linear of the blocks behind a QuaRotLinear (down_proj with its Hadamard when online);
    returns how many were wrapped. Nothing to wrap without online steps."""
    arch, rot = arch_of(model), rotation_of(model)
    if not online and act_bits >= 16:
        return 0
    count = 0
    for block in decoder_layers(model, arch):
        names = [n for step in arch["sequential"] for n in step]
        for name in names:
            had = Hadamard(model.config.intermediate_size) if online and name == rot["online"] else None
            if had is None and act_bits >= 16:
                continue
            set_module(block, name, QuaRotLinear(block.get_submodule(name), had, act_bits, act_clip))
            count += 1
    return count


@_one_cpu_thread  # small ops in a loop: one CPU thread is several times faster on a shared machine
def clip_search_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool, zero_in_range: bool) -> tuple[QuantizedWeight, list]:
    """RTN whose grid per (row, group) comes from the range shrunk by the ratio in CLIP_RATIOS with the
    least sum |w - q(w)|^CLIP_NORM. Returns the codes and the mean chosen ratio per group."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    w = weight.float()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    scales, zeros, chosen = [], [], []
    for start in range(0, in_features, size):
        block = w[:, start : start + size]
        ends = torch.stack([block.min(dim=1).values, block.max(dim=1).values], dim=1)  # the grid reads only these
        best = torch.full((out_features,), float("inf"), device=w.device)
        for r in CLIP_RATIOS:
            s, z = find_params(ends * r, bits, sym, zero_in_range)  # the grid of the shrunk range
            err = quantize_codes(block, s[:, None], z[:, None], bits)
            err = err.sub_(z[:, None]).mul_(s[:, None]).sub_(block).abs_().pow_(CLIP_NORM).sum(dim=1)
            if r == CLIP_RATIOS[0]:
                scale, zero, ratio = s, z, torch.full_like(s, r)
            better = err < best
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
            ratio = torch.where(better, torch.full_like(s, r), ratio)
            best = torch.minimum(best, err)
        codes[:, start : start + size] = quantize_codes(block, scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
        chosen.append(ratio.mean().item())
    qw = QuantizedWeight(codes=codes, scales=torch.stack(scales).half(), zeros=torch.stack(zeros).to(torch.uint8),
                         g_idx=default_g_idx(in_features, group_size, w.device), bits=bits, group_size=group_size, sym=sym)
    return qw, chosen


def _quantize_rtn(model, cfg, ctx, s: dict) -> dict:
    ratios = []

    def make_layer(name, linear):
        if s["w_clip"]:
            qw, chosen = clip_search_rtn(linear.weight.data, s["bits"], s["group_size"], s["sym"], s["zero_in_range"])
            ratios.extend(chosen)
        else:
            qw = rtn_quantize(linear.weight.data, s["bits"], s["group_size"], s["sym"], s["zero_in_range"])
        return QuantLinear.from_quantized(qw, linear.bias, kernel=cfg.kernel)

    count = replace_linears(model, cfg, ctx, make_layer, desc="quarot-rtn")
    return {"quantized_layers": count, "weight_clip_ratio_mean": sum(ratios) / len(ratios) if ratios else 1.0}


def _quantize_gptq(model, cfg, ctx, s: dict) -> dict:
    """qbench.methods.gptq on the rotated model. down_proj's calibration inputs pass its online Hadamard
    first (a forward pre-hook registered before GPTQ's own, so GPTQ's Hessian sees x H^T); the hook goes
    with the nn.Linear when GPTQ replaces it. The block-0 capture is redone (the cached one predates the
    rotation of the embeddings)."""
    from qbench.methods import gptq

    arch, rot = arch_of(model), rotation_of(model)
    handles = []
    if s["online_hadamard"]:
        had = Hadamard(model.config.intermediate_size)
        for block in decoder_layers(model, arch):
            hook = lambda mod, args: (had.transform(args[0].float()).to(args[0].dtype), *args[1:])
            handles.append(block.get_submodule(rot["online"]).register_forward_pre_hook(hook))
    fresh = dataclasses.replace(ctx, cache={k: v for k, v in ctx.cache.items() if not (isinstance(k, tuple) and k[0] == "block0")})
    try:
        info = gptq.quantize(model, cfg, fresh)
    finally:
        for handle in handles:
            handle.remove()
    keep = ("quantized_layers", "calib", "timings", "loss_total")
    return {k: info[k] for k in keep} | {"gptq_settings": info["settings"]}


def _settings(cfg) -> dict:
    m = cfg.method
    s = {"weights": str(m.weights), "bits": resolved_bits(cfg), "group_size": resolved_group_size(cfg),
         "sym": bool(m.sym), "zero_in_range": bool(m.zero_in_range), "w_clip": bool(m.w_clip) and str(m.weights) == "rtn",
         "act_bits": int(m.act_bits), "act_clip": float(m.act_clip), "rotate_mode": str(m.rotate_mode),
         "rotate": bool(m.rotate), "online_hadamard": bool(m.online_hadamard) and bool(m.rotate),
         "rotate_ov": bool(m.rotate_ov) and bool(m.rotate), "seed": int(cfg.seed)}
    if s["act_bits"] not in (4, 8, 16):
        raise ValueError(f"method.act_bits must be 16, 8 or 4, got {s['act_bits']}")
    if not 0 < s["act_clip"] <= 1:
        raise ValueError(f"method.act_clip must be in (0, 1], got {s['act_clip']}")
    s["weight_clip"] = (f"search over {CLIP_RATIOS[0]:.2f}..{CLIP_RATIOS[-1]:.2f} ({len(CLIP_RATIOS)} ratios), "
                        f"|err|^{CLIP_NORM}") if s["w_clip"] else "none (full range)"
    return s


@torch.no_grad()
def quantize(model, cfg, ctx) -> dict:
    s = _settings(cfg)
    rotation_of(model)  # unknown architecture: one line before anything changes
    t0 = time.perf_counter()
    info, q_kind = {}, "none (rotate=false: the plain quantized baseline)"
    if s["rotate"]:
        Q, q_kind = orthogonal(model.config.hidden_size, torch.Generator().manual_seed(s["seed"]), s["rotate_mode"])
        info = rotate_model(model, Q.to(next(model.parameters()).device), s["online_hadamard"], s["rotate_ov"])
    t1 = time.perf_counter()
    if s["weights"] == "rtn":
        quant = _quantize_rtn(model, cfg, ctx, s)
    elif s["weights"] == "gptq":
        quant = _quantize_gptq(model, cfg, ctx, s)
    else:
        quant = {"quantized_layers": 0}
    t2 = time.perf_counter()
    wrapped = wrap_online(model, s["online_hadamard"], s["act_bits"], s["act_clip"])
    kv = "keys after RoPE unrotated (quantized by kv_cache in their own basis)"
    kv += "; values in the per-head Hadamard basis" if s["rotate_ov"] else "; values unrotated"
    return {**quant, "settings": s, "rotation": q_kind, **info, "online_wrapped": wrapped,
            "activations": (f"fake int{s['act_bits']} per token, symmetric, clip {s['act_clip']}, inputs of the "
                            "block linears (lm_head 16-bit)") if s["act_bits"] < 16 else "16-bit",
            "kv_cache_basis": kv,
            "timings": {**quant.get("timings", {}), "rotate_s": t1 - t0, "quantize_s": t2 - t1}}

