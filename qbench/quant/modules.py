"""Which linears of a model get quantized, and swapping them for quantized modules.

`replace_linears(model, cfg, ctx, make_layer)` is the one walk every weight-only method shares (the
shape of torchao's `quantize_(model, config)`): each quantizable linear, in order, becomes
`make_layer(name, linear)`, placed on the linear's device; the float weight is dropped as soon as its
replacement is in, so a large model never holds a second full-precision copy.
"""

from torch import nn


def quantizable_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """Name -> nn.Linear for every linear layer, lm_head only when asked (embeddings are never linears)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (include_lm_head or module is not head):
            found[name] = module
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_linears(model: nn.Module, cfg, ctx, make_layer, desc: str | None = None) -> int:
    """Replace every quantizable linear (lm_head per cfg.quantize_lm_head) by make_layer(name, linear);
    returns how many were replaced. The progress bar is titled desc (default: the method's name)."""
    linears = quantizable_linears(model, cfg.quantize_lm_head)
    count = len(linears)
    for name in ctx.progress(list(linears), desc or str(cfg.method.name), total=count):
        linear = linears.pop(name)  # the walk's reference goes: once replaced, the float weight is freed
        set_module(model, name, make_layer(name, linear).to(linear.weight.device))
    return count
