"""Which linears of a model get quantized, and swapping them for quantized modules."""

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
