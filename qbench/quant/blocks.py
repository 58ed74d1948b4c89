"""Decoder blocks for calibration methods: architecture facts as data, and clean block-by-block replay.

A calibration method (GPTQ, AWQ) walks the decoder blocks in order. The inputs of block 0 are caught
with a forward pre-hook on it (the model's forward is stopped there), together with the keyword
arguments the model passes (attention mask, position ids, rotary position embeddings). Every later
block is fed from the outputs of the block before it. A captured batch is replayed with
`use_cache=False` and without any `past_key_values`: transformers' default `use_cache=True` would
hand the block a KV cache that grows from one calibration sample to the next, so a sample would
attend to the keys of earlier samples.

What a method needs to know about an architecture is a small dict per model family (`ARCHS`, keyed by
`config.model_type`), never a subclass:
    layers       where the decoder blocks are
    final_norm   the norm before lm_head
    attention    the attention module (judged with the block's kwargs: mask, position embeddings)
    sequential   GPTQ's true-sequential order: sets of linears that read the same input
    scales       AWQ's scaling groups: (operator before, linears after it, module whose output is
                 compared; None = the single linear itself)
    no_clip      linears AWQ leaves out of its clipping search (q/k: their product goes through softmax)
"""

import torch
from torch import nn

LLAMA = {
    "layers": "model.layers",
    "final_norm": "model.norm",
    "attention": "self_attn",
    "sequential": [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
        ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"],
        ["mlp.down_proj"],
    ],
    "scales": [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn"),
        ("self_attn.v_proj", ["self_attn.o_proj"], None),  # only when v_proj's outputs are o_proj's inputs
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
        ("mlp.up_proj", ["mlp.down_proj"], None),
    ],
    "no_clip": ["self_attn.q_proj", "self_attn.k_proj"],
}

# Llama-style decoders (RMSNorm weight multiplies, q/k/v/o + gate/up/down). SmolLM2 is "llama".
ARCHS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}

_NO_REPLAY = ("past_key_values", "past_key_value", "layer_past", "cache")  # "cache": transformers >= 5.2x
BATCH_TOKENS = 32768  # tokens per replayed batch: large matmuls, bounded activation memory


def arch_of(model: nn.Module) -> dict:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise ValueError(f"no block description for model_type {model_type!r} (known: {known}); add one to ARCHS in qbench/quant/blocks.py")
    return ARCHS[model_type]


def decoder_layers(model: nn.Module, arch: dict) -> nn.ModuleList:
    return model.get_submodule(arch["layers"])


def batch_size_for(seqlen: int) -> int:
    return max(1, BATCH_TOKENS // seqlen)


class _Caught(Exception):
    pass


def replay_kwargs(kwargs: dict) -> dict:
    """The keyword arguments a block is replayed with: no KV cache, never building one."""
    clean = {k: v for k, v in kwargs.items() if k not in _NO_REPLAY}
    clean["use_cache"] = False
    return clean


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, arch: dict) -> list[tuple]:
    """[(hidden_states [B, S, D], kwargs)] at the input of decoder block 0, one entry per batch of ids."""
    first = decoder_layers(model, arch)[0]
    device = next(model.parameters()).device
    caught = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), replay_kwargs(kwargs)))
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(ids[start : start + batch_size].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, batches: list[tuple]) -> list[tuple]:
    """The block's outputs as the next block's batches (same kwargs)."""
    return [(block_output(block, hidden, kwargs), kwargs) for hidden, kwargs in batches]


@torch.no_grad()
def record_inputs(block: nn.Module, batches: list[tuple], names: list[str], on_input, outputs: bool = True):
    """Replay the batches through the block, calling on_input(name, x) with the input of each named
    linear. outputs=True: returns the block's outputs as the next block's batches; outputs=False: each
    batch stops as soon as every named linear has seen its input (the rest of the block is not run)."""
    seen = set()

    def hook(module, args, name):
        on_input(name, args[0])
        seen.add(name)
        if not outputs and len(seen) == len(names):
            raise _Caught

    handles = [block.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n in names]
    try:
        if outputs:
            return run_block(block, batches)
        for hidden, kwargs in batches:
            seen.clear()
            try:
                block_output(block, hidden, kwargs)
            except _Caught:
                pass
        return None
    finally:
        for handle in handles:
            handle.remove()


def synchronize(device) -> None:
    """Wait for the GPU (timings of GPU work); nothing on a CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
