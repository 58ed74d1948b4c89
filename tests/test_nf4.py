"""NF4/FP4: our quantizer against bitsandbytes' quantize_4bit / dequantize_4bit (byte for byte), the
layout by hand, and the Linear4bit module."""

import copy

import pytest
import torch


from qbench.quant.nf4 import DYNAMIC_MAP, Linear4bit, code_book, dequantize_dynamic, quantize_4bit, quantize_dynamic

# (shape, blocksize): rows that are and are not multiples of the block, a short last block, an odd count
CASES = [((64, 128), 64), ((192, 576), 64), ((576, 576), 128), ((48, 1536), 256), ((33, 100), 32),
         ((40, 300), 4096), ((7, 9), 64)]


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (pip install bitsandbytes)")


def test_code_books_equal_bitsandbytes(bnb):
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(code_book(quant_type), bnb.get_4bit_type(quant_type, device="cpu"))
    assert torch.equal(DYNAMIC_MAP, bnb.create_dynamic_map())


def _bnb_flat_dequantize(bnb, packed, state, n):
    """bitsandbytes' dequantize_4bit of the bytes read as a flat [n] tensor.

    Its blocks are runs of the flat tensor, so this is the same layout; it sidesteps bitsandbytes'
    AVX-512 CPU kernel (0.50), which for a 2-D shape whose rows are not a multiple of the blocksize
    (e.g. [576, 576] at blocksize 128) returns values that disagree with bitsandbytes' own portable
    reference kernel and with the blocks its quantizer wrote."""
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([n])
    return bnb.dequantize_4bit(packed, flat_state).view(-1)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=[f"{s[0]}x{s[1]}-b{b}" for s, b in CASES])
def test_identical_to_bitsandbytes(bnb, shape, blocksize, quant_type, double_quant):
    torch.manual_seed(hash((shape, blocksize, quant_type)) % 2**31)
    w = torch.randn(shape) * 0.03
    w.view(-1)[::41] = 0.0  # exact zeros, and tiny values around FP4's two zero codes
    w.view(-1)[5::43] = 1e-6
    packed, state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    q = quantize_4bit(w, quant_type, blocksize, double_quant)

    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.offset, state.offset)
        assert torch.equal(q.absmax2, state.state2.absmax)
    mine = q.dequantize()
    assert torch.equal(mine.view(-1), _bnb_flat_dequantize(bnb, packed, state, w.numel()))
    if shape[1] % blocksize == 0:  # the 2-D call, where bitsandbytes' CPU kernel is right
        assert torch.equal(mine, bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_identical_to_bitsandbytes_half_inputs(bnb, dtype):
    torch.manual_seed(1)
    w = (torch.randn(96, 256) * 0.02).to(dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.absmax2, state.state2.absmax) and torch.equal(q.offset, state.offset)
    assert torch.equal(q.dequantize(dtype), bnb.dequantize_4bit(packed, state))


def test_double_quant_codes_identical_to_bitsandbytes_blockwise(bnb):
    torch.manual_seed(2)
    x = torch.randn(3000) * torch.rand(3000)  # 11 full blocks of 256 and a short one
    codes, absmax = quantize_dynamic(x)
    ref_codes, ref_state = bnb.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    assert torch.equal(dequantize_dynamic(codes, absmax), bnb.dequantize_blockwise(ref_codes, ref_state))


def test_layout_by_hand():
    # one block of 4 values of a [2, 2] weight: absmax 2; w/absmax = 1, -1, 0, 0.5
    w = torch.tensor([[2.0, -2.0], [0.0, 1.0]])
    q = quantize_4bit(w, "nf4", blocksize=32)
    # NF4 codes 15 (1.0), 0 (-1.0), 7 (0.0), 12 (0.4407, the nearest to 0.5); first element high nibble
    assert q.packed.view(-1).tolist() == [0xF0, 0x7C] and q.packed.shape == (2, 1)
    assert q.absmax.tolist() == [2.0]
    assert torch.equal(q.dequantize(), torch.tensor([[2.0, -2.0], [0.0, 2 * 0.44070982933044434]]))
    # FP4: 1.0 = code 3 (12/12), -1.0 = code 11 (sign bit 8 | 3), 0.0 = code 0, 0.5 = code 5 (6/12)
    assert quantize_4bit(w, "fp4", blocksize=32).packed.view(-1).tolist() == [0x3B, 0x05]


def test_double_quant_absmax_close_and_smaller():
    torch.manual_seed(3)
    w = torch.randn(256, 576) * 0.05
    plain, double = quantize_4bit(w, "nf4", 64), quantize_4bit(w, "nf4", 64, double_quant=True)
    assert double.absmax.dtype == torch.uint8 and double.absmax2.numel() == -(-plain.absmax.numel() // 256)
    rel = (double.block_absmax() - plain.absmax).abs() / plain.absmax
    assert rel.max() < 0.02


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_linear4bit_forward(quant_type, compute_dtype):
    torch.manual_seed(4)
    linear = torch.nn.Linear(320, 96, bias=True)
    layer = Linear4bit.from_linear(linear, quant_type, 64, double_quant=True, compute_dtype=compute_dtype, kernel="torch")
    x = torch.randn(3, 5, 320)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (3, 5, 96)
    cd = compute_dtype or x.dtype
    w = quantize_4bit(linear.weight.data, quant_type, 64, True).dequantize(cd)
    ref = (x.to(cd) @ w.t() + linear.bias.data.to(cd)).to(x.dtype)
    assert torch.equal(y, ref)
    # 4-bit codes + 8-bit absmax per 64 + fp32 absmax2 per 64*256: about 4.127 bits per weight
    assert 4.12 < layer.weight_bits() < 4.14


def test_linear4bit_triton_path_matches_torch():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    linear = torch.nn.Linear(128, 48).to(device)
    for double_quant in (False, True):
        layer = Linear4bit.from_linear(linear, "nf4", 64, double_quant, kernel="triton")
        x = torch.randn(4, 128, device=device)
        torch.testing.assert_close(layer(x), layer.forward_torch(x) + layer.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,message", [
    (["method=nf4", "bits=3"], "method nf4 does not support bits=3; valid: 4"),
    (["method=fp4", "group_size=-1"], "method fp4 does not support group_size=-1; valid: 32, 64, 128, 256, 512, 1024, 2048, 4096"),
    (["method=nf4", "method.compute_dtype=float64"], "unknown method.compute_dtype for nf4 'float64'; valid: auto, float16, bfloat16, float32"),
    (["method=int8", "bits=4"], "method int8 does not support bits=4; valid: 8"),
    (["method=fp8", "method.format=e3m4"], "unknown method.format for fp8 'e3m4'; valid: e4m3, e5m2"),
    (["method=fp8", "method.activations=static"], "unknown method.activations for fp8 'static'; valid: none, dynamic"),
])
def test_config_fails_in_one_line(cfg_factory, overrides, message):
    from qbench import ConfigError
    from qbench.config import validate

    with pytest.raises(ConfigError) as err:
        validate(cfg_factory(*overrides))
    assert str(err.value) == message


def test_config_defaults(cfg_factory):
    from qbench.config import resolved_bits, resolved_group_size, validate

    for method, bits, group_size in (("nf4", 4, 64), ("fp4", 4, 64), ("int8", 8, None), ("fp8", 8, None)):
        cfg = cfg_factory(f"method={method}")
        validate(cfg)
        assert (resolved_bits(cfg), resolved_group_size(cfg)) == (bits, group_size)


def test_unpipelined_fallback_configs_compute_the_same():
    """The tuner's last resort for NF4 with double quant (whose gathers overflow shared memory when
    pipelined at Hopper tile sizes, seen on an H200 at M=2048, K=N=576) must give the same product."""
    pytest.importorskip("triton")
    from qbench.kernels.matmul import candidate_configs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(6)
    linear = torch.nn.Linear(128, 48, bias=False).to(device)
    layer = Linear4bit.from_linear(linear, "nf4", 64, True, kernel="torch")
    for m in (1, 4, 80):
        x = torch.randn(m, 128, device=device)
        for config in candidate_configs(m, 48, 128, torch.device(device))[-2:]:
            assert config["num_stages"] == 1
            y = nf4_matmul_of(layer, x, config)
            torch.testing.assert_close(y, layer.forward_torch(x), rtol=1e-4, atol=1e-4)


def nf4_matmul_of(layer, x, config):
    from qbench.kernels import nf4_matmul
    from qbench.quant.nf4 import _on_device

    return nf4_matmul(x, layer.packed, layer.absmax, _on_device(layer.quant_type, x.device), layer.out_features,
                      layer.blocksize, layer.absmax2, _on_device("dynamic", x.device), layer.offset_value, config=config)
