"""The compressed-tensors checkpoint layout (the one vLLM and llm-compressor load), written from a model
whose linears qbench quantized: QuantLinear (RTN, GPTQ, AWQ, AutoRound), FloatZeroLinear when its zeros
are integers (HQQ without the solver), FP8Linear (E4M3). Checked against compressed-tensors 0.20.1
(compressors/pack_quantized, compressors/naive_quantized, quantization/lifecycle/forward.py).

A directory holds model.safetensors, config.json with `quantization_config` (quant_method
compressed-tensors, quantization_status compressed, one config group targeting Linear, `ignore` naming
the linears left unquantized, e.g. lm_head) and the tokenizer files. Per quantized linear <name>, with
K = in_features, N = out_features, G groups (G = 1 for strategy channel, group_size=-1):

Integer weights, format pack-quantized (1 to 8 bits):
    <name>.weight_packed      int32 [N, ceil(K*bits/32)]  codes along K, a little-endian bit stream per row
                                                          (32 codes in `bits` words): QuantLinear.qweight^T
    <name>.weight_scale       [N, G]                      qbench's float16 scales: float16 for a float16
                                                          model, else the same values in float32
    <name>.weight_zero_point  int32 [ceil(N*bits/32), G]  asymmetric only: zeros packed along N the same
                                                          way: QuantLinear.qzeros^T (no GPTQ "-1" offset)
    <name>.weight_shape       int64 [2] = [N, K]
compressed-tensors reads a packed field p as the signed p - 2**(bits-1), codes and zeros alike, and
dequantizes (q - zp) * scale; the offsets cancel, so w = scale * (code - zero), qbench's grid exactly.
A symmetric grid stores no zero point: its zero, 2**(bits-1) here, is 0 there.

FP8 weights, format naive-quantized (weight-only) or float-quantized (activations=dynamic: per-token
dynamic E4M3 inputs, as qbench's W8A8):
    <name>.weight        float8_e4m3fn [N, K]
    <name>.weight_scale  float32 [1] (strategy tensor) or [N, 1] (strategy channel)

Every other tensor is stored as in the model; a tied lm_head is not stored twice; biases take the
model's dtype. What the format cannot hold is refused, before load where the config says it
(`unsupported`), else before quantization (`check_linears`) or at export:
- groups that do not divide in_features (qbench lets the last group be shorter);
- a g_idx other than k // group_size: compressed-tensors dropped actorder=group, the act-order layout
  with weight_g_idx, so GPTQ act_order needs static_groups=true or group_size=-1 (then its order only
  changed the calibration: actorder=weight);
- float zero points (HQQ's solver, quant_zero): only hqq optimize=false with rounded zeros, and even
  then a group whose zero falls outside [0, 2**bits) (all its weights of one sign) fails at export;
- FP8 E5M2 (compressed-tensors' 8-bit float is E4M3 only).
torch is imported inside the functions: `unsupported` runs in config validation, before torch loads.
"""

from pathlib import Path

SUPPORTED = "rtn, gptq, awq, autoround, hqq (optimize=false, integer zeros), fp8 (format=e4m3)"
CT_VERSION = "0.20.1"  # the compressed-tensors release this layout was checked against


def unsupported(cfg) -> str | None:
    """Why export.format=compressed-tensors cannot hold this run's weights (one line), or None."""
    m, name = cfg.method, cfg.method.name
    prefix = "export.format=compressed-tensors"
    if name not in ("rtn", "gptq", "awq", "autoround", "hqq", "fp8"):
        return f"{prefix} does not support method {name}; supported: {SUPPORTED}"
    group_size = m.default_group_size if cfg.group_size is None else cfg.group_size
    if name == "gptq" and m.act_order and not m.static_groups and group_size != -1:
        return (f"{prefix} has no act-order g_idx layout (compressed-tensors removed actorder=group): gptq with "
                "method.act_order=true needs method.static_groups=true or group_size=-1")
    if name == "hqq":
        bits = m.default_bits if cfg.bits is None else cfg.bits
        round_zero = bits == 4 if m.round_zero == "auto" else bool(m.round_zero)  # as qbench.methods.hqq
        if not (m.optimize or m.quant_zero or not round_zero):
            return None
        return (f"{prefix} stores integer zero points only: hqq needs method.optimize=false, method.quant_zero=false "
                "and rounded zeros (method.round_zero=true, or auto at bits=4)")
    if name == "fp8" and m.format != "e4m3":
        return f"{prefix} stores FP8 as E4M3 only; method.format={m.format} is not supported (use e4m3)"
    return None


def check_linears(model, cfg) -> None:
    """Before quantization: every group divides its linear's in_features (the format has no shorter last group)."""
    from qbench.quant.modules import quantizable_linears

    group_size = cfg.method.default_group_size if cfg.group_size is None else cfg.group_size
    if cfg.method.name == "fp8" or group_size in (None, -1):
        return
    for name, linear in quantizable_linears(model, cfg.quantize_lm_head).items():
        if linear.in_features % group_size:
            raise ValueError(f"export.format=compressed-tensors needs groups that divide in_features: {name} has "
                             f"{linear.in_features} (group_size={group_size}); use a divisor or group_size=-1")


def _int_scheme(name: str, layer) -> dict:
    """The compressed-tensors weight args of an integer layer; raises where the layer does not fit."""
    import torch

    from qbench.quant.float_zero import FloatZeroLinear
    from qbench.quant.grid import default_g_idx

    K, bits, size = layer.in_features, layer.bits, layer.group_size
    if not 1 <= bits <= 8:
        raise ValueError(f"{name}: compressed-tensors packs 1 to 8 bits, not {bits}")
    if size != -1 and K % size:
        raise ValueError(f"{name}: group_size {size} does not divide in_features {K} (compressed-tensors groups must)")
    if not torch.equal(layer.g_idx.cpu(), default_g_idx(K, size)):
        raise ValueError(f"{name}: act-order g_idx; compressed-tensors has no layout for it (use static_groups=true)")
    if isinstance(layer, FloatZeroLinear) and bool(layer.mins.any()):
        raise ValueError(f"{name}: zero points that are not integers in [0, {2**bits}) (HQQ float zeros); "
                         "compressed-tensors stores integer zeros only")
    if layer.sym and bool((layer.unpacked().zeros != 2 ** (bits - 1)).any()):
        raise ValueError(f"{name}: a symmetric layer whose zero is not {2 ** (bits - 1)}")
    return {"num_bits": bits, "type": "int", "symmetric": bool(layer.sym), "group_size": None if size == -1 else size,
            "strategy": "channel" if size == -1 else "group", "dynamic": False}


def _int_tensors(layer, dtype) -> dict:
    """Local tensor names -> tensors of an integer layer: qbench's packed words are the format's, transposed.
    Readers dequantize in the scale's dtype: float16 scales (qbench's) for a float16 model, whose weights
    qbench rounds to float16 the same way; the same values in float32 for other models, so that a float32
    or bfloat16 model's weights are not rounded to float16 on the way."""
    import torch

    scale_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    out = {"weight_packed": layer.qweight.T.contiguous(), "weight_scale": layer.scales.T.to(scale_dtype).contiguous(),
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not layer.sym:
        out["weight_zero_point"] = layer.qzeros.T.contiguous()
    return out


def _fp8_scheme(name: str, layer) -> tuple[dict, dict | None]:
    if layer.fmt != "e4m3":
        raise ValueError(f"{name}: FP8 {layer.fmt}; compressed-tensors stores E4M3 only")
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
               "strategy": "channel" if layer.scale_mode == "channel" else "tensor", "dynamic": False}
    inputs = None
    if layer.activations == "dynamic":  # qbench.quant.fp8.quantize_tokens: absmax / 448 per token
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                  "dynamic": True}
    return weights, inputs


def _fp8_tensors(layer) -> dict:
    scale = layer.weight_scale.float()
    return {"weight": layer.weight_fp8.contiguous(), "weight_scale": scale[:, None] if scale.numel() > 1 else scale}


def layer_layout(name: str, layer, dtype) -> tuple[dict, dict]:
    """(scheme, tensors) of one quantized layer: its compressed-tensors QuantizationScheme as a dict and its
    tensors by local name (bias excluded)."""
    from qbench.quant.fp8 import FP8Linear

    if isinstance(layer, FP8Linear):
        weights, inputs = _fp8_scheme(name, layer)
        fmt, tensors = "float-quantized" if inputs else "naive-quantized", _fp8_tensors(layer)
    else:
        weights, inputs, fmt, tensors = _int_scheme(name, layer), None, "pack-quantized", _int_tensors(layer, dtype)
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None,
              "format": fmt}
    return scheme, tensors


def quantized_layers(model) -> dict:
    from qbench.quant.fp8 import FP8Linear
    from qbench.quant.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, FP8Linear))}


def quantization_config(scheme: dict, ignore: list[str]) -> dict:
    return {"quant_method": "compressed-tensors", "format": scheme["format"], "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}


def save_compressed_tensors(model, tokenizer, path: str, method: str, act_order: bool = False) -> dict:
    """Write the quantized model as a compressed-tensors directory; returns its quantization_config.
    act_order (GPTQ, default g_idx) is recorded as actorder=weight: it changed only the calibration."""
    import torch

    from qbench import __version__
    from qbench.quant.gptq_format import write_quantized_dir

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no quantized linears to export")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    layouts = {name: layer_layout(name, layer, dtype) for name, layer in layers.items()}
    scheme = next(iter(layouts.values()))[0]
    for name, (other, _) in layouts.items():
        if other != scheme:  # qbench's methods quantize every linear alike: one config group
            raise ValueError(f"{name} is quantized unlike the other layers ({other['weights']} vs {scheme['weights']})")
    if act_order:
        scheme["weights"]["actorder"] = "weight"
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    tied = isinstance(head, torch.nn.Linear) and head.weight is model.get_input_embeddings().weight
    tensors = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if (tied and prefix == head_name) or (prefix in layers and leaf != "bias"):
            continue
        tensors[key] = (value.to(dtype) if prefix in layers else value).detach().contiguous().cpu()
    for name, (_, local) in layouts.items():
        tensors.update({f"{name}.{leaf}": t.detach().contiguous().cpu() for leaf, t in local.items()})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    qconfig = quantization_config(scheme, ignore)
    write_quantized_dir(out, model, tokenizer, tensors, qconfig, dtype, head_name in layers,
                        {"format": "pt", "quantizer": f"qbench:{__version__}", "method": method})
    return qconfig
