"""The two asymmetric grid conventions (`method.zero_in_range`) against grids worked out by hand.

Four 2-bit rows (maxq = 3), one group each: all positive, mixed sign, all negative, all zero. The
values are chosen so every scale is exact in float16 and no w / scale lands on a .5 tie.
"""

import pytest
import torch

from qbench.config import validate
from qbench.methods.awq import group_fake_quant
from qbench.methods.gptq import gptq_quantize
from qbench.quant.grid import find_params, rtn_quantize

W = torch.tensor([[0.75, 1.2, 2.0, 3.0],
                  [-1.0, 0.4, 1.0, 2.0],
                  [-3.0, -2.0, -1.2, -0.75],
                  [0.0, 0.0, 0.0, 0.0]])


def test_zero_in_range_is_the_gptq_reference_grid():
    # ranges [min(w,0), max(w,0)]: [0, 3], [-1, 2], [-3, 0]; the all-zero row gets [-1, 1]
    # scale = range / 3; zero = round(-min / scale)
    qw = rtn_quantize(W, 2, -1, sym=False, zero_in_range=True)
    assert qw.scales.float()[0].tolist() == [1.0, 1.0, 1.0, torch.tensor(2 / 3).half().item()]  # 0.66650390625
    assert qw.zeros[0].tolist() == [0, 1, 3, 2]  # last: round(1 / 0.6665) = 2
    assert qw.codes.tolist() == [[1, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 2], [2, 2, 2, 2]]
    assert qw.dequantize().tolist() == [[1.0, 1.0, 2.0, 3.0],     # 0.75 -> 1: the range starts at 0
                                        [-1.0, 0.0, 1.0, 2.0],
                                        [-3.0, -2.0, -1.0, -1.0],  # -0.75 -> -1: the range ends at 0
                                        [0.0, 0.0, 0.0, 0.0]]


def test_min_max_is_the_llm_awq_grid():
    # ranges [min, max]: [0.75, 3] and [-3, -0.75] (width 2.25, scale 0.75), [-1, 2] (scale 1);
    # the all-zero row's width is clamped at 1e-5: scale 1e-5 / 3 in float16 = 56 steps of 2^-24.
    # zero = round(-min / scale) clamped to [0, 3]: round(-1) -> 0 and round(4) -> 3 are clamped
    qw = rtn_quantize(W, 2, -1, sym=False, zero_in_range=False)
    assert qw.scales.float()[0].tolist() == [0.75, 1.0, 0.75, 56 * 2.0**-24]
    assert qw.zeros[0].tolist() == [0, 1, 3, 0]
    # row 0: w / 0.75 = 1, 1.6, 2.67, 4 -> 1, 2, 3, 4 -> clamped to 3; row 2: -4, -2.67, -1.6, -1 (+3) -> 0, 0, 1, 2
    assert qw.codes.tolist() == [[1, 2, 3, 3], [0, 1, 2, 3], [0, 0, 1, 2], [0, 0, 0, 0]]
    assert qw.dequantize().tolist() == [[0.75, 1.5, 2.25, 2.25],     # the clamped zero clips 3.0 to 2.25
                                        [-1.0, 0.0, 1.0, 2.0],       # mixed sign: both conventions agree
                                        [-2.25, -2.25, -1.5, -0.75],  # and -3.0 to -2.25
                                        [0.0, 0.0, 0.0, 0.0]]


def test_groups_get_their_own_grids():
    row = torch.cat([W[0], W[2]])[None]  # one row, two groups of 4: the all-positive and all-negative rows
    for zero_in_range in (True, False):
        qw = rtn_quantize(row, 2, 4, sym=False, zero_in_range=zero_in_range)
        whole = rtn_quantize(W[[0, 2]], 2, -1, sym=False, zero_in_range=zero_in_range)
        assert qw.g_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        assert torch.equal(qw.scales[:, 0], whole.scales[0]) and torch.equal(qw.zeros[:, 0], whole.zeros[0])
        assert torch.equal(qw.dequantize()[0], whole.dequantize().flatten())


def test_symmetric_grid_ignores_the_option():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    assert all(torch.equal(a, b) for a, b in zip(find_params(w, 3, True, True), find_params(w, 3, True, False)))


def test_gptq_and_awq_use_the_chosen_grid():
    """GPTQ with a diagonal Hessian has no error to propagate, so it is RTN on the chosen grid; AWQ's
    search quantizer is that RTN too."""
    torch.manual_seed(0)
    w = torch.rand(16, 64) + 0.1  # all positive: the two conventions differ on every group
    for zero_in_range in (True, False):
        rtn = rtn_quantize(w, 3, 32, sym=False, zero_in_range=zero_in_range)
        qw, _ = gptq_quantize(w, torch.eye(64), 3, 32, False, zero_in_range=zero_in_range)
        assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
        assert torch.equal(group_fake_quant(w, 3, 32, False, zero_in_range), rtn.dequantize())
    assert not torch.equal(rtn_quantize(w, 3, 32, False, True).codes, rtn_quantize(w, 3, 32, False, False).codes)


@pytest.mark.parametrize("method,default", [("rtn", True), ("gptq", True), ("awq", False)])
def test_defaults_and_type_check(cfg_factory, method, default):
    """RTN and GPTQ default to the GPTQ reference's grid, AWQ to llm-awq's; a non-boolean value is
    refused before anything loads."""
    from qbench import ConfigError

    assert cfg_factory(f"method={method}").method.zero_in_range is default
    validate(cfg_factory(f"method={method}", f"method.zero_in_range={str(not default).lower()}"))
    with pytest.raises(ConfigError, match=f"method.zero_in_range for {method} must be true or false"):
        validate(cfg_factory(f"method={method}", "method.zero_in_range=maybe"))
