"""qbench's perplexity against a straightforward, independent computation with transformers."""

import math

import torch

from qbench.data import perplexity_text
from qbench.eval.perplexity import perplexity, tokenize


def test_fp16_perplexity_matches_transformers_loss(smollm2, data_dir):
    model, tok = smollm2.model, smollm2.tokenizer
    seqlen, windows = 256, 3
    ours = perplexity(model, tokenize(tok, perplexity_text("wikitext2", data_dir)), seqlen, windows, batch_size=2)
    # independent: the hub text convention written out, tokenized, labels=input_ids loss per window
    rows = open(f"{data_dir}/wikitext-2-raw/wiki.test.raw", encoding="utf-8").read().split("\n")[:-1]
    text = "\n\n".join("" if not r.strip() else r + "\n" for r in rows)
    ids = tok(text, return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for i in range(windows):
            window = ids[i * seqlen : (i + 1) * seqlen][None]
            losses.append(model(input_ids=window, labels=window).loss.item())
    expected = math.exp(sum(losses) / windows)
    assert ours["windows"] == windows and ours["tokens"] == windows * (seqlen - 1)
    assert abs(ours["ppl"] - expected) / expected < 1e-4


def test_nan_loss_raises(smollm2):
    import copy

    import pytest

    model = copy.deepcopy(smollm2.model)
    model.model.layers[0].mlp.down_proj.weight.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        perplexity(model, torch.arange(64), 32, 1)
