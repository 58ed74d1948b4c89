"""KL divergence to the baseline: the math on small distributions, then the real model on one short window."""

import copy

import pytest
import torch

from qbench.eval import kld


def test_token_kl_full_matches_torch():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(7, 50), -1)
    lq = torch.log_softmax(torch.randn(7, 50), -1)
    kl, same, tail = kld.token_kl(lp, None, lq)
    expected = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, expected, atol=1e-6)
    assert torch.equal(same, lp.argmax(-1) == lq.argmax(-1)) and torch.all(tail == 0)
    kl_self, same_self, _ = kld.token_kl(lp, None, lp)
    assert torch.all(kl_self.abs() < 1e-7) and same_self.all()


def test_token_kl_topk_is_a_lower_bound_and_exact_at_full_k():
    torch.manual_seed(1)
    lp = torch.log_softmax(torch.randn(5, 40) * 2, -1)
    lq = torch.log_softmax(torch.randn(5, 40) * 2, -1)
    exact = kld.token_kl(lp, None, lq)[0]
    for k in (1, 5, 20):
        top = torch.topk(lp, k)
        kl, same, tail = kld.token_kl(top.values, top.indices.int(), lq)
        assert torch.all(kl <= exact + 1e-6) and torch.all(kl >= -1e-6)
        assert torch.equal(same, lp.argmax(-1) == lq.argmax(-1))
        assert torch.allclose(tail, 1 - top.values.exp().sum(-1), atol=1e-6)
    top = torch.topk(lp, 40)
    assert torch.allclose(kld.token_kl(top.values, top.indices.int(), lq)[0], exact, atol=1e-5)


def _fake_rtn(model, bits: int):
    """RTN w<bits> g128 weights (the grid QuantLinear stores, vectorized over groups) in plain linears."""
    from qbench.quant.grid import fake_quantize, find_params
    from qbench.quant.modules import quantizable_linears

    model = copy.deepcopy(model)
    for linear in quantizable_linears(model).values():
        rows = linear.weight.data.reshape(-1, 128)  # groups of 128 input channels (576 and 1536 divide)
        scale, zero = find_params(rows, bits, sym=False)
        linear.weight.data = fake_quantize(rows, scale[:, None], zero[:, None], bits).reshape(linear.weight.shape)
    return model


def test_kld_baseline_zero_and_grows_as_bits_shrink(smollm2, cfg_factory, data_dir, tmp_path, monkeypatch):
    from qbench.methods import RunContext

    monkeypatch.setenv("QBENCH_CACHE_DIR", str(tmp_path))
    cfg = cfg_factory("eval.ppl.seqlen=96", "eval.ppl.max_windows=1", "eval.kld=true", "eval.kld_windows=4")
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, data_dir, True)
    calls = []

    def base():
        calls.append(1)
        return smollm2.model

    self_kl = kld.kld_metrics(smollm2.model, smollm2.tokenizer, cfg, ctx, base)
    assert calls == [1] and len(list((tmp_path / "kld").glob("*/window*.pt"))) == 1  # 1 window: max_windows wins
    assert self_kl["kld_tokens"] == 95
    assert abs(self_kl["kld_mean"]) < 1e-4 and abs(self_kl["kld_p99"]) < 1e-3 and self_kl["top1_agree"] > 0.98
    results, models = {}, {}
    for bits in (4, 3, 2):
        models[bits] = _fake_rtn(smollm2.model, bits)
        results[bits] = kld.kld_metrics(models[bits], smollm2.tokenizer, cfg, ctx, base)
    assert calls == [1]  # the baseline came from the disk cache
    assert 1e-3 < results[4]["kld_mean"] < results[3]["kld_mean"] < results[2]["kld_mean"]
    assert results[4]["kld_p99"] < results[3]["kld_p99"] < results[2]["kld_p99"]
    assert results[4]["top1_agree"] > results[2]["top1_agree"]
    for r in results.values():
        assert r["kld_p99"] >= r["kld_mean"]
    # top-k storage (another cache entry): a lower bound of the exact KL, same top-1 agreement
    top = kld.kld_metrics(models[3], smollm2.tokenizer, cfg_factory("eval.ppl.seqlen=96", "eval.ppl.max_windows=1",
                                                                    "eval.kld_topk=256"), ctx, base)
    assert calls == [1, 1] and 0 < top["kld_mean"] <= results[3]["kld_mean"] and 0 < top["kld_tail_mass"] < 1
    assert top["top1_agree"] == pytest.approx(results[3]["top1_agree"])
