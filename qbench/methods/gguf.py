"""GGUF: llama.cpp's block formats and mixes, quantized by our own code, run and exported as GGUF.

Each linear becomes a GGUFLinear holding the raw GGML blocks of its type; the type of each tensor
comes from qbench.quant.gguf_mix (llama.cpp's choice for the mix, including its shape fallbacks).
With quantize_lm_head=true a tied lm_head/embedding is quantized as llama.cpp does (one tensor,
token_embd, used for the input lookup and the output), so the whole file matches llama.cpp's.
"""

from collections import Counter

from qbench.quant import gguf_export, gguf_mix
from qbench.quant.gguf_linear import GGUFLinear
from qbench.quant.modules import quantizable_linears, replace_linears


def _types(model, linears: dict, choice: str) -> dict[str, str]:
    names = gguf_export.gguf_names(model)
    cfg = model.config
    row_lens = {names[n]: lin.in_features for n, lin in linears.items()}
    is_70b = cfg.num_hidden_layers == 80 and cfg.num_attention_heads != cfg.num_key_value_heads
    types = gguf_mix.tensor_types(choice, row_lens, cfg.num_hidden_layers, gguf_export.is_tied(model), is_70b)
    return {n: types[names[n]] for n in linears}


def quantize(model, cfg, ctx) -> dict:
    choice = str(cfg.method.type)
    linears = quantizable_linears(model, cfg.quantize_lm_head)
    types = _types(model, linears, choice)
    del linears  # the walk below holds the only references, so each float weight goes once replaced
    head = model.get_output_embeddings()
    size = {"elements": 0, "bytes": 0}

    def make_layer(name, linear):
        layer = GGUFLinear.from_linear(linear, types[name], kernel=cfg.kernel)
        size["elements"] += linear.in_features * linear.out_features
        size["bytes"] += layer.qweight.numel()
        if linear is head and gguf_export.is_tied(model):
            # llama.cpp looks the input embeddings up in the same quantized tensor
            model.get_input_embeddings().weight.data = layer.dequantize(linear.weight.dtype)
        return layer

    count = replace_linears(model, cfg, ctx, make_layer, f"gguf {choice}")
    return {"type": choice, "bits_per_weight": 8 * size["bytes"] / max(size["elements"], 1),
            "tensor_types": dict(Counter(types.values())), "quantized_layers": count}


def export(model, cfg, ctx, path) -> None:
    from qbench.models import resolve_source

    source = resolve_source(str(cfg.model))
    gguf_export.write_gguf(model, path, gguf_mix.file_type(str(cfg.method.type)),
                           source_gguf=source.path if source.kind == "gguf" else None, tokenizer=ctx.tokenizer)
