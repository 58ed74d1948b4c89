"""FP8: the E4M3/E5M2 grids against torch's float8 casts, the FP8 linear (weight-only and W8A8), and
SmolLM2 perplexity against its unquantized baseline."""

import copy
import math

import pytest
import torch

from qbench.quant.fp8 import FORMATS, FP8Linear, quantize_fp8, quantize_tokens


# (mantissa bits, smallest normal exponent, largest finite value) of the OCP FP8 formats
SPECS = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}


def round_to_grid(x: float, fmt: str) -> float:
    """x rounded to the nearest value of the format (ties to even mantissa), written from the format's
    definition: normals have `mant` fraction bits, subnormals the fixed step of the smallest binade."""
    mant, min_exp, _ = SPECS[fmt]
    if x == 0:
        return 0.0
    exp = max(math.floor(math.log2(abs(x))), min_exp)
    step = 2.0 ** (exp - mant)
    return round(x / step) * step  # Python's round() is round-half-to-even


def grid_values(fmt: str) -> torch.Tensor:
    """Every finite value of the format, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(FORMATS[fmt]).float()
    return values[torch.isfinite(values)]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_grid_rounding_matches_torch_cast(fmt):
    """Our definition of the grid and torch's float8 casts agree on representable values, on every
    midpoint between neighbours (ties to even), and on random values across all binades."""
    fmax = SPECS[fmt][2]
    grid = grid_values(fmt).unique()
    assert grid.max().item() == fmax and grid.numel() == (253 if fmt == "e4m3" else 247)
    mids = (grid[:-1] + grid[1:]) / 2
    torch.manual_seed(0)
    rand = torch.randn(4000) * torch.exp2(torch.randint(-20, 10, (4000,)).float())
    x = torch.cat([grid, mids, rand.clamp(-fmax, fmax)])
    cast = x.to(FORMATS[fmt]).float()
    ours = torch.tensor([round_to_grid(v, fmt) for v in x.tolist()])
    assert torch.equal(cast, ours)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_weight_roundtrip_is_torch_cast(fmt, per_channel):
    torch.manual_seed(1)
    w = torch.randn(96, 200) * torch.rand(96, 1)
    w[3] = 0.0  # a zero row: scale 1, codes 0
    q, scale = quantize_fp8(w, FORMATS[fmt], per_channel)
    fmax = SPECS[fmt][2]
    expect_scale = w.abs().amax(1) / fmax if per_channel else (w.abs().max() / fmax).reshape(1)
    expect_scale = torch.where(expect_scale > 0, expect_scale, torch.ones_like(expect_scale))
    assert q.dtype == FORMATS[fmt] and torch.equal(scale, expect_scale)
    s = scale[:, None] if per_channel else scale
    assert torch.equal(q.float() * s, (w / s).to(FORMATS[fmt]).float() * s)
    assert q.float().abs().max().item() == fmax  # the absmax lands exactly on the largest value
    rel = ((q.float() * s - w).abs() / w.abs().clamp(min=1e-30))[w.abs() > s * 2.0 ** SPECS[fmt][1]]
    assert rel.max() <= 2.0 ** -(SPECS[fmt][0] + 1) + 1e-7  # half a mantissa step, for normal values


def test_fp8_linear_weight_only_and_w8a8():
    torch.manual_seed(2)
    linear = torch.nn.Linear(256, 80)
    x = torch.randn(2, 7, 256)
    ref = linear(x)
    weight_only = FP8Linear(linear.weight.data, linear.bias, "e4m3", "channel", "none", kernel="torch")
    w = weight_only.weight_fp8.float() * weight_only.weight_scale[:, None]
    torch.testing.assert_close(weight_only(x), x @ w.t() + linear.bias, rtol=1e-6, atol=1e-6)

    w8a8 = FP8Linear(linear.weight.data, linear.bias, "e5m2", "tensor", "dynamic", kernel="torch")
    x2 = x.reshape(14, 256)
    sx = x2.abs().amax(1) / 448  # per-token E4M3 activations, whatever the weight format
    xq = (x2 / sx[:, None]).to(torch.float8_e4m3fn).float()
    expect = (xq @ w8a8.weight_fp8.float().t()) * sx[:, None] * w8a8.weight_scale + linear.bias
    torch.testing.assert_close(w8a8(x), expect.view(2, 7, 80), rtol=1e-6, atol=1e-6)
    q, s = quantize_tokens(x2)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(s, sx)
    rel = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(weight_only(x)) < 0.03 and rel(w8a8(x)) < 0.08  # 3 vs 2 mantissa bits (and e4m3 activations)


def test_triton_path_matches_torch():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    linear = torch.nn.Linear(128, 48).to(device)
    x = torch.randn(20, 128, device=device)
    for fmt, scale in (("e4m3", "channel"), ("e5m2", "tensor")):
        layer = FP8Linear(linear.weight.data, linear.bias, fmt, scale, "dynamic", kernel="triton")
        torch.testing.assert_close(layer(x), layer.forward_torch(x) + layer.bias, rtol=1e-3, atol=1e-3)


@pytest.mark.model
def test_smollm2_fp8_perplexity_within_two_percent(smollm2, data_dir, cfg_factory):
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import perplexity, tokenize
    from qbench.methods import RunContext, fp8

    ids = tokenize(smollm2.tokenizer, perplexity_text("wikitext2", data_dir), key=f"wikitext2:{data_dir}")
    base = perplexity(smollm2.model, ids, 512, 1)["ppl"]
    model = copy.deepcopy(smollm2.model)
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, data_dir, quiet=True)
    info = fp8.quantize(model, cfg_factory("method=fp8"), ctx)
    assert info == {"quantized_layers": 210, "format": "e4m3", "scale": "tensor", "activations": "none"}
    ppl = perplexity(model, ids, 512, 1)["ppl"]
    assert abs(ppl / base - 1) < 0.02, (ppl, base)
