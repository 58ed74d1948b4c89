"""Perplexity over non-overlapping windows (the GPTQ paper convention).

The text is tokenized once; window i is tokens [i*seqlen, (i+1)*seqlen); the loss of a window is the
mean next-token cross-entropy over its seqlen-1 predicted tokens; ppl = exp(mean over windows).
"""

import math

import torch

_TOKENS: dict = {}


def tokenize(tokenizer, text: str, key: str | None = None) -> torch.Tensor:
    """Token ids of the whole text, cached per (tokenizer, key) within the process."""
    cache_key = (getattr(tokenizer, "name_or_path", id(tokenizer)), key or hash(text))
    if cache_key not in _TOKENS:
        _TOKENS[cache_key] = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    return _TOKENS[cache_key]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1,
               progress=None) -> dict:
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
        logits = model(batch, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1).mean(dim=1)
        if not torch.isfinite(loss).all():
            raise FloatingPointError(f"non-finite loss in perplexity windows {start}..{start + batch.shape[0] - 1}")
        nll_sum += loss.double().sum().item()
    nll = nll_sum / n_windows
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_windows * (seqlen - 1), "windows": n_windows}
