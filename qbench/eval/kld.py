"""KL divergence of the quantized model's next-token distributions to the unquantized baseline's.

Over the first eval.kld_windows WikiText-2 windows of eval.ppl (same tokens and seqlen as perplexity),
at every predicted position t (seqlen-1 per window), P the baseline's and Q the quantized model's
next-token distribution:
    kld_mean = mean_t KL(P_t || Q_t),  kld_p99 = 99th percentile of KL(P_t || Q_t),
    top1_agree = fraction of positions where argmax P_t == argmax Q_t.
With a quantized KV cache (kv_cache=int8|fp8) Q comes through that cache, as perplexity does
(qbench/eval/perplexity.py); P is always the baseline's, without a cache.

The baseline's log-probs are computed once per (model, device, dtype, data, seqlen, windows, storage)
and cached on disk under <qbench cache>/kld/<hash>/, one file per window (read back one at a time).
Default storage (eval.kld_topk=-1): the full log-probs in float16, vocab x 2 bytes per position
(SmolLM2, 49152 tokens: 96 KiB per position, 3.1 GiB for 16 windows of 2048); the KL is exact up
to the float16 rounding of the baseline's log-probs (relative error ~1e-6 measured on SmolLM2).
eval.kld_topk=k > 0 keeps only the k most likely tokens (float32 log-probs + int32 ids) and folds the
rest into one "tail" outcome: sum_{i<=k} p_i log(p_i/q_i) + p_tail log(p_tail/q_tail). Merging
outcomes never increases a KL divergence, so this is a lower bound; it is loose for small models with
flat distributions (SmolLM2 w4 RTN: 0.30 at k=64 and 0.37 at k=1024 vs the exact 0.39), so it is
only for vocabularies too large to store; the record's kld_tail_mass is the baseline's mean tail mass.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from qbench.paths import cache_dir


def cache_key(cfg, device: str, dtype, n_windows: int) -> dict:
    from qbench.data import perplexity_source
    from qbench.models import resolve_source

    source = resolve_source(str(cfg.model))
    stamp = None
    if os.path.exists(source.path):
        st = os.stat(source.path)
        stamp = [st.st_size, int(st.st_mtime)]
    return {"model": str(cfg.model), "source": source.path, "stamp": stamp, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "data": perplexity_source("wikitext2", cfg.data_dir),
            "seqlen": int(cfg.eval.ppl.seqlen), "windows": n_windows, "topk": int(cfg.eval.kld_topk)}


def cache_folder(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "kld" / digest


def windows_of(ids: torch.Tensor, seqlen: int, *limits) -> torch.Tensor:
    n = min([ids.numel() // seqlen] + [int(x) for x in limits if x is not None])
    if n < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _log_probs(model, window: torch.Tensor, kv_cache: str = "none", chunk: int | None = None) -> torch.Tensor:
    """[seqlen-1, vocab] float32 next-token log-probs of one window (the last position predicts nothing)."""
    from qbench.eval.perplexity import window_logits

    device = next(model.parameters()).device
    logits = window_logits(model, window[None].to(device), kv_cache, chunk)[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def reference(model, window: torch.Tensor, topk: int) -> dict:
    """The baseline's stored log-probs of one window: top-k (values float32, ids int32) or full (float16)."""
    lp = _log_probs(model, window)
    if topk < 0:
        return {"values": lp.half().cpu(), "ids": None}
    top = torch.topk(lp, topk, dim=-1)  # sorted: column 0 is the argmax
    return {"values": top.values.cpu(), "ids": top.indices.to(torch.int32).cpu()}


def token_kl(ref_values: torch.Tensor, ref_ids: torch.Tensor | None, lq: torch.Tensor) -> tuple:
    """Per-position KL(P || Q), top-1 agreement and P's tail mass, from the stored P and Q's log-probs."""
    if ref_ids is None:  # full vocab
        lp = ref_values.float()
        kl = (lp.exp() * (lp - lq)).sum(-1)
        return kl, lp.argmax(-1) == lq.argmax(-1), torch.zeros_like(kl)
    lp = ref_values.float()
    p = lp.exp()
    lq_k = lq.gather(-1, ref_ids.long())
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - lq_k.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(1e-30)) - torch.log(q_tail)), 0.0)
    kl = (p * (lp - lq_k)).sum(-1) + tail
    return kl, ref_ids[:, 0].long() == lq.argmax(-1), p_tail


@torch.no_grad()
def compare(model, windows: torch.Tensor, refs, progress=None, kv_cache: str = "none", chunk: int | None = None) -> dict:
    """KL metrics of model (through a KV cache of kind kv_cache) against refs (an iterable of per-window
    references, in window order)."""
    kls, agree, tails = [], [], []
    pairs = zip(windows, refs)
    for window, ref in progress(pairs, "kld", total=len(windows)) if progress else pairs:
        lq = _log_probs(model, window, kv_cache, chunk)
        ids = None if ref["ids"] is None else ref["ids"].to(lq.device)
        kl, same, tail = token_kl(ref["values"].to(lq.device), ids, lq)
        kls.append(kl.cpu())
        agree.append(same.cpu())
        tails.append(tail.cpu())
    kl = torch.cat(kls).double()
    if not torch.isfinite(kl).all():
        raise FloatingPointError("non-finite KL divergence (the quantized model's logits overflowed?)")
    return {"kld_mean": kl.mean().item(), "kld_p99": torch.quantile(kl, 0.99).item(),
            "top1_agree": torch.cat(agree).double().mean().item(), "kld_tail_mass": torch.cat(tails).double().mean().item(),
            "kld_tokens": kl.numel()}


def cached_reference(key: dict, windows: torch.Tensor, base_model, progress=None) -> Path:
    """The folder of the baseline's per-window log-probs, computed with base_model() when not cached."""
    folder = cache_folder(key)
    meta = folder / "key.json"
    if meta.is_file() and json.loads(meta.read_text()) == key:
        return folder
    model = base_model()
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = range(len(windows))
    for i in progress(rows, "kld baseline", total=len(windows)) if progress else rows:
        torch.save(reference(model, windows[i], key["topk"]), tmp / f"window{i:05d}.pt")
    (tmp / "key.json").write_text(json.dumps(key, sort_keys=True))
    if not (meta.is_file() and json.loads(meta.read_text()) == key):
        shutil.rmtree(folder, ignore_errors=True)  # a stale copy; one another worker just wrote may be in use
    try:
        os.replace(tmp, folder)  # atomic: a half-written cache is never read
    except OSError:  # another worker of a parallel sweep wrote the same reference first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_reference(folder: Path, n_windows: int):
    for i in range(n_windows):
        yield torch.load(folder / f"window{i:05d}.pt", weights_only=True)


def kld_metrics(model, tokenizer, cfg, ctx, base_model) -> dict:
    """KL(baseline || model) over WikiText-2 windows. base_model() returns the unquantized model."""
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import tokenize

    ppl = cfg.eval.ppl
    ids = tokenize(tokenizer, perplexity_text("wikitext2", cfg.data_dir), key=f"wikitext2:{cfg.data_dir}")
    windows = windows_of(ids, int(ppl.seqlen), ppl.max_windows, cfg.eval.kld_windows)
    key = cache_key(cfg, ctx.device, ctx.dtype, len(windows))
    folder = cached_reference(key, windows, base_model, ctx.progress)
    from qbench.kvcache import cache_kind

    kv = cfg.get("kv_cache")
    return compare(model, windows, read_reference(folder, len(windows)), ctx.progress, cache_kind(kv),
                   kv.get("chunk") if kv is not None else None)
