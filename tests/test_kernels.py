"""Integer W{2,3,4,8}A16 Triton kernels against the torch reference (QuantLinear.dequantize).

On a CPU these run under TRITON_INTERPRET=1 with small, awkward shapes: K not a multiple of the tile,
N = 1, M = 1, 3, 17, group sizes that do and do not divide the tile, act-order. Inputs are fresh
random draws each run; the seed is in the failure message.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from qbench.kernels import is_default_g_idx, wint_matmul  # noqa: E402
from qbench.quant.grid import rtn_quantize  # noqa: E402
from qbench.quant.kernel_choice import use_triton  # noqa: E402
from qbench.quant.qlinear import QuantLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMV = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, GROUP_M=1, num_warps=4, num_stages=2)  # decode, split-K
DOT16 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=3, GROUP_M=1, num_warps=4, num_stages=2)  # decode, tl.dot
TILED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, GROUP_M=2, num_warps=4, num_stages=2)  # prefill GEMM


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def make_layer(N, K, bits, group_size, sym=False, act_order=False) -> QuantLinear:
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(N, K), bits, group_size, sym), None)
    if act_order:  # a permuted g_idx, as GPTQ's act-order stores it
        layer.g_idx.copy_(layer.g_idx[torch.randperm(K)])
    return layer.to(DEVICE)


def check(layer, M, config, dtype=torch.float32, tol=1e-5, seed=None, per_output=False):
    """per_output: measure each output's error against the sum of its |products| (the scale of a float
    sum's rounding error) rather than the norm of all outputs, for outputs so few that one of them
    cancelling to near 0 would make the norm meaningless (a single output column at M=1)."""
    x = torch.randn(M, layer.in_features, device=DEVICE, dtype=dtype)
    w = layer.dequantize(torch.float64)
    ref = x.double() @ w.T
    g_idx = None if is_default_g_idx(layer.g_idx, layer.group_size) else layer.g_idx
    y = wint_matmul(x, layer.qweight, layer.qzeros, layer.scales, g_idx,
                    layer.bits, layer.group_size, config=config)
    assert y.shape == (M, layer.out_features) and y.dtype == dtype
    if per_output:
        assert torch.isfinite(y).all()
        err = ((y.double() - ref).abs() / (x.double().abs() @ w.abs().T)).max().item()
    else:
        err = rel_err(y, ref)
    assert err < tol, f"rel err {err:.2e} (seed {seed}, M={M}, config={config})"


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 48), (4, 128), (8, -1)])
def test_wint_decode_and_prefill(bits, group_size):
    seed = fresh_seed()
    layer = make_layer(37, 200, bits, group_size)  # K=200: not a multiple of 32; 48 does not divide the tile
    check(layer, 1, GEMV, seed=seed)
    check(layer, 3, DOT16, seed=seed)
    check(layer, 17, TILED, seed=seed)


@pytest.mark.parametrize("bits", [3, 4])
def test_wint_act_order_symmetric(bits):
    seed = fresh_seed()
    layer = make_layer(24, 96, bits, 32, sym=True, act_order=True)
    check(layer, 1, GEMV, seed=seed)
    check(layer, 17, TILED, seed=seed)


def test_wint_single_output_column_fp16():
    seed = fresh_seed()
    layer = make_layer(1, 70, 4, 16)
    check(layer, 1, GEMV, seed=seed, per_output=True)  # one output: rel err over it was flaky (1.4e-5 once)
    check(layer, 3, DOT16, dtype=torch.float16, tol=2e-3, seed=seed)  # fp16 operands on the tensor-core path


def wint_decode_cfg(split: int, block_k: int = 32, in_place: bool = False) -> dict:
    return {"KERNEL": "wint_decode", "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4,
            "num_stages": 2, "IN_PLACE": in_place}


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (8, -1), (4, 32), (3, 32), (3, 64), (3, -1)])
def test_wint_decode_kernel(bits, group_size):
    """The exponent-trick decode kernel, M = 1 and 3 token rows, with and without split-K, float32,
    float16 and bfloat16 activations; K=200 ends inside a word row, N=37 inside a column tile."""
    seed = fresh_seed()
    layer = make_layer(37, 200 if group_size != 64 else 192, bits, group_size)
    check(layer, 1, wint_decode_cfg(1), seed=seed)
    check(layer, 3, wint_decode_cfg(3), seed=seed)
    check(layer, 1, wint_decode_cfg(2, block_k=64 if group_size in (-1, 64) else 32), seed=seed)
    check(layer, 2, wint_decode_cfg(2), dtype=torch.float16, tol=2e-3, seed=seed)
    check(layer, 4, wint_decode_cfg(1), dtype=torch.bfloat16, tol=1e-2, seed=seed)
    if bits != 3:  # codes read in place (no shift below bit 23), x pre-scaled by powers of two
        check(layer, 1, wint_decode_cfg(1, in_place=True), seed=seed)
        check(layer, 3, wint_decode_cfg(2, in_place=True), dtype=torch.float16, tol=2e-3, seed=seed)


def h2_cfg(split: int, block_k: int = 32, block_n: int = 16, chain: int = 2, stages: int = 1, byte_pairs=False,
           stream: int = 0, in_place=False) -> dict:
    return {"KERNEL": "wint_h2", "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "CHAIN": chain,
            "STAGES": stages, "BYTE_PAIRS": byte_pairs, "IN_PLACE": in_place, "num_warps": 4, "num_stages": 1,
            "STREAM": stream}


# 3 bits (packed across words) take ~25 s each in the interpreter: slow, run by .ci/run
@pytest.mark.parametrize("bits,group_size", [(2, 32), pytest.param(3, 32, marks=pytest.mark.slow),
                                             pytest.param(3, -1, marks=pytest.mark.slow), (4, 32), (4, 64), (8, -1), (8, 32)])
def test_wint_h2_decode_kernel(bits, group_size):
    """The fp16x2 decode kernel (fp16 activations): M = 1 and 3, split-K, chains of 1 and 2 words; K=200
    ends inside a word row (a 3-word chunk at 3 bits) and N=37 inside a column tile (masked); K=256,
    N=32 fill the tiles (no masks). On the CPU its inline PTX step is replaced by the same fp16
    operations (wint_h2.pair_fma)."""
    seed = fresh_seed()
    chain = 1 if bits == 3 else 2  # 3 bits: one 32-code chunk per row already
    for N, K in ((37, 200 if group_size != 64 else 192), (32, 256)):
        layer = make_layer(N, K, bits, group_size)
        check(layer, 1, h2_cfg(1, chain=chain), dtype=torch.float16, tol=2e-3, seed=seed)
        if bits in (3, 4, 8):  # x read as int32 pairs (4/8 bits: codes paired within a byte by prmt)
            check(layer, 1, h2_cfg(1, chain=chain, byte_pairs=True), dtype=torch.float16, tol=2e-3, seed=seed)
            check(layer, 3, h2_cfg(3, chain=1, byte_pairs=True), dtype=torch.float16, tol=2e-3, seed=seed)
        if bits in (3, 4):  # codes read where they lie (placed_fma), x as int32 pairs
            check(layer, 1, h2_cfg(1, chain=chain, in_place=True), dtype=torch.float16, tol=2e-3, seed=seed)
            check(layer, 3, h2_cfg(3, chain=1, in_place=True, stages=2), dtype=torch.float16, tol=2e-3, seed=seed)
        check(layer, 3, h2_cfg(2, chain=1, stages=3), dtype=torch.float16, tol=2e-3, seed=seed)  # pipelined loop
        check(layer, 1, h2_cfg(3, block_k=64, chain=chain) if group_size in (-1, 64) else h2_cfg(3, chain=chain),
              dtype=torch.float16, tol=2e-3, seed=seed)


@pytest.mark.parametrize("bits", [pytest.param(3, marks=pytest.mark.slow), 4])
def test_wint_h2_stream_k(bits):
    """Stream-K launches of the fp16x2 decode kernel: P programs share the (column tile, K tile) units
    equally, so tiles have one owner or several (partials summed by the last to arrive); P from 1 to
    more than the units (capped), M = 1 and 3, N=37 masked and N=48 whole tiles."""
    seed = fresh_seed()
    chain = 1 if bits == 3 else 2
    for N, K in ((37, 192), (48, 256)):
        layer = make_layer(N, K, bits, 32)  # 3 or 2 column tiles x 6 or 8 K tiles of 32
        for M, programs in ((1, 1), (1, 4), (3, 5), (1, 7), (1, 100)):
            check(layer, M, h2_cfg(1, chain=chain, stream=programs, byte_pairs=True, in_place=programs % 2 == 1,
                                   stages=2), dtype=torch.float16, tol=2e-3, seed=seed)


@pytest.mark.parametrize("bits", [4, 8])
def test_wint_tc_kernel(bits):
    """The tensor-core W4A16/W8A16 kernel for a few tokens (weights as the MMA's A operand, fp16x2 dequant):
    M = 2, 16 and 19 (two row programs), split-K 1 and 3, N=40 masked, groups of 64 and one group. On
    the CPU its inline PTX step is replaced by the same fp16 operations (wint_tc.pair_weights/pair_bytes)."""
    seed = fresh_seed()
    for group_size, K in ((64, 256), (-1, 192)):
        layer = make_layer(40, K, bits, group_size)
        for M, split, bn, bk in ((2, 1, 32, 64), (16, 3, 16, 32), (19, 2, 32, 64)):
            cfg = {"KERNEL": "wint_tc", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "STAGES": 2,
                   "num_warps": 4, "num_stages": 1}
            check(layer, M, cfg, dtype=torch.float16, tol=2e-3, seed=seed)


def test_stream_k_ranges():
    """stream_owner inverts the ranges [p*U//P, (p+1)*U//P); stream_slots counts a tile's owners."""
    from qbench.kernels.splitk import stream_slots

    for units in range(1, 60):
        for programs in range(1, units + 1):
            owners = [p for p in range(programs) for _ in range(p * units // programs, (p + 1) * units // programs)]
            assert owners == [((u + 1) * programs - 1) // units for u in range(units)]
    assert stream_slots(3, 4, 12) == 4 and stream_slots(3, 4, 3) == 1 and stream_slots(3, 4, 2) == 2
    assert stream_slots(2, 6, 4) == 2 and stream_slots(2, 6, 5) == 3


def test_split_buffers_counters_are_int32():
    """With one slot the stream-K kernel still compiles its merge branch (the owner count is known only at
    run time), whose atomics need int32 counters: triton 3.6 on the H100 rejects an fp16 atomic_xchg,
    which the CPU interpreter and newer tritons accept."""
    from qbench.kernels.splitk import split_buffers

    x2 = torch.randn(3, 64, device=DEVICE, dtype=torch.float16)
    for split in (1, 4):
        out, partials, counters = split_buffers(x2, 40, split, 16)
        assert out.shape == (3, 40) and out.dtype == torch.float16
        assert counters.dtype == torch.int32 and counters.numel() >= 3 * 3 and not counters.any()
        assert split == 1 or (partials.shape == (4, 3, 40) and partials.dtype == torch.float32)


def test_wint_h2_decode_large_activations():
    """Activations of 1000 and weights of many levels: the fp16 partial sums hold x * (q - z) / 2**bits,
    never x * (q - z), so they stay finite where x * (q - z) for 8-bit codes would pass 65504."""
    seed = fresh_seed()
    layer = make_layer(16, 64, 8, -1)
    x = torch.full((1, 64), 1000.0, device=DEVICE, dtype=torch.float16)
    ref = x.double() @ layer.dequantize(torch.float64).T
    y = wint_matmul(x, layer.qweight, layer.qzeros, layer.scales, None, 8, -1, config=h2_cfg(1, block_k=64))
    assert rel_err(y, ref) < 2e-3, f"seed {seed}"


def test_wint_dequant_then_cublas():
    """The prefill candidate "dequantize W^T, then torch.matmul", for a straddling 3-bit stream and act-order."""
    seed = fresh_seed()
    for bits, act_order in [(3, False), (4, True)]:
        layer = make_layer(37, 96, bits, 32, act_order=act_order)
        check(layer, 17, {"KERNEL": "dequant_cublas", "BLOCK_N": 16, "BLOCK_K": 32}, seed=seed)


def test_default_config_choice_is_correct():
    """With no config given, the first candidate runs (CPU) or the tuner picks (GPU): both must be right."""
    seed = fresh_seed()
    layer = make_layer(40, 128, 4, 128)
    for M in (1, 5, 17):
        check(layer, M, None, seed=seed)


def test_quantlinear_forward_triton_matches_torch():
    fresh_seed()
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(40, 72), 4, 32, False), torch.randn(40)).to(DEVICE)
    x = torch.randn(2, 3, 72, device=DEVICE)
    layer.kernel = "torch"
    ref = layer(x)
    layer.kernel = "triton"
    assert rel_err(layer(x), ref) < 1e-5
    layer.g_idx.copy_(layer.g_idx[torch.randperm(72, device=DEVICE)])  # act-order noticed after a change
    layer.kernel = "torch"
    ref = layer(x)
    layer.kernel = "triton"
    assert rel_err(layer(x), ref) < 1e-5


@pytest.mark.parametrize("bits", [3, 4])
def test_act_order_layer_runs_grouped_kernel_on_reordered_channels(bits, monkeypatch):
    """An act-order layer (g_idx a permutation of k // group_size) calls wint_matmul without g_idx, on the
    channels sorted by group and the codes repacked in that order; groups of other sizes keep g_idx."""
    seed = fresh_seed()
    import qbench.kernels.wint as wint_module

    calls = []  # the g_idx argument of each call
    monkeypatch.setattr(wint_module, "wint_matmul", lambda *a, **k: calls.append(a[4]) or wint_matmul(*a, **k))
    layer = make_layer(40, 96, bits, 32, act_order=True)
    x = torch.randn(3, 96, device=DEVICE)
    layer.kernel = "torch"
    ref = layer(x)
    layer.kernel = "triton"
    assert rel_err(layer(x), ref) < 1e-5, f"seed {seed}"
    assert calls == [None]
    uneven = torch.tensor([0] * 40 + [1] * 24 + [2] * 32, dtype=torch.int32, device=DEVICE)  # 40/24/32 channels
    layer.g_idx.copy_(uneven[torch.randperm(96, device=DEVICE)])
    layer.kernel = "torch"
    ref = layer(x)
    layer.kernel = "triton"
    assert rel_err(layer(x), ref) < 1e-5, f"seed {seed}"
    assert calls[-1] is not None and torch.equal(calls[-1], layer.g_idx)


def test_triton_lookup_happens_once(monkeypatch):
    import importlib.util

    from qbench.quant import kernel_choice

    kernel_choice.triton_available.cache_clear()
    looked = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: looked.append(name) or real(name, *a))
    assert all(kernel_choice.triton_available() for _ in range(3)) and looked == ["triton"]


def test_kernel_choice(monkeypatch):
    cpu = torch.zeros(1)
    assert not use_triton("torch", cpu)
    assert not use_triton("auto", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        use_triton("triton", cpu)
