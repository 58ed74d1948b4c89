"""Write a (GGUF-quantized or plain float) Llama-style model as a GGUF file that llama.cpp runs.

Tensors: GGUFLinear layers are written as their raw blocks with their type; every other weight
(embedding when not quantized, norms, unquantized linears) as F32, so llama.cpp computes with exactly
the weights qbench evaluates. `float_only=True` writes everything as F32 (the input of llama.cpp's own
quantizer in the cross-checks). Names follow gguf's tensor name map; q_proj/k_proj rows are permuted
back to llama.cpp's rotary layout (the inverse of what transformers does when it loads a GGUF file).
A tied output embedding is written once, as token_embd.weight.

Metadata: the architecture keys and the tokenizer are copied from the source GGUF file when the model
came from one (qbench's default model), so the tokenizer is exactly the original. Models from Hugging
Face get the architecture keys from their config and the tokenizer through gguf's own vocab readers
(GPT-2 style BPE tokenizer.json, or SentencePiece tokenizer.model) with special tokens and merges;
their `tokenizer.ggml.pre` is written as "default" (llama.cpp's converter recognizes pre-tokenizers by
hashing test encodings; that detection is not reproduced here).
"""

import logging
import struct
import tempfile
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from qbench.quant.gguf_linear import GGUFLinear
from qbench.quant.gguf_quants import TYPES

# not copied from a source file: written anew (a source's quantize.imatrix.* would claim its importance
# matrix for our quantization)
SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "quantize.imatrix.")


def check_llama(model) -> None:
    if getattr(model.config, "model_type", None) != "llama":
        raise ValueError(f"GGUF export and mixes support Llama-architecture models, not {model.config.model_type!r}")


def is_tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def gguf_names(model) -> dict[str, str]:
    """Module name of every weight-holding module -> its GGUF tensor name (a tied lm_head -> token_embd)."""
    check_llama(model)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    names = {}
    for module_name, _ in model.named_modules():
        if not module_name:
            continue
        gguf_name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if gguf_name is not None:
            names[module_name] = gguf_name
    if is_tied(model) and "lm_head" in names:
        names["lm_head"] = "token_embd.weight"
    return names


def _permute_rows(t, n_head: int):
    """HF rotary layout -> llama.cpp's (whole rows move, so it applies to float rows and to block rows alike)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def model_tensors(model, float_only: bool = False) -> list[tuple[str, np.ndarray, str | None]]:
    """(GGUF name, array, block type or None for F32) for every tensor of the file, in model order."""
    cfg = model.config
    names = gguf_names(model)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    head = model.get_output_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    out, seen = [], set()
    for module_name, module in model.named_modules():
        if module_name not in names:
            continue
        name = names[module_name]
        if is_tied(model) and module is head and not isinstance(module, GGUFLinear):
            continue  # the float tied head is the embedding, written from there
        if is_tied(model) and module_name == embed_name and isinstance(head, GGUFLinear) and not float_only:
            continue  # the quantized tied head is written as token_embd
        if name in seen:
            continue
        seen.add(name)
        kind = name.split(".")[-2]
        items = []
        if isinstance(module, GGUFLinear) and not float_only:
            items.append((name, module.qweight.detach().cpu().numpy(), module.qtype))
        else:
            w = module.dequantize() if isinstance(module, GGUFLinear) else module.weight.detach()
            items.append((name, w.float().cpu().numpy(), None))
        if getattr(module, "bias", None) is not None:
            items.append((name[: -len("weight")] + "bias", module.bias.detach().float().cpu().numpy(), None))
        for tensor_name, data, qtype in items:
            if kind in heads:
                data = _permute_rows(data, heads[kind])
            out.append((tensor_name, np.ascontiguousarray(data), qtype))
    return out


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@lru_cache(maxsize=4)
def read_metadata(path: str) -> tuple[tuple[str, object, int, int | None], ...]:
    """The key/value section of a GGUF file as (key, value, value type, array item type).

    A direct reader of the GGUF header: gguf.GGUFReader also maps every tensor and makes a numpy view
    per string, which takes many seconds for a 49k-token vocabulary."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        n_kv = struct.unpack_from("<Q", head, 16)[0]
        buf = f.read(64 << 20)  # the metadata of any model fits; tensors follow it
    pos = 0

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n : pos]).decode("utf-8")

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    fields = []
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype != 9:
            fields.append((key, value(vtype), vtype, None))
            continue
        sub, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if sub == 8:
            items = [string() for _ in range(count)]
        else:
            dtype = np.dtype(_SCALARS[sub])
            items = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
            pos += count * dtype.itemsize
        fields.append((key, items, vtype, sub))
    return tuple(fields)


def _copy_metadata(writer: gguf.GGUFWriter, source: str) -> None:
    for key, val, vtype, sub in read_metadata(source):
        if not key.startswith(SKIP_KEYS):
            writer.add_key_value(key, val, gguf.GGUFValueType(vtype), None if sub is None else gguf.GGUFValueType(sub))


def _config_metadata(writer: gguf.GGUFWriter, cfg) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError("GGUF export does not write rope scaling")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        sentencepiece = (path / "tokenizer.model").is_file()
        vocab = gguf.vocab.SentencePieceVocab(path) if sentencepiece else gguf.vocab.BpeVocab(path)
        tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if token_id < len(types):  # special tokens are control tokens for llama.cpp, other added ones user-defined
                types[token_id] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        pad = vocab_size - len(tokens)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens + [f"[PAD{i}]".encode() for i in range(pad)])
        writer.add_token_scores(scores + [-1000.0] * pad)
        writer.add_token_types(types + [gguf.TokenType.UNUSED] * pad)
        special = gguf.SpecialVocab(path, load_merges=not sentencepiece, n_vocab=vocab_size)
        special.add_to_gguf(writer, quiet=True)
        if "bos" not in special.add_special_token:
            writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def write_gguf(model, path: str, file_type: int, source_gguf: str | None = None, tokenizer=None,
               float_only: bool = False, extra: dict | None = None) -> None:
    """Write the model to `path`. Metadata from `source_gguf` when given, else from the config + `tokenizer`;
    `extra` adds keys (str values as strings, ints as int32: llama-quantize's quantize.imatrix.*)."""
    check_llama(model)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its per-file INFO lines
    writer = gguf.GGUFWriter(str(path), "llama")
    if source_gguf:
        _copy_metadata(writer, source_gguf)
    else:
        writer.add_name(str(getattr(model.config, "name_or_path", "") or "qbench model"))
        _config_metadata(writer, model.config)
        if tokenizer is not None:
            _tokenizer_metadata(writer, tokenizer, model.config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (extra or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_int32(key, int(value))
    for name, data, qtype in model_tensors(model, float_only):
        if qtype is None:
            writer.add_tensor(name, data.astype(np.float32))
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(TYPES[qtype].ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_tensor(path: str, name: str) -> tuple[str, np.ndarray]:
    """(type name, raw data) of one tensor of a GGUF file (for checks)."""
    for t in gguf.GGUFReader(path).tensors:
        if t.name == name:
            return t.tensor_type.name, np.array(t.data)
    raise KeyError(name)

