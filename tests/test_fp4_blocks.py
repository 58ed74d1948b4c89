"""MXFP4 / NVFP4: the E2M1 grid, the E8M0 and E4M3 scale rules and the packing worked out by hand;
byte-identical to torchao's quantizers; the Triton dequantization equal to the torch reference bit for
bit; the linear; SmolLM2 perplexity; the one-line config errors."""

import copy
import warnings

import pytest
import torch

from qbench.quant.fp4_blocks import (LinearFP4Blocks, decode_e2m1, dequantize, e8m0_to_float, encode_e2m1,
                                     pack_nibbles, quantize_mxfp4, quantize_nvfp4, unpack_nibbles)


def test_e2m1_rounding_by_hand():
    # exact values; every midpoint (ties to the even code); clamping; signs and zeros
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                      0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0,
                      0.26, 0.74, 5.01, 6.5, 1e9,
                      -0.0, -0.2, -0.75, -3.5, -7.0])
    codes = [0, 1, 2, 3, 4, 5, 6, 7,
             0, 2, 2, 4, 4, 6, 6,
             1, 1, 7, 7, 7,
             8, 8, 10, 14, 15]
    assert encode_e2m1(x).tolist() == codes
    values = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0,
              0.5, 0.5, 6.0, 6.0, 6.0, -0.0, -0.0, -1.0, -4.0, -6.0]
    assert decode_e2m1(encode_e2m1(x)).tolist() == values


def test_packing_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4], [15, 0, 8, 7]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0x78]]
    assert torch.equal(unpack_nibbles(packed), codes)
    rand = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(rand)), rand)


def test_mxfp4_scale_rule_by_hand():
    w = torch.zeros(1, 128)
    w[0, :4] = torch.tensor([6.0, -3.0, 1.25, 0.2])      # amax 6: floor(log2 6) = 2 -> 2^0, e = 127
    w[0, 32:35] = torch.tensor([7.9, -7.0, 2.5])        # amax 7.9: still 2^0; 7.9 and -7 clamp to 6
    w[0, 64:67] = torch.tensor([0.75, -0.3, 0.0625])    # amax 0.75: floor -1 -> 2^-3 = 0.125, e = 124
    # block 3 (96..127) all zero: e = 0 (2^-127), codes 0
    packed, e = quantize_mxfp4(w)
    assert e.tolist() == [[127, 127, 124, 0]] and e.dtype == torch.uint8
    assert e8m0_to_float(e).tolist() == [[1.0, 1.0, 0.125, 2.0 ** -127]]
    deq = dequantize("mxfp4", packed, e, None, 128)
    assert deq[0, :4].tolist() == [6.0, -3.0, 1.0, 0.0]        # 1.25 ties to 1, 0.2 rounds to 0
    assert deq[0, 32:35].tolist() == [6.0, -6.0, 2.0]          # 2.5 ties to 2
    assert deq[0, 64:67].tolist() == [0.75, -0.25, 0.0625]     # 0.75/0.125 = 6, -2.4 -> -2, 0.5
    assert not deq[0, 96:].any() and deq[0, 4:32].abs().sum() == 0
    assert unpack_nibbles(packed)[0, :4].tolist() == [7, 13, 2, 0]  # 6, -3, 1, +0


def test_nvfp4_scale_rule_by_hand():
    w = torch.zeros(1, 48)
    w[0, :3] = torch.tensor([2688.0, 560.0, -100.0])  # tensor amax 2688 = 448 * 6: tensor scale 1
    w[0, 16:18] = torch.tensor([1.8, 0.9])            # amax / 6 = 0.3 -> E4M3 0.3125 (nearest)
    w[0, 32] = 1e-3                                   # amax / 6 below 2^-6: the scale floors at 2^-6
    packed, s, t = quantize_nvfp4(w)
    assert t.tolist() == [1.0] and s.dtype == torch.float8_e4m3fn
    assert s.float().tolist() == [[448.0, 0.3125, 2.0 ** -6]]
    deq = dequantize("nvfp4", packed, s, t, 48)
    # 560 / 448 = 1.25 ties to 1; -100 / 448 = -0.223 -> -0; 1.8 * 3.2 = 5.76 -> 6; 0.9 * 3.2 = 2.88 -> 3
    assert deq[0, :3].tolist() == [2688.0, 448.0, -0.0]
    assert deq[0, 16:18].tolist() == [6 * 0.3125, 3 * 0.3125]
    assert deq[0, 32].item() == 0.0  # 1e-3 * 64 = 0.064 -> 0
    w2 = w * 3
    _, _, t2 = quantize_nvfp4(w2)
    assert t2.tolist() == [(w2.abs().max() / 2688.0).item()]
    _, s0, t0 = quantize_nvfp4(torch.zeros(2, 16))  # an all-zero weight: tensor scale 1, no NaN
    assert t0.tolist() == [1.0] and s0.float().tolist() == [[2.0 ** -6], [2.0 ** -6]]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_padding_a_row_that_is_not_whole_blocks(fmt):
    torch.manual_seed(0)
    w = torch.randn(5, 40)
    padded = torch.cat([w, torch.zeros(5, 24)], dim=1)  # 64: whole blocks of 32 and of 16
    q = quantize_mxfp4 if fmt == "mxfp4" else quantize_nvfp4
    a, b = q(w), q(padded)  # a pads 40 up to 48 (NVFP4) or 64 (MXFP4): b's first blocks
    assert all(torch.equal(x.view(torch.uint8), y[:, :x.shape[1]].view(torch.uint8)) for x, y in zip(a[:2], b[:2]))
    assert torch.equal(dequantize(fmt, *a[:2], a[2] if fmt == "nvfp4" else None, 40), dequantize(
        fmt, *b[:2], b[2] if fmt == "nvfp4" else None, 64)[:, :40])


@pytest.fixture(scope="module")
def mx():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor
    return mx_tensor, nvfp4_tensor


def _weights():
    torch.manual_seed(1)
    w = torch.randn(96, 320) * torch.rand(96, 1) * 0.05
    w[7, :32] = 0.0       # a zero block
    w.view(-1)[::37] *= 40  # outliers: blocks whose amax maps above 6
    return w


def test_mxfp4_identical_to_torchao(mx):
    mx_tensor, _ = mx
    w = _weights()
    scale, data = mx_tensor.to_mx(w, torch.float4_e2m1fn_x2, 32)
    packed, e = quantize_mxfp4(w)
    assert torch.equal(e, scale.view(torch.uint8)) and torch.equal(packed, data.view(torch.uint8))
    ref = mx_tensor.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)
    assert torch.equal(dequantize("mxfp4", packed, e, None, 320), ref)


def test_nvfp4_identical_to_torchao(mx):
    _, nv = mx
    w = _weights()
    t_ref = nv.per_tensor_amax_to_scale(w.abs().max())
    scale, data = nv.nvfp4_quantize(w, 16, t_ref)
    packed, s, t = quantize_nvfp4(w)
    assert torch.equal(t, t_ref.reshape(1))
    assert torch.equal(s.view(torch.uint8), scale.view(torch.uint8)) and torch.equal(packed, data.view(torch.uint8))
    ref = nv.NVFP4Tensor.to_nvfp4(w, 16, per_tensor_scale=t_ref).dequantize(torch.float32)
    assert torch.equal(dequantize("nvfp4", packed, s, t, 320), ref)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_triton_dequant_is_the_torch_reference_bit_for_bit(fmt, dtype):
    pytest.importorskip("triton")
    from qbench.kernels.fp4_blocks import dequant_fp4_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    w = torch.randn(37, 100) * torch.rand(37, 1)  # awkward shape: K not whole blocks, N not whole tiles
    w[3] = 0.0
    w[4, :10] = -0.0
    w[5, 0] = 1e-30  # a block with a subnormal-range scale (MXFP4 e = 0..3)
    w = w.to(device)
    if fmt == "mxfp4":
        packed, scales, ts = *quantize_mxfp4(w), None
    else:
        packed, scales, ts = quantize_nvfp4(w)
    ref = dequantize(fmt, packed, scales, ts, 100, dtype)
    out = dequant_fp4_blocks(fmt, packed, scales, ts, 100, dtype)
    assert out.dtype == dtype and out.shape == (37, 100)
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("fmt,bits", [("mxfp4", 4.25), ("nvfp4", 4.5 + 32 / (96 * 320))])
def test_linear_forward(fmt, bits):
    torch.manual_seed(3)
    linear = torch.nn.Linear(320, 96)
    layer = LinearFP4Blocks(linear, fmt, kernel="torch")
    x = torch.randn(3, 5, 320)
    y = layer(x)
    w = layer.dequantize()
    assert y.shape == (3, 5, 96) and layer.weight_bits() == bits
    torch.testing.assert_close(y, x @ w.t() + linear.bias.data, rtol=1e-5, atol=1e-5)
    err = (w - linear.weight.data).abs().mean() / linear.weight.data.abs().mean()
    assert err < 0.2  # 4-bit floats: about 10 % of the mean weight
    pytest.importorskip("triton")
    layer.kernel = "triton"
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_smollm2_perplexity_finite_and_near_fp(smollm2, data_dir, cfg_factory):
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import perplexity, tokenize
    from qbench.methods import RunContext, mxfp4, nvfp4

    ids = tokenize(smollm2.tokenizer, perplexity_text("wikitext2", data_dir), key=f"wikitext2:{data_dir}")
    base = perplexity(smollm2.model, ids, 256, 1)["ppl"]  # one short window: a sanity check, not a figure
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, data_dir, quiet=True)
    # MXFP4's power-of-two scales (amax lands in [4, 8) and clamps above 6) lose much more than NVFP4's:
    # on one 512-token window fp 21.98, NVFP4 25.62, MXFP4 34.80
    for method, module, bits, factor in (("mxfp4", mxfp4, 4.25, 2.0), ("nvfp4", nvfp4, 4.5, 1.4)):
        model = copy.deepcopy(smollm2.model)
        info = module.quantize(model, cfg_factory(f"method={method}"), ctx)
        assert info["quantized_layers"] == 210 and info["format"] == method
        assert bits <= info["bits_per_weight"] < bits + 1e-4
        ppl = perplexity(model, ids, 256, 1)["ppl"]
        assert base < ppl < factor * base, (method, ppl, base)


@pytest.mark.parametrize("overrides,message", [
    (["method=mxfp4", "bits=3"], "method mxfp4 does not support bits=3; valid: 4"),
    (["method=nvfp4", "bits=8"], "method nvfp4 does not support bits=8; valid: 4"),
    (["method=mxfp4", "group_size=64"], "method mxfp4 does not support group_size=64; valid: 32"),
    (["method=nvfp4", "group_size=32"], "method nvfp4 does not support group_size=32; valid: 16"),
])
def test_config_fails_in_one_line(cfg_factory, overrides, message):
    from qbench import ConfigError
    from qbench.config import validate

    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(*overrides))
    assert str(err.value) == message


def test_config_defaults(cfg_factory):
    from qbench.config import resolved_bits, resolved_group_size, validate

    for method, group_size in (("mxfp4", 32), ("nvfp4", 16)):
        cfg = cfg_factory(f"method={method}")
        validate(cfg)
        assert (resolved_bits(cfg), resolved_group_size(cfg)) == (4, group_size)
