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
