"""Calibration sets (config group `calib=`): token windows for calibration methods, and their capture.

`calib.nsamples` windows of `calib.seqlen` tokens (null: the method's `calib_seqlen`, GPTQ 2048 and
AWQ 512 as in their papers), drawn with `random.Random(calib.seed)`: same seed, same windows.

Sources (data root first, then the Hugging Face hub; see ../shared/data/MANIFEST.md):
- c4: locally documents 1100-1999 of the C4 validation sample (0-1099 are the C4 perplexity text and
  are never used); on the hub the first C4 en train shard, as the GPTQ reference.
- wikitext2: the train split, hub only. The data root holds only the test split, which is never used
  for calibration, so without the hub this set is refused in one line.
- pile: the Pile validation set the AWQ reference calibrates on (local pile/val.jsonl or
  pile/val.parquet with a `text` field, else the hub's mit-han-lab/pile-val-backup).

Sampling from documents (c4, pile), recorded in the run's quant_info:
- "reference" (GPTQ reference, datautils.get_c4): draw a random document until one has more than
  seqlen tokens, then a random offset in it. Used when at least nsamples documents are that long
  (always for the hub's large shards).
- "concat": otherwise (the local C4 sample has only 33 calibration documents over 2048 tokens), the
  documents are tokenized one by one and concatenated in their order with the tokens of "\\n\\n"
  between them, and each window starts at a random offset of that stream (as the GPTQ reference
  samples WikiText-2). Rejection sampling on so few long documents would draw every window from them.
wikitext2 is always a stream: the train rows joined with "\\n\\n", random offsets (GPTQ reference).
"""

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qbench import ConfigError
from qbench.data import C4_CALIB_DOCS, C4_HUB_TRAIN, C4_VALIDATION, DataUnavailable, c4_documents, wikitext2_rows
from qbench.paths import data_root

PILE_LOCAL = ("pile/val.jsonl", "pile/val.parquet")
PILE_HUB = "mit-han-lab/pile-val-backup"
MAX_TOKENIZED_POOL = 20000  # pools up to this many documents are tokenized whole to count long ones


def calib_seqlen(cfg) -> int:
    return int(cfg.calib.seqlen if cfg.calib.seqlen is not None else cfg.method.calib_seqlen)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _pile_documents(data_dir: str | None) -> tuple[list[str], str]:
    root = data_root(data_dir)
    for rel in PILE_LOCAL:
        path = root / rel if root else None
        if path is not None and path.is_file():
            if rel.endswith(".parquet"):
                import pandas as pd

                return pd.read_parquet(path, columns=["text"])["text"].tolist(), f"local:{rel}"
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f if line.strip()], f"local:{rel}"
    where = f"{root}/{' or '.join(PILE_LOCAL)}" if root else "no data root"
    if _hub_offline():
        raise ConfigError(f"calib=pile: no Pile validation data locally ({where}) and the hub is offline")
    try:
        import datasets

        return list(datasets.load_dataset(PILE_HUB, split="validation")["text"]), f"hub:{PILE_HUB}"
    except Exception as err:
        raise ConfigError(f"calib=pile: no Pile validation data locally ({where}) nor on the hub ({PILE_HUB}): {type(err).__name__}") from None


def _source(name: str, data_dir: str | None):
    """('docs', documents, source) or ('stream', text, source) of a calibration set."""
    if name == "c4":
        root = data_root(data_dir)
        local = root is not None and (root / C4_VALIDATION).is_file()
        try:
            docs = c4_documents("calib", data_dir)
        except DataUnavailable as err:
            raise ConfigError(str(err).splitlines()[0]) from None
        where = f"local:{C4_VALIDATION}[{C4_CALIB_DOCS.start}:{C4_CALIB_DOCS.stop}]" if local else f"hub:allenai/c4 {C4_HUB_TRAIN}"
        return "docs", docs, where
    if name == "wikitext2":
        refusal = ("calib=wikitext2 needs the WikiText-2 train split, which is only on the hub (the data root holds "
                   "the test split, never used to calibrate)")
        if _hub_offline():
            raise ConfigError(f"{refusal} and the hub is offline; use calib=c4")
        try:
            rows = wikitext2_rows("train", data_dir)
        except DataUnavailable:
            raise ConfigError(f"{refusal} and the hub is unreachable; use calib=c4") from None
        return "stream", "\n\n".join(rows), "hub:wikitext/wikitext-2-raw-v1 train"
    if name == "pile":
        docs, where = _pile_documents(data_dir)
        return "docs", docs, where
    raise ConfigError(f"calibration set {name!r} has no loader in qbench/calib.py")


def _tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, verbose=False).input_ids


def _stream_windows(stream: list[int], nsamples: int, seqlen: int, rng: random.Random) -> list[list[int]]:
    if len(stream) <= seqlen + 1:
        raise ValueError(f"calibration text has {len(stream)} tokens, too few for windows of {seqlen}")
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
    return [stream[i : i + seqlen] for i in starts]


def _document_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, pool_cache: dict):
    """Windows from documents, by the rule in the module docstring. Returns (windows, info)."""
    tokens = pool_cache.get("tokens")
    if tokens is None and len(docs) <= MAX_TOKENIZED_POOL:
        tokens = pool_cache["tokens"] = _tokens(tokenizer, docs)
    info = {"documents": len(docs)}
    if tokens is not None:
        info["long_documents"] = sum(len(t) > seqlen for t in tokens)
        if info["long_documents"] < nsamples:
            sep = tokenizer("\n\n", add_special_tokens=False).input_ids
            stream = [tok for t in tokens for tok in (*t, *sep)]
            info.update(sampling="concat", stream_tokens=len(stream))
            return _stream_windows(stream, nsamples, seqlen, rng), info
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            enc = tokens[i] if tokens is not None else _tokens(tokenizer, [docs[i]])[0]
            if len(enc) > seqlen:
                break
        j = rng.randint(0, len(enc) - seqlen - 1)
        windows.append(enc[j : j + seqlen])
    info["sampling"] = "reference"
    return windows, info


def calibration_ids(cfg, tokenizer, cache: dict | None = None) -> tuple[torch.Tensor, dict]:
    """[nsamples, seqlen] token ids of the configured calibration set, and what they are (for the record)."""
    cache = {} if cache is None else cache
    name, nsamples, seqlen, seed = cfg.calib.name, int(cfg.calib.nsamples), calib_seqlen(cfg), int(cfg.calib.seed)
    tok_name = getattr(tokenizer, "name_or_path", str(id(tokenizer)))
    key = ("calib_ids", tok_name, name, cfg.data_dir, nsamples, seqlen, seed)
    if key not in cache:
        kind, data, where = _source(name, cfg.data_dir)
        rng = random.Random(seed)
        if kind == "stream":
            stream = _tokens(tokenizer, [data])[0]
            windows = _stream_windows(stream, nsamples, seqlen, rng)
            info = {"sampling": "stream", "stream_tokens": len(stream)}
        else:
            pool = cache.setdefault(("calib_pool", tok_name, name, cfg.data_dir), {})
            windows, info = _document_windows(data, tokenizer, nsamples, seqlen, rng, pool)
        info = {"name": name, "source": where, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, **info}
        cache[key] = (torch.tensor(windows, dtype=torch.long), info)
    ids, info = cache[key]
    return ids, dict(info)


def block_inputs(model, cfg, ctx, arch: dict) -> tuple[list[tuple], dict]:
    """The calibration batches at the input of decoder block 0 (hidden states + replay kwargs).

    Cached in ctx.cache per (model, device, dtype, calibration set), so the methods of one process
    share one capture; callers must not modify the cached tensors in place."""
    from qbench.quant.blocks import batch_size_for, capture_inputs

    ids, info = calibration_ids(cfg, ctx.tokenizer, ctx.cache)
    key = ("block0", str(cfg.model), str(ctx.device), str(ctx.dtype), info["name"], str(cfg.data_dir),
           info["nsamples"], info["seqlen"], info["seed"])
    if key not in ctx.cache:
        ctx.cache[key] = capture_inputs(model, ids, batch_size_for(info["seqlen"]), arch)
    return ctx.cache[key], info


@dataclass
class BlockwiseStart:
    """What a block-by-block method (GPTQ, AWQ) starts from."""
    arch: dict  # qbench.quant.blocks.arch_of
    targets: dict  # name -> nn.Linear to quantize (lm_head per cfg.quantize_lm_head)
    batches: list  # the calibration batches at the input of decoder block 0
    info: dict  # the calibration set, for the record
    capture_s: float  # time to capture the batches


def start_blockwise(model, cfg, ctx) -> BlockwiseStart:
    from qbench.quant.blocks import arch_of, synchronize
    from qbench.quant.modules import quantizable_linears

    arch = arch_of(model)
    targets = quantizable_linears(model, cfg.quantize_lm_head)
    t0 = time.perf_counter()
    batches, info = block_inputs(model, cfg, ctx, arch)
    synchronize(ctx.device)
    return BlockwiseStart(arch, targets, batches, info, time.perf_counter() - t0)


def each_block(model, arch: dict, ctx, desc: str):
    """(prefix "model.layers.<i>.", block) for every decoder block in order, with a progress bar."""
    from qbench.quant.blocks import decoder_layers

    layers = decoder_layers(model, arch)
    for index, layer in enumerate(ctx.progress(layers, desc, total=len(layers))):
        yield f"{arch['layers']}.{index}.", layer
