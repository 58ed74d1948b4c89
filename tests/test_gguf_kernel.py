"""GGUFLinear with kernel=triton: the Triton kernel reads our blocks and agrees with the torch path.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), small shapes."""

import pytest
import torch

pytest.importorskip("triton")

from qbench.quant.gguf_linear import GGUFLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_linear_triton_path_matches_torch(qtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 48, bias=True)
    layer = GGUFLinear.from_linear(linear, qtype, kernel="triton").to(DEVICE)
    x = torch.randn(3, 512, device=DEVICE)
    y = layer(x)
    layer.kernel = "torch"
    ref = layer(x)
    assert torch.allclose(y, ref, rtol=1e-3, atol=1e-3), (y - ref).abs().max()


def test_kernel_torch_uses_the_torch_dequantization():
    layer = GGUFLinear.from_linear(torch.nn.Linear(256, 16), "Q3_K", kernel="torch").to(DEVICE)
    x = torch.randn(2, 256, device=DEVICE)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias))


H2_TYPES = ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0", "Q6_K"]


def test_integer_form_fields():
    """Every type taken apart into codes, scales, zero and mins (qbench's dequantization is its float32
    formula): codes within their bits, one scale (and min) per group, the zero of the type, and the formula
    bitwise equal to gguf-py's dequantizer."""
    gguf = pytest.importorskip("gguf")
    from qbench.quant.gguf_quants import TYPES, integer_form, quantize

    torch.manual_seed(0)
    w = torch.randn(7, 512) * 0.05
    w[0, 3], w[2, 100] = 1.0, -0.7  # outliers widen one block's range
    zeros = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q3_K": 4, "Q6_K": 32}
    for qtype in TYPES:
        raw = quantize(w, qtype)
        form = integer_form(raw, qtype, 512)
        assert form.codes.dtype == torch.uint8 and int(form.codes.max()) < 2 ** form.bits, qtype
        assert form.scales.shape == (7, 512 // form.group) and form.zero == zeros.get(qtype, 0), qtype
        assert (form.mins is not None) == (qtype in ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")), qtype
        ref = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
        assert torch.equal(form.dequantize(), torch.from_numpy(ref.copy())), qtype


def h2_cfg(split=1, stream=0, block_k=32, byte_pairs=False, in_place=False, chain=2, stages=1):
    return {"KERNEL": "gguf_h2", "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": split, "CHAIN": chain,
            "STAGES": stages, "BYTE_PAIRS": byte_pairs, "IN_PLACE": in_place, "STREAM": stream, "num_warps": 4,
            "num_stages": 1}


@pytest.mark.parametrize("qtype", H2_TYPES)
def test_gguf_decode_through_the_integer_kernel(qtype):
    """M <= 4 fp16 decode on the integer fp16x2 kernel (gguf_linear.wint_layout's copy): split-K, stream-K, the
    pairings, min terms (Q4_1, Q5_1, Q4_K, Q5_K), groups of 16 (Q6_K); N=37 ends inside a column tile."""
    from qbench.kernels.gguf import gguf_matmul
    from qbench.quant.gguf_linear import wint_layout
    from qbench.quant.gguf_quants import dequantize, quantize
    from qbench.quant.packing import unpack_rows

    seed = int.from_bytes(__import__("os").urandom(4), "little")
    torch.manual_seed(seed)
    K = 512
    raw = quantize(torch.randn(37, K) * 0.05, qtype).to(DEVICE)
    w = dequantize(raw, qtype, K).double()
    qweight, qzeros, scales, mins, bits, group = wint_layout(raw, qtype.lower(), K)
    from qbench.quant.gguf_quants import integer_form
    assert torch.equal(unpack_rows(qweight, bits, K).T.to(torch.uint8), integer_form(raw, qtype, K).codes)
    assert (mins is not None) == (qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))
    bk = 16 if group == 16 else 32
    pairing = {"in_place": True} if bits == 4 else {"byte_pairs": True}
    for M, cfg in ((1, h2_cfg(block_k=bk)), (3, h2_cfg(split=3, block_k=bk, chain=1, **pairing)),
                   (2, h2_cfg(stream=5, block_k=bk, stages=2, **pairing)), (1, h2_cfg(split=2, block_k=bk, stages=3))):
        x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
        ref = x.double() @ w.T
        y = gguf_matmul(x, raw, qtype.lower(), config=cfg, integer_copy=lambda: wint_layout(raw, qtype.lower(), K))
        assert y.shape == (M, 37) and y.dtype == torch.float16
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"{qtype} rel err {err:.2e} (seed {seed}, M={M}, config={cfg})"


def test_gguf_linear_fp16_decode_picks_the_integer_kernel():
    """The tuner's candidates for fp16 decode start with the integer kernel (what the interpreter runs), and
    GGUFLinear's Triton path agrees with its torch path."""
    from qbench.kernels.gguf import gguf_matmul  # noqa: F401
    from qbench.kernels.wint_h2 import h2_decode_configs

    assert h2_decode_configs(1, 576, 576, 8, 32, torch.float16, 132)
    assert h2_decode_configs(1, 576, 1536, 8, 16, torch.float16, 132)  # Q6_K: K tiles of 16
    torch.manual_seed(1)
    layer = GGUFLinear.from_linear(torch.nn.Linear(512, 48, bias=True), "Q5_0", kernel="triton").to(DEVICE).half()
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.float16)
    y = layer(x)
    assert hasattr(layer.qweight, "_qbench_wint")  # the integer layout was built and used
    layer.kernel = "torch"
    ref = layer(x)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3


GEMV = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, GROUP_M=1, num_warps=4, num_stages=2)
DOT16 = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, SPLIT_K=3, GROUP_M=1, num_warps=4, num_stages=2)
TILED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, GROUP_M=2, num_warps=4, num_stages=2)
CUBLAS = {"KERNEL": "dequant_cublas", "BLOCK_N": 64, "BLOCK_K": 64}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_any_m_through_the_integer_skeleton(qtype):
    """The integer formats' skeleton on the copy (gguf_wint): GEMV with split-K, tl.dot for a few tokens,
    the tiled GEMM, dequantize + cuBLAS; the min term added after it; float32 and fp16 activations."""
    from qbench.kernels.gguf import gguf_matmul
    from qbench.quant.gguf_linear import wint_layout
    from qbench.quant.gguf_quants import dequantize, quantize

    seed = int.from_bytes(__import__("os").urandom(4), "little")
    torch.manual_seed(seed)
    K = 512
    raw = quantize(torch.randn(37, K) * 0.05, qtype).to(DEVICE)
    w = dequantize(raw, qtype, K).double()
    for M, inner, dtype in ((1, GEMV, torch.float32), (3, DOT16, torch.float16), (17, TILED, torch.float32),
                            (5, CUBLAS, torch.float16)):
        x = torch.randn(M, K, device=DEVICE, dtype=dtype)
        ref = x.double() @ w.T
        y = gguf_matmul(x, raw, qtype.lower(), config={"KERNEL": "gguf_wint", "WINT": inner},
                        integer_copy=lambda: wint_layout(raw, qtype.lower(), K))
        assert y.shape == (M, 37) and y.dtype == dtype
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"{qtype} rel err {err:.2e} (seed {seed}, M={M}, config={inner})"


@pytest.mark.parametrize("qtype", H2_TYPES)
def test_gguf_few_tokens_on_tensor_cores(qtype):
    """2-16 fp16 tokens on the tensor-core kernel (kernels/wint_tc.py) on the integer copy: 4-bit (Q4_0,
    Q4_1, Q4_K) and 8-bit codes (Q5_*, Q8_0, Q6_K), the min term, groups of 16 and 32 in K tiles of one
    group and of 2-8 groups, split-K; M=17 takes two token tiles of 16, M=32 one of 32; N=37 ends inside a
    column tile. The candidates exist for 2-32 tokens only."""
    from qbench.kernels.gguf import gguf_matmul
    from qbench.kernels.wint_tc import tc_configs
    from qbench.quant.gguf_linear import wint_layout
    from qbench.quant.gguf_quants import dequantize, quantize

    seed = int.from_bytes(__import__("os").urandom(4), "little")
    torch.manual_seed(seed)
    K = 512
    raw = quantize(torch.randn(37, K) * 0.05, qtype).to(DEVICE)
    w = dequantize(raw, qtype, K).double()
    _, _, _, _, bits, group = wint_layout(raw, qtype.lower(), K)
    found = tc_configs(16, 4096, 4096, bits, group, torch.float16, 132)
    assert {c["BLOCK_K"] for c in found} == {group, 64, 128}
    assert not tc_configs(1, 4096, 4096, bits, group, torch.float16, 132)
    assert {c["BLOCK_M"] for c in tc_configs(32, 4096, 4096, bits, group, torch.float16, 132)} == {32}
    assert not tc_configs(33, 4096, 4096, bits, group, torch.float16, 132)
    for M, split, bk, bm in ((2, 1, group, 16), (16, 3, 64, 16), (17, 2, 128, 16), (5, 1, 2 * group, 16),
                             (32, 2, 64, 32)):
        cfg = {"KERNEL": "gguf_tc", "BLOCK_N": 16, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": split, "STAGES": 2,
               "num_warps": 4, "num_stages": 1}
        x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
        ref = x.double() @ w.T
        y = gguf_matmul(x, raw, qtype.lower(), config=cfg, integer_copy=lambda: wint_layout(raw, qtype.lower(), K))
        assert y.shape == (M, 37) and y.dtype == torch.float16
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"{qtype} rel err {err:.2e} (seed {seed}, M={M}, split={split}, BLOCK_K={bk})"
