import pytest
import torch

from qbench.quant.grid import fake_quantize, find_params, rtn_quantize
from qbench.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows
from qbench.quant.qlinear import QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 96, 100, 576])
def test_pack_roundtrip(bits, n):
    codes = torch.randint(0, 2**bits, (n, 7))
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-n * bits // 32), 7)
    assert torch.equal(unpack_rows(words, bits, n), codes.to(torch.int32))
    assert torch.equal(unpack_cols(pack_cols(codes.T, bits), bits, n), codes.T.to(torch.int32))


def test_pack_layout_4bit_by_hand():
    # code i sits at bits [4i, 4i+4) of word 0: 0x87654321 for codes 1..8
    codes = torch.arange(1, 9).view(8, 1)
    assert pack_rows(codes, 4).item() == 0x87654321 - 2**32


def test_pack_layout_3bit_straddles_words():
    # 11 codes of 3 bits: code 10 uses bits 30,31 of word 0 and bit 0 of word 1 (GPTQ reference packing)
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b101
    words = pack_rows(codes, 3).view(-1).tolist()
    assert words == [0b01 << 30, 0b1, 0]  # low bits 01 at 30-31, high bit 1 at bit 0 of word 1


def test_rtn_grid_matches_gptq_reference_quantizer():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for sym in (False, True):
        scale, zero = find_params(w, 4, sym)
        xmin = torch.minimum(w.min(1).values, torch.zeros(16))
        xmax = torch.maximum(w.max(1).values, torch.zeros(16))
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        assert torch.allclose(scale, (xmax - xmin) / 15, rtol=1e-3)
        assert torch.all(zero == (8 if sym else torch.round(-xmin / scale)))


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (3, 128, False), (2, 64, True), (8, -1, False), (4, 32, True)])
def test_packed_linear_equals_fake_quant(bits, group_size, sym):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(576, 192, bias=True)  # 576 = 4*128 + 64: a short last group at 128
    qw = rtn_quantize(linear.weight.data, bits, group_size, sym)
    # fake-quant, computed independently group by group
    fake = torch.empty_like(linear.weight)
    size = 576 if group_size == -1 else group_size
    for start in range(0, 576, size):
        block = linear.weight.data[:, start : start + size]
        scale, zero = find_params(block, bits, sym)
        fake[:, start : start + size] = fake_quantize(block, scale[:, None], zero[:, None], bits)
    layer = QuantLinear.from_quantized(qw, linear.bias)
    assert torch.equal(layer.dequantize(), fake)
    x = torch.randn(3, 576)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, fake, linear.bias), atol=1e-5)
    if group_size == 128:
        assert layer.scales.shape == (5, 192)  # ceil(576 / 128) groups, the last one 64 wide


def test_rtn_error_grows_with_fewer_bits():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [(rtn_quantize(w, b, 128, False).dequantize() - w).pow(2).mean().item() for b in (8, 4, 3, 2)]
    assert errs == sorted(errs)
