"""Calibration sets: sources, sampling, reproducibility, fail-fast config, clean block captures."""

import json

import pytest
import torch

from qbench import ConfigError
from qbench.calib import block_inputs, calib_seqlen, calibration_ids
from qbench.cli import prevalidate
from qbench.methods import RunContext
from qbench.quant.blocks import arch_of, capture_inputs, replay_kwargs, run_block
from tiny_llama import tiny_llama


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def calib_tokens(tok, data_dir):
    """Token lists of the C4 calibration documents (1100-1999) and of the perplexity documents (0-1099)."""
    from qbench.data import c4_documents

    return tok(c4_documents("calib", data_dir)).input_ids, tok(c4_documents("eval", data_dir)).input_ids


def _is_slice_of(window: list[int], docs: list[list[int]]) -> bool:
    head = window[0]
    for doc in docs:
        for i in (i for i, t in enumerate(doc) if t == head):
            if doc[i : i + len(window)] == window:
                return True
    return False


def test_seqlen_defaults_follow_the_method(cfg_factory):
    assert calib_seqlen(cfg_factory("method=gptq")) == 2048
    assert calib_seqlen(cfg_factory("method=awq")) == 512
    assert calib_seqlen(cfg_factory("method=awq", "calib.seqlen=256")) == 256


def test_same_seed_same_windows_from_calibration_documents_only(cfg_factory, tok, calib_tokens):
    cfg = cfg_factory("method=gptq", "calib.nsamples=6", "calib.seqlen=256")
    ids, info = calibration_ids(cfg, tok)
    again, _ = calibration_ids(cfg, tok)
    other, _ = calibration_ids(cfg_factory("method=gptq", "calib.nsamples=6", "calib.seqlen=256", "calib.seed=1"), tok)
    assert ids.shape == (6, 256) and ids.dtype == torch.long
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert info["sampling"] == "reference" and info["source"].startswith("local:c4/") and "[1100:2000]" in info["source"]
    calib_docs, eval_docs = calib_tokens
    for window in ids.tolist():  # GPTQ reference: one document, random offset; never the perplexity text
        assert _is_slice_of(window, calib_docs) and not _is_slice_of(window, eval_docs)


def test_few_long_documents_switch_to_concatenation(cfg_factory, tok):
    cfg = cfg_factory("method=gptq", "calib.nsamples=128")  # 2048 tokens: only 33 local documents are longer
    ids, info = calibration_ids(cfg, tok)
    assert ids.shape == (128, 2048)
    assert info["sampling"] == "concat" and info["long_documents"] < 128 and info["documents"] == 900
    assert len({tuple(w[:8]) for w in ids.tolist()}) > 100  # windows spread over the stream


def test_wikitext2_calibration_refuses_test_data_in_one_line(cfg_factory, tok):
    with pytest.raises(ConfigError) as err:
        calibration_ids(cfg_factory("method=gptq", "calib=wikitext2"), tok)
    assert "train split" in str(err.value) and "\n" not in str(err.value)


def test_pile_from_the_data_root_or_refused(cfg_factory, tok, tmp_path):
    with pytest.raises(ConfigError) as err:
        calibration_ids(cfg_factory("method=awq", "calib=pile", f"data_dir={tmp_path}"), tok)
    assert "calib=pile" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "pile").mkdir()
    docs = [{"text": f"Document {i}: " + "the pile is a large corpus of diverse text. " * (20 + i)} for i in range(40)]
    (tmp_path / "pile" / "val.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    ids, info = calibration_ids(cfg_factory("method=awq", "calib=pile", f"data_dir={tmp_path}", "calib.nsamples=4",
                                            "calib.seqlen=64"), tok)
    assert ids.shape == (4, 64) and info["source"] == "local:pile/val.jsonl"


@pytest.mark.parametrize("argv,needle", [
    (["method=gptq", "calib=nosuch"], "unknown calib 'nosuch'; valid: c4, pile, wikitext2"),
    (["method=gptq", "calib.nsamples=0"], "calib.nsamples must be >= 1"),
    (["method=awq", "calib.seqlen=0"], "calib.seqlen must be >= 1"),
    (["method=gptq", "group_size=0"], "group_size must be -1"),
    (["method=awq", "group_size=0"], "group_size must be -1"),
    (["method=gptq", "bits=5"], "method gptq does not support bits=5; valid: 2, 3, 4, 8"),
    (["method=gptq", "method.act_order=maybe"], "method.act_order"),
    (["-m", "method=gptq,awq", "bits=3,4", "calib=c4,nosuch"], "unknown calib 'nosuch'"),
])
def test_bad_input_fails_in_one_line_before_loading(argv, needle):
    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_acceptance_sweep_is_valid():
    prevalidate(["-m", "method=gptq,awq", "bits=3,4", "calib.nsamples=8", "calib.seqlen=256", "eval.ppl.max_windows=2"])


@pytest.mark.parametrize("name", ["past_key_values", "cache"])  # "cache" from transformers 5.2x on
def test_replay_never_carries_a_kv_cache(name):
    from transformers import DynamicCache

    kwargs = replay_kwargs({name: DynamicCache(), "use_cache": True, "position_ids": torch.arange(4)})
    assert name not in kwargs and kwargs["use_cache"] is False and "position_ids" in kwargs


def test_block_output_of_a_sample_does_not_depend_on_earlier_samples():
    from transformers import DynamicCache

    from qbench.models import cache_keyword
    from qbench.quant.blocks import block_output

    model = tiny_llama()
    arch = arch_of(model)
    block = model.model.layers[0]
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (3, 32))
    others = torch.randint(0, 49152, (2, 32))
    # one sample per batch, replayed one after the other (as a sequential reference run would)
    after_two = run_block(block, capture_inputs(model, ids, 1, arch))[2][0]
    alone = run_block(block, capture_inputs(model, ids[2:], 1, arch))[0][0]
    after_others = run_block(block, capture_inputs(model, torch.cat([others, ids[2:]]), 1, arch))[2][0]
    batched = run_block(block, capture_inputs(model, ids, 3, arch))[0][0][2:]
    assert torch.equal(after_two, alone) and torch.equal(after_others, alone)
    assert torch.allclose(batched, alone, atol=1e-5)
    # the control: a cache shared across the replayed samples (transformers' use_cache=True) leaks
    cache = DynamicCache(config=model.config)
    leaky = [block_output(block, h, {**kw, cache_keyword(block): cache, "use_cache": True})
             for h, kw in capture_inputs(model, ids, 1, arch)]
    assert (leaky[2] - alone).abs().max() > 1e-3


def test_block_inputs_are_captured_once_per_process(cfg_factory, tok):
    model = tiny_llama()
    cfg = cfg_factory("method=gptq", "calib.nsamples=3", "calib.seqlen=32")
    ctx = RunContext(tok, "cpu", torch.float32, cfg.data_dir, True)
    first, info = block_inputs(model, cfg, ctx, arch_of(model))
    again, _ = block_inputs(model, cfg_factory("method=awq", "calib.nsamples=3", "calib.seqlen=32"), ctx, arch_of(model))
    assert again is first and sum(h.shape[0] for h, _ in first) == 3 and first[0][0].shape[1:] == (32, 64)
    assert info["nsamples"] == 3 and info["seqlen"] == 32


def test_recorded_inputs_are_the_same_with_early_stop():
    from qbench.quant.blocks import record_inputs

    model = tiny_llama()
    batches = capture_inputs(model, torch.randint(0, 49152, (4, 32)), 2, arch_of(model))
    block = model.model.layers[1]
    names = ["self_attn.k_proj", "mlp.up_proj"]
    full, early = {n: [] for n in names}, {n: [] for n in names}
    outputs = record_inputs(block, batches, names, lambda n, x: full[n].append(x))
    assert record_inputs(block, batches, names, lambda n, x: early[n].append(x), outputs=False) is None
    for n in names:
        assert len(full[n]) == len(early[n]) == 2 and all(torch.equal(a, b) for a, b in zip(full[n], early[n]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(outputs, run_block(block, batches)))
