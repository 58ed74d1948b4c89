"""AWQ: scaling alone keeps the block's function, searched scales never lose to s = 1, the clipping
search, grouped-query attention, and the pipeline on a tiny model."""

import pytest
import torch

from qbench.methods import RunContext
from qbench.methods.awq import _Inputs, apply_scale, awq_block, group_fake_quant, quantize, scalable, search_clip, search_scale
from qbench.quant.blocks import LLAMA, arch_of, block_output, capture_inputs, record_inputs, run_block
from qbench.quant.grid import rtn_quantize
from qbench.quant.qlinear import QuantLinear
from tiny_llama import tiny_llama

SETTINGS = {"bits": 3, "group_size": 32, "sym": False, "zero_in_range": False, "n_grid": 20, "clip": False,
            "clip_n_grid": 20, "clip_max_shrink": 0.5, "clip_n_tokens": 512}


def _block_batches(kv_heads=2, samples=4, seqlen=48, seed=0):
    model = tiny_llama(kv_heads=kv_heads, seed=seed)
    torch.manual_seed(seed)
    ids = torch.randint(0, 49152, (samples, seqlen))
    batches = capture_inputs(model, ids, 2, arch_of(model))
    return model, model.model.layers[0], batches


def _outputs(block, batches):
    return torch.cat([h for h, _ in run_block(block, batches)])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_scaling_alone_leaves_block_outputs_unchanged(kv_heads):
    _, block, batches = _block_batches(kv_heads)
    before = _outputs(block, batches)
    g = torch.Generator().manual_seed(1)
    for prev, linears, _ in LLAMA["scales"]:
        if scalable(block, prev, linears):
            s = torch.rand(block.get_submodule(linears[0]).in_features, generator=g) * 4 + 0.1
            apply_scale(block.get_submodule(prev), [block.get_submodule(n) for n in linears], s)
    assert torch.allclose(_outputs(block, batches), before, rtol=1e-4, atol=1e-5)
    # the searched scales too: awq_block without clipping folds scales but leaves the block's function
    _, block, batches = _block_batches(kv_heads)
    before = _outputs(block, batches)
    outputs, summary = awq_block(block, batches, LLAMA, SETTINGS)
    assert torch.allclose(torch.cat([h for h, _ in outputs]), before)  # the float chain's outputs
    assert torch.allclose(_outputs(block, batches), before, rtol=1e-4, atol=1e-5)
    assert any(info["alpha"] > 0 for info in summary["scales"].values() if isinstance(info, dict))


def test_grouped_query_attention_skips_v_to_o_only():
    _, block, batches = _block_batches(kv_heads=2)
    _, summary = awq_block(block, batches, LLAMA, SETTINGS)
    assert summary["scales"]["self_attn.v_proj"].startswith("skipped")
    assert set(summary["scales"]) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    _, block, batches = _block_batches(kv_heads=4)  # multi-head: v_proj outputs are o_proj inputs
    _, summary = awq_block(block, batches, LLAMA, SETTINGS)
    assert isinstance(summary["scales"]["self_attn.v_proj"], dict)


def _judged_error(judged, linears, x_batches, kwargs, s, bits, gs, zero_in_range):
    """Independent check: the judged module's output error when its linears hold Q(W s)/s."""
    originals = [lin.weight.data.clone() for lin in linears]
    run = lambda: [block_output(judged, x, kw) if kw is not None else judged(x) for x, kw in zip(x_batches, kwargs)]  # noqa: E731
    reference = run()
    for lin, w in zip(linears, originals):
        lin.weight.data = rtn_quantize(w * s, bits, gs, False, zero_in_range).dequantize() / s
    err = sum((o - r).pow(2).sum() for o, r in zip(run(), reference)).item()
    for lin, w in zip(linears, originals):
        lin.weight.data = w
    return err


@pytest.mark.parametrize("bits,zero_in_range", [(3, False), (4, False), (3, True)])
def test_searched_scales_never_worse_than_no_scaling(bits, zero_in_range):
    _, block, batches = _block_batches(kv_heads=4, seed=bits)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    inputs = {n: _Inputs() for n in names}
    record_inputs(block, batches, names, lambda n, x: inputs[n].batches.append(x))
    kwargs = [kw for _, kw in batches]
    for prev, linear_names, judged_name in LLAMA["scales"]:
        linears = [block.get_submodule(n) for n in linear_names]
        judged = block.get_submodule(judged_name) if judged_name else linears[0]
        kws = kwargs if judged_name == "self_attn" else [None] * len(kwargs)
        originals = [lin.weight.data.clone() for lin in linears]
        s, info = search_scale(judged, linears, inputs[linear_names[0]], kws, bits, 32, False, 20, zero_in_range)
        assert all(torch.equal(lin.weight.data, w) for lin, w in zip(linears, originals))  # search restores W
        ones = torch.ones_like(s)
        searched = _judged_error(judged, linears, inputs[linear_names[0]].batches, kws, s, bits, 32, zero_in_range)
        unscaled = _judged_error(judged, linears, inputs[linear_names[0]].batches, kws, ones, bits, 32, zero_in_range)
        assert searched <= unscaled * (1 + 1e-6), (prev, info)
        assert info["loss"] <= info["loss_s1"]
    # alpha = 0 is s = 1 exactly: a one-point grid returns no scaling
    s, info = search_scale(block.mlp.down_proj, [block.mlp.down_proj], inputs["mlp.down_proj"], [None] * len(kwargs), 3, 32, False, 1)
    assert info["alpha"] == 0 and torch.equal(s, torch.ones_like(s))


@pytest.mark.parametrize("in_f,gs", [(200, 64), (128, 32), (96, -1)])
def test_group_fake_quant_is_grouped_rtn(in_f, gs):
    w = torch.randn(24, in_f)
    assert torch.equal(group_fake_quant(w, 3, gs, False), rtn_quantize(w, 3, gs, False).dequantize())


@pytest.mark.parametrize("zero_in_range", [False, True])
def test_clip_search_picks_the_best_threshold_of_its_grid(zero_in_range):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 80, generator=g)
    w[:, 5] *= 6  # an outlier worth clipping
    x = torch.randn(600, 80, generator=g)
    max_val = search_clip(w, x, 3, 32, False, zero_in_range=zero_in_range)  # groups 32, 32, 16
    xs = x[:: 600 // 512]
    for row in range(8):
        for start, size in ((0, 32), (32, 32), (64, 16)):
            wg, xg = w[row, start : start + size], xs[:, start : start + size]
            errs = []
            for i in range(10):
                m = wg.abs().max() * (1 - i / 20)
                q = rtn_quantize(wg.clamp(-m, m)[None], 3, -1, False, zero_in_range).dequantize()[0]
                errs.append(((xg @ q - xg @ wg) ** 2).mean().item())
            chosen = max_val[row, start].item()
            assert torch.all(max_val[row, start : start + size] == chosen)
            step = round((1 - chosen / wg.abs().max().item()) * 20)
            assert chosen == pytest.approx((wg.abs().max() * (1 - step / 20)).item(), rel=1e-6)
            assert errs[step] <= min(errs) * (1 + 1e-4)  # the best of the grid (up to float ties) ...
            assert errs[step] <= errs[0] * (1 + 1e-4)  # ... so never worse than no clipping
    assert (max_val[:, 5] < w[:, 5].abs()).any()  # the outlier column does get clipped somewhere


def test_pipeline_on_a_tiny_gqa_model(cfg_factory, smollm2):
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 49152, (2, 48))
    with torch.no_grad():
        before = model(ids).logits
    cfg = cfg_factory("method=awq", "bits=4", "group_size=32", "calib.nsamples=4", "calib.seqlen=64")
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, cfg.data_dir, True)
    info = quantize(model, cfg, ctx)
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14 and info["quantized_layers"] == 14
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.startswith("model.layers"))
    block0 = info["blocks"]["model.layers.0"]
    assert sorted(block0["clipped"]) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj", "self_attn.v_proj"]
    assert info["calib"]["seqlen"] == 64 and info["settings"]["n_grid"] == 20
    assert info["settings"]["zero_in_range"] is False  # llm-awq's grid, AWQ's default
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all() and (after - before).abs().mean() < 0.5 * before.abs().mean()
