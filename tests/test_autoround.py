"""AutoRound: iters=0 is RTN on the same grid, tuning never ends above RTN's block loss, the learned
offsets and range scales stay in their bounds, a seed fixes the result, the GPTQ-layout export loads
back, and bad settings fail before the model loads."""

import json

import pytest
import torch

from qbench import ConfigError
from qbench.cli import prevalidate
from qbench.methods import RunContext, get_method
from qbench.methods.autoround import CyclicSampler, TunedLinear, forward_all, tune_block
from qbench.quant.blocks import arch_of, capture_inputs
from qbench.quant.gptq_format import load_checkpoint
from qbench.quant.grid import rtn_quantize
from qbench.quant.qlinear import QuantLinear
from tiny_llama import tiny_llama

NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _settings(**over):
    s = {"bits": 3, "group_size": 32, "sym": False, "iters": 12, "lr": 1 / 12, "minmax_lr": 1 / 12,
         "batch_size": 4, "enable_minmax_tuning": True}
    return {**s, **over}


def _block0(samples=4, seqlen=48, seed=0):
    """Block 0 of the tiny model, its calibration inputs [samples, seqlen, 64] and replay kwargs."""
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 49152, (samples, seqlen), generator=torch.Generator().manual_seed(seed))
    (x, kwargs), = capture_inputs(model, ids, samples, arch_of(model))
    return model.model.layers[0], x, kwargs


def _tune(block, x, kwargs, s, seed=0):
    return tune_block(block, NAMES, x, x, kwargs, x.shape[0], s, torch.Generator().manual_seed(seed))


def _block_mse(block, weights, x, kwargs, reference):
    """MSE of the block's outputs with its linears' weights set to `weights` (name -> [out, in])."""
    originals = {n: block.get_submodule(n).weight.data for n in weights}
    for n, w in weights.items():
        block.get_submodule(n).weight.data = w
    out = forward_all(block, x, kwargs, x.shape[0])
    for n, w in originals.items():
        block.get_submodule(n).weight.data = w
    return (out - reference).pow(2).mean().item()


@pytest.mark.parametrize("bits,gs,sym", [(4, 32, False), (3, 48, False), (2, -1, False), (4, 48, True), (8, 128, False)])
def test_zero_iterations_is_rtn_on_the_same_grid(bits, gs, sym):
    """gs=48: partial last groups (64 = 48 + 16, 160 = 3 * 48 + 16); gs=128 > 64 inputs: one group."""
    block, x, kwargs = _block0()
    _, quantized, info = _tune(block, x, kwargs, _settings(bits=bits, group_size=gs, sym=sym, iters=0))
    assert info["loss_best"] is None and info["v_absmax"] == 0
    for name in NAMES:
        rtn = rtn_quantize(block.get_submodule(name).weight.data, bits, gs, sym)
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(quantized[name], field), getattr(rtn, field)), (name, field)


@pytest.mark.parametrize("bits,minmax", [(3, True), (2, True), (4, False)])
def test_block_loss_after_tuning_not_above_rtn(bits, minmax):
    """With every sample in every batch, the kept iterate's loss is measured on the same data as
    iterate 0 (RTN), so it can only be lower; checked again independently of the tuning loop."""
    block, x, kwargs = _block0()
    s = _settings(bits=bits, enable_minmax_tuning=minmax)
    fp_out, quantized, info = _tune(block, x, kwargs, s)
    rtn = {n: rtn_quantize(block.get_submodule(n).weight.data, bits, 32, False).dequantize() for n in NAMES}
    tuned = {n: qw.dequantize() for n, qw in quantized.items()}
    rtn_mse, tuned_mse = _block_mse(block, rtn, x, kwargs, fp_out), _block_mse(block, tuned, x, kwargs, fp_out)
    assert info["loss_iter0"] == pytest.approx(rtn_mse, rel=1e-4)
    assert info["loss_best"] == pytest.approx(tuned_mse, rel=1e-4)
    assert tuned_mse < 0.95 * rtn_mse, (tuned_mse, rtn_mse)
    if not minmax:
        assert info["minmax_min"] == 1.0


def test_offsets_and_range_scales_stay_in_their_bounds(monkeypatch):
    """A learning rate 10x the default budget would carry V and alpha/beta far out; the clamps hold them."""
    import qbench.methods.autoround as autoround

    made = []

    class Kept(TunedLinear):  # the tuned layers, to read their last parameters
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(autoround, "TunedLinear", Kept)
    block, x, kwargs = _block0()
    original = block.get_submodule(NAMES[0])
    _, quantized, info = _tune(block, x, kwargs, _settings(iters=10, lr=0.5, minmax_lr=0.5))
    for t in made:
        assert t.v.min() >= -0.5 and t.v.max() <= 0.5
        for p in (t.alpha, t.beta):
            assert p.min() >= 0.5 and p.max() <= 1.0
    assert max(t.v.abs().max() for t in made) == 0.5  # the bounds were reached, and held
    assert min(t.alpha.min() for t in made) == 0.5
    assert 0.5 <= info["minmax_min"] <= 1 and info["v_absmax"] <= 0.5
    assert block.get_submodule(NAMES[0]) is original  # the float linears are given back
    assert all(int(qw.codes.max()) <= 7 for qw in quantized.values())


def test_tuned_weight_matches_its_integer_codes():
    """What the block saw during tuning is what the QuantLinear serves."""
    lin = torch.nn.Linear(80, 24)
    t = TunedLinear(lin, 4, 32, False, True)
    with torch.no_grad():
        t.v.uniform_(-0.5, 0.5), t.alpha.uniform_(0.5, 1), t.beta.uniform_(0.5, 1)
    layer = QuantLinear.from_quantized(t.quantized(), lin.bias)
    assert torch.equal(layer.dequantize(), t.weight_q().detach())
    x = torch.randn(3, 80)
    assert torch.allclose(layer(x), t(x), atol=1e-5)


def test_sampler_sees_every_sample_once_per_pass():
    sampler = CyclicSampler(10, 3, torch.Generator().manual_seed(0))
    first = [i for _ in range(3) for i in sampler.next()]
    assert len(set(first)) == 9  # three batches of one shuffled pass
    assert len(sampler.next()) == 3  # one left: a new pass starts


def test_same_seed_same_result_other_seed_other_batches():
    block, x, kwargs = _block0(samples=6)
    s = _settings(batch_size=2, iters=6)
    runs = [_tune(block, x, kwargs, s, seed)[1] for seed in (0, 0, 1)]
    assert all(torch.equal(runs[0][n].codes, runs[1][n].codes) for n in NAMES)
    assert any(not torch.equal(runs[0][n].codes, runs[2][n].codes) for n in NAMES)


def test_pipeline_export_then_load(cfg_factory, smollm2, tmp_path):
    model = tiny_llama(kv_heads=2)
    cfg = cfg_factory("method=autoround", "bits=4", "group_size=48", "calib.nsamples=4", "calib.seqlen=64",
                      "method.iters=4", "method.batch_size=2")
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, cfg.data_dir, True)
    method = get_method("autoround")
    info = method.quantize(model, cfg, ctx)
    assert info["quantized_layers"] == 14 and sorted(info["blocks"]) == ["model.layers.0", "model.layers.1"]
    assert info["settings"]["lr"] == 0.25 and info["settings"]["minmax_lr"] == 0.25  # null = 1 / iters
    assert all(b["loss_best"] <= b["loss_iter0"] for b in info["blocks"].values())
    method.export(model, cfg, ctx, str(tmp_path))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["method"] == "autoround" and qc["desc_act"] is False and qc["iters"] == 4
    loaded = load_checkpoint(str(tmp_path), torch.float32)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert len(names) == 14
    for name in names:
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(model.get_submodule(name), buf), getattr(loaded.get_submodule(name), buf))
    ids = torch.randint(0, 49152, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("argv,needle", [
    (["method=autoround", "bits=5"], "method autoround does not support bits=5; valid: 2, 3, 4, 8"),
    (["method=autoround", "method.iters=-1"], "method.iters for autoround must be in [0, inf], got -1"),
    (["method=autoround", "method.batch_size=0"], "method.batch_size for autoround must be in [1, inf], got 0"),
    (["method=autoround", "method.enable_minmax_tuning=maybe"], "method.enable_minmax_tuning for autoround"),
])
def test_bad_settings_fail_in_one_line_before_load(argv, needle):
    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)
