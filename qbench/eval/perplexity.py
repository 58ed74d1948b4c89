"""Perplexity over non-overlapping windows (the GPTQ paper convention).

The text is tokenized once; window i is tokens [i*seqlen, (i+1)*seqlen); the loss of a window is the
mean next-token cross-entropy over its seqlen-1 predicted tokens; ppl = exp(mean over windows).

With a quantized KV cache (kv_cache=int8|fp8, qbench/kvcache.py) each window runs through a fresh
cache of that kind, in forwards of `chunk` tokens (None: the whole window in one): every layer writes
the chunk's keys and values into the cache and attends over the cache read back dequantized, so each
query sees quantized keys and values at every position up to its own, earlier chunks' and its own
chunk's alike, as in a decode step. The chunk size changes only float rounding. kv_cache=none runs the
window in one forward without a cache, as before.
"""

import math

import torch

from qbench.models import cache_keyword

_TOKENS: dict = {}


def tokenize(tokenizer, text: str, key: str | None = None) -> torch.Tensor:
    """Token ids of the whole text, cached per (tokenizer, key) within the process."""
    cache_key = (getattr(tokenizer, "name_or_path", id(tokenizer)), key or hash(text))
    if cache_key not in _TOKENS:
        _TOKENS[cache_key] = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return _TOKENS[cache_key]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1,
               progress=None, kv_cache: str = "none", chunk: int | None = None) -> dict:
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    starts = range(0, n_windows, batch_size)
    nll_sum = 0.0
    for start in progress(starts, "perplexity", total=len(starts)) if progress else starts:
        batch = windows[start : start + batch_size].to(device)
        logits = window_logits(model, batch, kv_cache, chunk)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1).mean(dim=1)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(f"non-finite loss in perplexity windows {start}..{start + batch.shape[0] - 1}")
        nll_sum += loss.double().sum().item()
    nll = nll_sum / n_windows
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_windows * (seqlen - 1), "windows": n_windows}


def window_logits(model, batch: torch.Tensor, kv_cache: str = "none", chunk: int | None = None) -> torch.Tensor:
    """Logits of a batch of windows: one forward without a cache, or through a quantized KV cache."""
    if kv_cache == "none":
        return model(batch, use_cache=False).logits
    from qbench.kvcache import make_dynamic_cache

    cache, step = make_dynamic_cache(model, kv_cache), chunk or batch.shape[1]
    kv = cache_keyword(model)
    return torch.cat([model(batch[:, i : i + step], **{kv: cache}, use_cache=True).logits
                      for i in range(0, batch.shape[1], step)], dim=1)
