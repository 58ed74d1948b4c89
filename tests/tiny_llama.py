"""A tiny random Llama-style model for calibration-method tests (seconds on a CPU)."""

import copy
import functools

import torch


def tiny_llama(kv_heads: int = 2, tie: bool = True, seed: int = 0, vocab: int = 49152):
    """A fresh copy (tests modify it) of the tiny model for these settings."""
    return copy.deepcopy(_tiny_llama(kv_heads, tie, seed, vocab))


@functools.lru_cache(maxsize=8)
def _tiny_llama(kv_heads: int = 2, tie: bool = True, seed: int = 0, vocab: int = 49152):
    """2 blocks, hidden 64, 4 query heads of 16; kv_heads < 4 is grouped-query attention. The vocabulary
    matches SmolLM2's tokenizer so the real calibration windows can be fed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         tie_word_embeddings=tie, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and outlier input channels, like trained models
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)
            elif p.dim() == 2 and "embed" not in name:
                p.mul_(torch.randn(1, p.shape[1]).abs() + 0.5)
    model.requires_grad_(False)
    return model
