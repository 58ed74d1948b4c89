"""GPTQ: the per-layer solver against the paper's algorithm written column by column, its error vs RTN,
act-order groups through g_idx, and the block-wise pipeline on a tiny grouped-query-attention model."""

import pytest
import torch

from qbench.methods import RunContext
from qbench.methods.gptq import Hessian, gptq_quantize, quantize
from qbench.quant.grid import find_params, rtn_quantize
from qbench.quant.qlinear import QuantLinear
from tiny_llama import tiny_llama


def _layer(rows=48, cols=200, tokens=1024, seed=0):
    """A weight with outlier input channels and correlated inputs (cols=200: groups of 64 leave 8)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.2)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 3)) @ mix
    return W, X


def _hessian(X, batches=4):
    h = Hessian.zeros(X.shape[1], X.device)
    for chunk in X.view(batches, -1, X.shape[1]):  # [1, tokens, cols]: one sample per batch
        h.add(chunk[None])
    return h.H


def _written_out(W, H, bits, gs, sym, damp, act_order, static_groups, blocksize=128):
    """The paper's Algorithm 1 with the reference's details, column by column on W [rows, cols]."""
    W, H = W.clone().float(), H.clone()
    cols = W.shape[1]
    scale, zero = find_params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [find_params(W[:, i : i + gs], bits, sym) for i in range(0, cols, gs)] if static_groups and gs != -1 else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            if gs != -1:
                if groups is None and (i1 + i) % gs == 0:
                    scale, zero = find_params(W[:, i1 + i : i1 + i + gs], bits, sym)
                elif groups is not None:
                    scale, zero = groups[int(perm[i1 + i]) // gs]
            w = W1[:, i]
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1) - zero)
            Q[:, i1 + i] = q
            err = (w - q) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * Hinv[i1 + i, i1 + i : i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("bits,gs,sym,act_order,static", [
    (4, 64, False, True, False),   # act-order, group refits in permuted order, partial last group
    (3, 64, False, False, False),
    (3, 32, True, True, True),     # static groups with act-order
    (2, -1, False, True, False),   # per channel
    (8, 128, False, False, False),
])
def test_solver_matches_the_algorithm_written_out(bits, gs, sym, act_order, static):
    W, X = _layer(cols=300)  # 300 columns: three 128-column blocks, the last partial
    H = _hessian(X)
    qw, row_loss = gptq_quantize(W, H, bits, gs, sym, 0.01, act_order, static)
    expected = _written_out(W, H, bits, gs, sym, 0.01, act_order, static)
    got = qw.dequantize()
    close = torch.isclose(got, expected, atol=1e-5, rtol=1e-4)
    assert close.float().mean() > 0.999, f"{(~close).sum()} of {close.numel()} weights differ"  # rounding ties only
    assert row_loss.shape == (W.shape[0],) and (row_loss > 0).all()


@pytest.mark.parametrize("bits,gs", [(3, 64), (4, 64), (3, -1), (2, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_on_the_same_grid(bits, gs, act_order):
    W, X = _layer()
    qw, _ = gptq_quantize(W, _hessian(X), bits, gs, False, 0.01, act_order)
    rtn = rtn_quantize(W, bits, gs, False)
    err = lambda Q: (X @ W.T - X @ Q.T).norm().item()  # noqa: E731
    assert err(qw.dequantize()) < 0.9 * err(rtn.dequantize())


def test_act_order_groups_round_trip_through_g_idx():
    W, X = _layer(cols=200)
    H = _hessian(X)
    qw, _ = gptq_quantize(W, H, 4, 64, False, 0.01, act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    expected_g_idx = torch.empty(200, dtype=torch.int32)
    expected_g_idx[perm] = (torch.arange(200) // 64).to(torch.int32)  # group = position in quantization order
    assert torch.equal(qw.g_idx, expected_g_idx)
    assert qw.scales.shape == (4, 48) and torch.bincount(qw.g_idx.long()).tolist() == [64, 64, 64, 8]
    assert not torch.equal(qw.g_idx, torch.sort(qw.g_idx).values)  # really permuted
    layer = QuantLinear.from_quantized(qw, None)  # packed with g_idx, unpacked again
    assert torch.equal(layer.g_idx, qw.g_idx)
    assert torch.equal(layer.dequantize(), qw.dequantize())
    x = torch.randn(5, 200)
    assert torch.allclose(layer(x), x @ qw.dequantize().T, atol=1e-4)
    # every weight lies on its group's grid
    for g in range(4):
        cols = (qw.g_idx == g).nonzero().view(-1)
        codes = qw.dequantize()[:, cols] / qw.scales[g].float()[:, None] + qw.zeros[g].float()[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_static_groups_keep_contiguous_groups_with_act_order():
    W, X = _layer(cols=200)
    H = _hessian(X)
    qw, _ = gptq_quantize(W, H, 3, 64, False, 0.01, act_order=True, static_groups=True)
    assert torch.equal(qw.g_idx, (torch.arange(200) // 64).to(torch.int32))
    for g, start in enumerate(range(0, 200, 64)):
        scale, zero = find_params(W[:, start : start + 64], 3, False)
        assert torch.equal(qw.scales[g].float(), scale) and torch.equal(qw.zeros[g].float(), zero)


def test_dead_inputs_and_symmetric_grid():
    W, X = _layer(cols=96)
    X[:, [3, 50]] = 0  # inputs that are always zero: H_jj = 0
    qw, row_loss = gptq_quantize(W, _hessian(X), 4, 32, True, 0.01, act_order=True)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(row_loss).all()
    assert (deq[:, [3, 50]] == 0).all()
    assert (qw.zeros == 8).all()  # symmetric 4-bit grid


def test_pipeline_on_a_tiny_gqa_model(cfg_factory, smollm2):
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 49152, (2, 48))
    with torch.no_grad():
        before = model(ids).logits
    cfg = cfg_factory("method=gptq", "bits=4", "group_size=32", "calib.nsamples=4", "calib.seqlen=64")
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, cfg.data_dir, True)
    info = quantize(model, cfg, ctx)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(info["layer_loss"]) == sorted(names) and info["quantized_layers"] == 14
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert model.model.layers[0].self_attn.k_proj.out_features == 32  # GQA: 2 kv heads of 16
    assert info["settings"]["act_order"] and info["calib"]["nsamples"] == 4
    assert set(info["timings"]) == {"capture_s", "forward_s", "solve_s"}
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all() and (after - before).abs().mean() < 0.5 * before.abs().mean()


def test_true_sequential_changes_later_hessians_only(cfg_factory, smollm2):
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, None, True)
    losses = {}
    for ts in (True, False):
        model = tiny_llama(kv_heads=4)
        cfg = cfg_factory("method=gptq", "bits=3", "calib.nsamples=2", "calib.seqlen=64", f"method.true_sequential={ts}")
        losses[ts] = quantize(model, cfg, ctx)["layer_loss"]
    first = "model.layers.0.self_attn.q_proj"  # its inputs come before any quantized linear either way
    assert losses[True][first] == pytest.approx(losses[False][first], rel=1e-5)
    assert losses[True]["model.layers.0.mlp.down_proj"] != pytest.approx(losses[False]["model.layers.0.mlp.down_proj"], rel=1e-3)
