"""Which block type each tensor gets: llama.cpp's choice (src/llama-quant.cpp, llama_tensor_get_type
without an importance matrix) for Llama-style dense models, written out as data and small rules.

- A single block type (`Q4_0` ... `Q6_K`) is applied to every quantized tensor, as `llama-quantize --pure`.
- A mix (`Q3_K_M`, `Q4_K_M`, `Q5_K_M`) starts from its default type and bumps some tensors:
  the output tensor (or the token embedding when it is tied to the output) to Q6_K, or Q8_0 when its
  rows are not a multiple of the default type's block; attn_v and ffn_down of some layers
  (`use_more_bits`: the first and last eighth of the layers and every third one between);
  Q3_K_M also attn_output to Q4_K and ffn_down to Q4_K/Q5_K.
- Then the shape fallback: a K-quant needs rows (in_features) that are a multiple of 256; otherwise
  llama.cpp falls back to a 32-element type (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1;
  Q6_K -> Q8_0). On SmolLM2-135M (hidden 576) that is every tensor but ffn_down (rows of 1536).
Tensors are named as in GGUF files (`blk.3.attn_v.weight`); the layer counters of llama.cpp run in
layer order, so a tensor's counter is its layer index.
"""

import re

from qbench.quant.gguf_quants import TYPES

MIXES = {"Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}  # mix -> default block type
CHOICES = [*TYPES, *MIXES]
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# general.file_type written to the GGUF header (llama.cpp's llama_ftype; gguf.LlamaFileType)
FILE_TYPES = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11,
              "Q3_K_M": 12, "Q4_K": 14, "Q4_K_M": 15, "Q5_K": 16, "Q5_K_M": 17, "Q6_K": 18}
# for a pure K type llama.cpp has no ftype of its own: the nearest _S ftype (Q3_K_S, Q4_K_S, Q5_K_S) is written


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(qtype: str, row_len: int) -> str:
    """llama.cpp's tensor_type_fallback: a type whose block divides the row length."""
    if row_len % TYPES[qtype].block_elems == 0:
        return qtype
    if qtype not in FALLBACK:
        raise ValueError(f"rows of {row_len} are not a multiple of {qtype}'s block of {TYPES[qtype].block_elems}")
    new = FALLBACK[qtype]
    if row_len % TYPES[new].block_elems:
        raise ValueError(f"rows of {row_len} fit no block type (llama.cpp keeps such a tensor in F16)")
    return new


def category(name: str) -> str:
    """token_embd | output | attn_q | attn_k | attn_v | attn_output | ffn_gate | ffn_up | ffn_down | other."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight"):
        if cat in name:
            return cat.split(".")[0]
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def mix_type(mix: str, name: str, row_len: int, n_layer: int, tied: bool, is_70b: bool = False) -> str:
    """The block type of one tensor under a mix, before the shape fallback."""
    default = MIXES[mix]
    cat, layer = category(name), _layer(name)
    if cat == "output" or (tied and cat == "token_embd"):
        return "Q8_0" if row_len % TYPES[default].block_elems else "Q6_K"
    if cat == "attn_v":
        if mix == "Q3_K_M":
            new = "Q5_K" if layer < 2 else "Q4_K"
        else:
            new = "Q6_K" if use_more_bits(layer, n_layer) else default
        return "Q5_K" if is_70b and new in ("Q3_K", "Q4_K") else new
    if cat == "ffn_down":
        if mix == "Q3_K_M":
            return "Q5_K" if layer < n_layer // 16 else "Q4_K"
        return "Q6_K" if use_more_bits(layer, n_layer) else default
    if cat == "attn_output" and mix == "Q3_K_M":
        return "Q4_K"
    return default


def tensor_types(choice: str, row_lens: dict[str, int], n_layer: int, tied: bool, is_70b: bool = False) -> dict[str, str]:
    """GGUF tensor name -> block type for the tensors to quantize (name -> row length, i.e. in_features).

    is_70b: llama.cpp's LLM_TYPE_70B (a Llama with 80 layers and grouped-query attention) bumps attn_v."""
    if choice in TYPES:
        return {name: fallback(choice, n) for name, n in row_lens.items()}
    if choice not in MIXES:
        raise ValueError(f"unknown GGUF type {choice!r}; valid: {', '.join(CHOICES)}")
    return {name: fallback(mix_type(choice, name, n, n_layer, tied, is_70b), n) for name, n in row_lens.items()}


def file_type(choice: str) -> int:
    return FILE_TYPES[choice]
