"""GGUF block formats: our quantizers and dequantizers against the `gguf` package, GGUFLinear, mix rules."""

import gguf
import numpy as np
import pytest
import torch

from qbench.quant import gguf_mix
from qbench.quant.gguf_linear import GGUFLinear
from qbench.quant.gguf_quants import TYPES, dequantize, quantize, row_bytes

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian weights with the awkward cases: an all-zero block, an all-zero super-block, outliers,
    a constant block, an all-positive and an all-negative row."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[0, :32] = 0
    w[1, : min(cols, 256)] = 0
    w[2, 5] = 0.9
    w[3, 32:64] = 0.0125
    w[4] = np.abs(w[4])
    w[5] = -np.abs(w[5])
    return w


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("shape", [(8, 32), (48, 576), (7, 1536)])
def test_legacy_bytes_equal_gguf_package(qtype, shape):
    w = weights(*shape, seed=shape[1])
    ours = quantize(torch.from_numpy(w), qtype).numpy()
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    assert ours.shape == (shape[0], row_bytes(qtype, shape[1])) == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS)
def test_dequantize_equals_gguf_package(qtype):
    w = weights(16, 512, seed=1)
    raw = quantize(torch.from_numpy(w), qtype)
    ours = dequantize(raw, qtype, 512).numpy()
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours, ref)
    assert np.all(ours[1, :256] == 0)  # an all-zero super-block stays zero


def test_block_sizes_match_ggml():
    for name, t in TYPES.items():
        qtype = gguf.GGMLQuantizationType[name]
        assert t.ggml_type == qtype.value
        assert (t.block_elems, t.block_bytes) == gguf.GGML_QUANT_SIZES[qtype]


def test_error_falls_with_more_bits():
    w = torch.from_numpy(weights(64, 512, seed=2))
    err = {t: (dequantize(quantize(w, t), t, 512) - w).pow(2).mean().item() for t in K_QUANTS + ["Q8_0"]}
    assert err["Q2_K"] > err["Q3_K"] > err["Q4_K"] > err["Q5_K"] > err["Q6_K"] > err["Q8_0"]
    assert err["Q8_0"] < 1e-3 * w.pow(2).mean().item()


def test_gguf_linear_forward_uses_its_blocks():
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 96, bias=True)
    layer = GGUFLinear.from_linear(linear, "Q4_K")
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (96, 2 * 144)
    x = torch.randn(3, 5, 512)
    w = dequantize(layer.qweight, "Q4_K", 512)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, w, linear.bias), atol=1e-5)
    assert (w - linear.weight).pow(2).mean().sqrt() < 0.1 * linear.weight.pow(2).mean().sqrt()


def test_mix_on_smollm2_shapes():
    """llama.cpp's Q4_K_M for SmolLM2-135M (30 layers, hidden 576, ffn 1536, tied embeddings)."""
    rows = {"token_embd.weight": 576}
    for i in range(30):
        rows.update({f"blk.{i}.attn_{p}.weight": 576 for p in ("q", "k", "v", "output")})
        rows.update({f"blk.{i}.ffn_gate.weight": 576, f"blk.{i}.ffn_up.weight": 576, f"blk.{i}.ffn_down.weight": 1536})
    types = gguf_mix.tensor_types("Q4_K_M", rows, 30, tied=True)
    assert types["token_embd.weight"] == "Q8_0"  # Q6_K wanted, rows of 576 are not whole super-blocks
    more = [i for i in range(30) if gguf_mix.use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [types[f"blk.{i}.attn_v.weight"] for i in (0, 3, 5)] == ["Q8_0", "Q5_0", "Q8_0"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 5)] == ["Q6_K", "Q4_K", "Q6_K"]
    assert types["blk.7.attn_q.weight"] == types["blk.7.ffn_up.weight"] == "Q5_0"
    q3 = gguf_mix.tensor_types("Q3_K_M", rows, 30, tied=True)
    assert q3["blk.0.attn_v.weight"] == "Q5_1" and q3["blk.2.attn_v.weight"] == "Q5_0"
    assert q3["blk.0.ffn_down.weight"] == "Q5_K" and q3["blk.1.ffn_down.weight"] == "Q4_K"
    assert q3["blk.4.attn_q.weight"] == "Q4_0" and q3["blk.4.attn_output.weight"] == "Q5_0"
    assert gguf_mix.tensor_types("Q6_K", {"a": 576, "b": 1536}, 30, tied=True) == {"a": "Q8_0", "b": "Q6_K"}


def test_gguf_config_validation():
    from qbench import ConfigError
    from qbench.cli import prevalidate

    prevalidate(["-m", "method=gguf", "method.type=Q4_0,Q3_K_M"])
    with pytest.raises(ConfigError, match="unknown method.type for gguf 'Q7_K'; valid: Q4_0"):
        prevalidate(["method=gguf", "method.type=Q7_K"])



def test_dequantize_makes_no_host_tensors_after_first_call(monkeypatch):
    # a CUDA graph capture (eval.speed's graph decode) refuses host-to-device copies: after one call per
    # type, dequantization must build no tensor from Python or numpy data
    raws = {t: quantize(torch.randn(4, 512), t) for t in TYPES}
    first = {t: dequantize(raw, t, 512) for t, raw in raws.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor made from host data inside dequantize")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, refuse)
    for t, raw in raws.items():
        assert torch.equal(dequantize(raw, t, 512), first[t]), t
