"""The GPTQ checkpoint layout (AutoGPTQ/GPTQModel format "gptq", read by transformers/optimum): export
of a model whose linears are QuantLinear, and loading such a directory back into QuantLinear.

A directory holds model.safetensors, config.json with `quantization_config` and the tokenizer files.
Per quantized linear <name>, with K = in_features, N = out_features, G groups:
    <name>.qweight  int32 [ceil(K*bits/32), N]  codes packed along K: code k at bits [k*bits, (k+1)*bits)
                                                of a little-endian bit stream over the words of a column
                                                (for 3 bits, 32 codes in 3 words; see packing.py)
    <name>.qzeros   int32 [G, ceil(N*bits/32)]  zero points packed the same way along N, stored as
                                                (zero - 1) mod 2**bits: the "v1" offset, added back on load
    <name>.scales   float16 [G, N]
    <name>.g_idx    int32 [K]                   group of each input channel (act-order permutes it)
    <name>.bias     [N] when the linear has one
Every other tensor is stored as in the model (its dtype, recorded in config.json). A tied lm_head is
not stored twice. The weight of input channel k, output n is scales[g, n] * (code - zero[g, n]) with
g = g_idx[k].

The v1 offset cannot hold zero = 0 exactly for readers that add 1 to the packed words as whole
integers (GPTQModel's v1 -> v2 conversion): the stored field 2**bits - 1 carries into the next field.
Readers that add 1 per field and mask (AutoGPTQ's torch path, this loader) read it exactly. Such
zeros only occur with asymmetric grids; export counts them in quantization_config.meta.
"""

import json
from pathlib import Path

import torch
from torch import nn

from qbench import __version__
from qbench.quant.modules import set_module
from qbench.quant.packing import pack_cols, unpack_cols
from qbench.quant.qlinear import QuantLinear

WEIGHTS = "model.safetensors"
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def to_v1_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """QuantLinear's packed zeros (exact) -> the checkpoint's packed (zero - 1) mod 2**bits."""
    zeros = unpack_cols(qzeros, bits, out_features)
    return pack_cols((zeros - 1) & (2**bits - 1), bits)


def from_v1_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    zeros = unpack_cols(qzeros, bits, out_features)
    return pack_cols((zeros + 1) & (2**bits - 1), bits)


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)


def quantization_config(layers: dict[str, QuantLinear], method: str, desc_act: bool, extra: dict) -> dict:
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.bits, layer.group_size, layer.sym) != (first.bits, first.group_size, first.sym):
            raise ValueError(f"GPTQ checkpoints hold one bit width and group size; {name} differs")
    zero_at_0 = sum(int((unpack_cols(l.qzeros, l.bits, l.out_features) == 0).sum()) for l in layers.values())
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": first.bits,
        "group_size": first.group_size,
        "desc_act": bool(desc_act),
        "sym": bool(first.sym),
        **extra,
        "meta": {"quantizer": [f"qbench:{__version__}"], "method": method, "zero_points_at_0": zero_at_0},
    }


def save_checkpoint(model: nn.Module, tokenizer, path: str, method: str, desc_act: bool, extra: dict | None = None) -> dict:
    """Write the model (its linears QuantLinear) as a GPTQ checkpoint directory; returns its quantization_config."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model has no quantized linears to export")
    qconfig = quantization_config(layers, method, desc_act, extra or {})
    dtype = _float_dtype(model)
    head = model.get_output_embeddings()
    tied = head is not None and not isinstance(head, QuantLinear) and head.weight is model.get_input_embeddings().weight
    head_name = next(n for n, m in model.named_modules() if m is head) if head is not None else None
    tensors = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if tied and prefix == head_name:
            continue
        if prefix in layers and leaf == "qzeros":
            value = to_v1_qzeros(value, layers[prefix].bits, layers[prefix].out_features)
        elif prefix in layers and leaf == "bias":
            value = value.to(dtype)
        tensors[key] = value.detach().contiguous().cpu()
    write_quantized_dir(out, model, tokenizer, tensors, qconfig, dtype, head_name in layers, {"format": "pt"})
    return qconfig


def write_quantized_dir(out: Path, model: nn.Module, tokenizer, tensors: dict, qconfig: dict, dtype,
                        head_quantized: bool, metadata: dict) -> None:
    """A Hugging Face model directory: the weights, config.json with its quantization_config (an lm_head
    quantized on its own unties it from the embedding) and the tokenizer."""
    from safetensors.torch import save_file

    save_file(tensors, str(out / WEIGHTS), metadata=metadata)
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["dtype"] = str(dtype).replace("torch.", "")
    if head_quantized:
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / f"{WEIGHTS}.index.json"
    if index.is_file():  # sharded
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:  # older AutoGPTQ names, e.g. gptq_model-4bit-128g.safetensors
        files = sorted(p.name for p in path.glob("*.safetensors"))
    tensors = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def load_checkpoint(path: str, dtype) -> nn.Module:
    """A GPTQ checkpoint directory -> the model with QuantLinear layers (CPU; the caller moves it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{path}: checkpoint_format {fmt!r} is not a GPTQ layout qbench reads (gptq, gptq_v2)")
    bits, group_size, sym = int(qc["bits"]), int(qc["group_size"]), bool(qc.get("sym", True))
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # qbench builds its own layers; transformers must not
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _read_tensors(path)
    prefixes = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    for prefix in prefixes:
        t = {leaf: tensors.pop(f"{prefix}.{leaf}") for leaf in QUANT_TENSORS}
        bias = tensors.pop(f"{prefix}.bias", None)
        n_groups, out_features = t["scales"].shape
        layer = QuantLinear(t["g_idx"].numel(), out_features, bits, group_size, n_groups, sym, bias is not None)
        qzeros = t["qzeros"] if fmt == "gptq_v2" else from_v1_qzeros(t["qzeros"], bits, out_features)
        layer.qweight.copy_(t["qweight"])
        layer.qzeros.copy_(qzeros)
        layer.scales.copy_(t["scales"])
        layer.g_idx.copy_(t["g_idx"])
        if bias is not None:
            layer.bias = bias.float()
        set_module(model, prefix, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quant_keys = {f"{p}.{leaf}" for p in prefixes for leaf in (*QUANT_TENSORS, "bias")}
    head = model.get_output_embeddings()
    tied = isinstance(head, nn.Linear) and head.weight is model.get_input_embeddings().weight
    missing = [k for k in missing if k not in quant_keys and not (tied and k.startswith("lm_head."))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model
