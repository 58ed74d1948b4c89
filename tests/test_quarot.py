"""QuaRot: the Hadamard constructions, the rotation leaves the float model unchanged, the online Hadamard
before down_proj, W4A4 on a planted-outlier tiny model against the unrotated W4A4, determinism, GPTQ
weights, validation before load."""

import copy

import pytest
import torch

from qbench import ConfigError
from qbench.cli import prevalidate
from qbench.methods import RunContext
from qbench.methods.quarot import LLAMA_ROTATION, QuaRotLinear, clip_search_rtn, fake_quant_tokens, quantize, rotate_model, wrap_online
from qbench.quant.grid import rtn_quantize
from qbench.quant.hadamard import Hadamard, factor, orthogonal
from tiny_llama import tiny_llama

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls and a loop of small ops: one CPU thread is faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IDS = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.double()


def rel_err(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("n,base", [(12, 12), (20, 20), (28, 28), (36, 36), (160, 20), (576, 36), (1536, 12), (64, 1)])
def test_hadamard_sizes_are_orthogonal_and_fast_matches_explicit(n, base):
    """SmolLM2's hidden 576 = 36 x 16 and intermediate 1536 = 12 x 128; the fast transform = x @ M^T."""
    had = Hadamard(n)
    assert had.b == base
    M = had.matrix()
    torch.testing.assert_close(M @ M.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal((M * n**0.5).round().abs(), torch.ones(n, n, dtype=torch.float64))  # entries +-1
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(had.transform(x), x @ M.T, rtol=0, atol=1e-12)


def test_no_hadamard_falls_back_to_a_recorded_random_orthogonal():
    assert factor(52) is None and factor(9) is None  # 52 needs GF(25); odd orders have none
    Q, what = orthogonal(52, torch.Generator().manual_seed(0))
    assert "random orthogonal" in what
    torch.testing.assert_close(Q @ Q.T, torch.eye(52, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kv_heads,tie", [(2, True), (4, False)])
def test_rotation_without_quantization_leaves_the_logits_unchanged(kv_heads, tie):
    """Norms fused, residual rotated, online Hadamard before down_proj, per-head v/o Hadamard: fp32 logits equal."""
    model = tiny_llama(kv_heads=kv_heads, tie=tie)
    ref = logits(model)
    Q, _ = orthogonal(64, torch.Generator().manual_seed(0))
    info = rotate_model(model, Q, online=True, rotate_ov=True)
    assert info["untied_embeddings"] == tie and info["online_down_proj"] == "Hadamard 160 = H_20 (Paley) x Sylvester 8"
    assert rel_err(logits(model), ref) > 0.1  # down_proj's weights now expect x H^T at their input
    assert wrap_online(model, online=True, act_bits=16, act_clip=1.0) == 2
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules() if n.endswith("norm"))


def test_online_hadamard_before_down_proj_is_the_explicit_orthogonal_matrix():
    had = Hadamard(1536)
    M = had.matrix().float()
    x = torch.randn(4, 7, 1536)
    down = torch.nn.Linear(1536, 96, bias=False)
    wrapped = QuaRotLinear(torch.nn.Linear(1536, 96, bias=False), had, act_bits=16, act_clip=1.0)
    wrapped.inner.weight.data = had.transform(down.weight.data.double()).float()  # W H^T offline
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), down(x), rtol=1e-4, atol=1e-4)
        seen = {}
        wrapped.inner.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
        wrapped(x)
    torch.testing.assert_close(seen["x"], x @ M.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["x"].norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)  # orthogonal


def test_activation_fake_quant_per_token_with_clip():
    x = torch.randn(3, 64)
    q = fake_quant_tokens(x, 4, 0.9)
    scale = x.abs().amax(-1, keepdim=True) * 0.9 / 7
    assert torch.allclose(q / scale, (q / scale).round(), atol=1e-4) and (q / scale).abs().max() <= 8 + 1e-4
    assert rel_err(fake_quant_tokens(x.double(), 8, 1.0), x.double()) < 0.01


def test_clip_search_never_worse_than_the_full_range():
    w = torch.randn(32, 256)
    w[:, 3] *= 8  # one large column: clipping the rest of its rows pays
    full = rtn_quantize(w, 4, -1, True).dequantize()
    clipped, ratios = clip_search_rtn(w, 4, -1, True, True)
    err = lambda q: (q - w).abs().pow(2.4).sum(dim=1)
    assert (err(clipped.dequantize()) <= err(full) + 1e-6).all() and ratios[0] < 1.0


def planted_outliers(model, channels=(3, 17, 40), factor=30.0):
    """Activation outliers at every norm-fed linear's input, the function unchanged: the norms' scales
    of a few channels x30, the linears' weight columns / 30 (the outlier-activation, small-weight
    channels of trained LLMs)."""
    with torch.no_grad():
        for block in model.model.layers:
            for norm, names in LLAMA_ROTATION["norms"]:
                block.get_submodule(norm).weight[list(channels)] *= factor
                for name in names:
                    block.get_submodule(name).weight[:, list(channels)] /= factor
    return model


@pytest.fixture(scope="module")
def ctx():
    from qbench.models import default_tokenizer

    return RunContext(default_tokenizer(), "cpu", torch.float32, None, True)


def test_w4a4_with_rotation_far_below_unrotated_on_planted_outliers(cfg_factory, ctx):
    """W4A4 (RTN with clip search, per-token int4 activations) with and without the rotation; untied, so
    the logits are not dominated by the embedding."""
    model = planted_outliers(tiny_llama(kv_heads=2, tie=False))
    ref = logits(model)
    errs = {}
    for rotate in ("true", "false"):
        m = copy.deepcopy(model)
        cfg = cfg_factory("method=quarot", "kernel=torch", "bits=4", "method.act_bits=4", f"method.rotate={rotate}")
        info = quantize(m, cfg, ctx)
        assert info["quantized_layers"] == 14 and info["online_wrapped"] == 14
        errs[rotate] = rel_err(logits(m), ref)
    assert errs["true"] < errs["false"] / 3, errs  # measured 0.22 vs 0.75
    m = copy.deepcopy(model)
    quantize(m, cfg_factory("method=quarot", "kernel=torch", "method.weights=none", "method.act_bits=8"), ctx)
    assert rel_err(logits(m), ref) < errs["true"] / 3  # W16A8 after rotation: near the float model


def test_deterministic_for_a_seed(cfg_factory, ctx):
    model = tiny_llama(kv_heads=2)
    outs = []
    for seed in (0, 0, 1):
        m = copy.deepcopy(model)
        info = quantize(m, cfg_factory("method=quarot", "kernel=torch", "method.act_bits=4", f"seed={seed}"), ctx)
        outs.append(logits(m))
    assert info["rotation"] == "random Hadamard 64 = Sylvester (random signs)"
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_gptq_weights_on_the_rotated_model(cfg_factory, ctx, data_dir):
    """GPTQ's Hessians of the rotated inputs (down_proj's after its online Hadamard): close to the float model."""
    model = tiny_llama(kv_heads=2)
    ref = logits(model)
    cfg = cfg_factory("method=quarot", "kernel=torch", "method.weights=gptq", "calib.nsamples=4", "calib.seqlen=64")
    info = quantize(model, cfg, ctx)
    assert info["quantized_layers"] == 14 and info["calib"]["seqlen"] == 64
    assert rel_err(logits(model), ref) < 0.2


@pytest.mark.parametrize("argv,needle", [
    (["method=quarot", "method.act_bits=5"], "unknown method.act_bits for quarot 5; valid: 16, 8, 4"),
    (["method=quarot", "method.weights=awq"], "unknown method.weights for quarot 'awq'"),
    (["method=quarot", "method.act_clip=1.5"], "method.act_clip for quarot must be in [0.01, 1.0], got 1.5"),
    (["method=quarot", "bits=16"], "method quarot does not support bits=16"),
    (["method=quarot", "model=shape:tiny-qwen2", "method.rotate_ov=maybe"], "unknown method.rotate_ov for quarot"),
])
def test_bad_values_fail_before_load_in_one_line(argv, needle):
    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unsupported_architecture_fails_before_load(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(ConfigError) as err:
        prevalidate(["method=quarot", f"model={tmp_path}"])
    assert "does not support model" in str(err.value) and "'gpt2'" in str(err.value) and "\n" not in str(err.value)


def test_rotated_model_through_an_int8_kv_cache():
    """kv_cache=int8 on the rotated model: the same keys (the residual rotation leaves q/k/v unchanged),
    values cached in the per-head Hadamard basis; as close to the float model as the unrotated one is."""
    from qbench.kvcache import make_dynamic_cache
    from qbench.models import cache_keyword

    model = tiny_llama(kv_heads=2)
    ref = logits(model)

    def through_cache(m):
        with torch.no_grad():
            return m(IDS, use_cache=True, **{cache_keyword(m): make_dynamic_cache(m, "int8")}).logits.double()

    plain = rel_err(through_cache(model), ref)
    rotate_model(model, orthogonal(64, torch.Generator().manual_seed(0))[0], online=True, rotate_ov=True)
    wrap_online(model, online=True, act_bits=16, act_clip=1.0)
    rotated = rel_err(through_cache(model), ref)
    assert 0 < rotated < 0.01 and rotated < 2 * plain + 1e-4, (plain, rotated)
