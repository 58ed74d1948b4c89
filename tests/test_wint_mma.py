"""The Gluon W4A16 tensor-core kernel (kernels/wint_mma.py): on the CPU its packed fragment layout and a
torch emulation of its data flow; the kernel itself against the torch reference on a Hopper GPU (Gluon
kernels do not run under TRITON_INTERPRET=1)."""

import os

import pytest
import torch

pytest.importorskip("triton")

from qbench.kernels import wint_matmul  # noqa: E402
from qbench.kernels.wint_mma import mma_configs, mma_layout, run_mma, usable  # noqa: E402
from qbench.quant.grid import rtn_quantize  # noqa: E402
from qbench.quant.packing import unpack_cols, unpack_rows  # noqa: E402
from qbench.quant.qlinear import QuantLinear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HOPPER = usable(DEVICE)


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def fragment_codes(words: torch.Tensor, N: int, K: int, BK: int, BN: int) -> torch.Tensor:
    """Codes [N, K] read back from the packed words through the fragment map of the kernel's docstring,
    element by element as a thread of the kernel holds them: word [tile, kt, n', t, c2], nibble
    4 c1 + 2 h + p is the code of n = tile * BN + n', k = kt * BK + 32 c2 + 16 c1 + 8 h + 2 t + p."""
    n_pad = -(-N // BN) * BN
    out = torch.full((n_pad, K), -1, dtype=torch.int64)
    flat = words.long().tolist()
    i = 0
    for tile in range(n_pad // BN):
        for kt in range(K // BK):
            for row in range(BN):
                for t in range(4):
                    for c2 in range(BK // 32):
                        word = flat[i] & 0xFFFFFFFF
                        i += 1
                        for nib in range(8):
                            c1, h, p = nib >> 2, (nib >> 1) & 1, nib & 1
                            n = tile * BN + row
                            k = kt * BK + 32 * c2 + 16 * c1 + 8 * h + 2 * t + p
                            out[n, k] = (word >> (4 * nib)) & 15
    assert i == len(flat)
    return out


@pytest.mark.parametrize("N,K,BK,BN", [(64, 128, 128, 64), (100, 256, 64, 64), (130, 128, 128, 128)])
def test_mma_layout_is_the_fragment_map(N, K, BK, BN):
    """Every code lands where the kernel's thread expects it (and every slot is filled); rows past N are 0."""
    fresh_seed()
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(N, K), 4, 64, False), None)
    codes = unpack_rows(layer.qweight, 4, K).T
    got = fragment_codes(mma_layout(layer.qweight, N, K, BK, BN), N, K, BK, BN)
    assert torch.equal(got[:N], codes.long())
    assert (got[N:] == 0).all()


def test_mma_layout_cached_until_the_weight_changes():
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(64, 128), 4, 128, False), None)
    a = mma_layout(layer.qweight, 64, 128, 128, 64)
    assert mma_layout(layer.qweight, 64, 128, 128, 64) is a
    layer.qweight.add_(1)
    assert mma_layout(layer.qweight, 64, 128, 128, 64) is not a


def test_not_offered_where_it_cannot_run():
    """The tuner gets no wint_mma configs on the CPU, for bf16, 3 bits, M = 1 or M > 16."""
    cpu = torch.device("cpu")
    assert mma_configs(16, 4096, 4096, 4, 128, torch.float16, cpu, 132) == []
    if HOPPER:
        assert mma_configs(16, 4096, 4096, 4, 128, torch.float16, DEVICE, 132)
        for args in ((16, 4096, 4096, 4, 128, torch.bfloat16), (16, 4096, 4096, 3, 128, torch.float16),
                     (1, 4096, 4096, 4, 128, torch.float16), (17, 4096, 4096, 4, 128, torch.float16)):
            assert mma_configs(*args, DEVICE, 132) == []


def emulate_kernel(x, qweight, qzeros, scales, N, K, group, BK, BN, split):
    """wint_mma_kernel's data flow in torch, step by step as a program runs it (Gluon does not run under
    TRITON_INTERPRET=1): the words of a tile at the kernel's offsets, the four pair steps as the PTX computes
    them (bytes i of words << 4 and of words -> fp16 1 + q / 64, minus 1 + z / 64: exact), gl.join as
    torch.stack(dim=-1) with the kernel's nesting, its permute and reshape, the fp32 product per K tile and
    acc += 64 s * product per group (or the scale after the loop for one group), split-K partials summed."""
    tiles = mma_layout(qweight, N, K, BK, BN).long() & 0xFFFFFFFF
    C2, k_tiles = BK // 32, K // BK
    tiles_per_group = 0 if group == 0 else group // BK
    per_split = -(-k_tiles // split)
    zcodes = unpack_cols(qzeros, 4, N)  # [G, N]
    out = torch.zeros(x.shape[0], -(-N // BN) * BN, dtype=torch.float64)
    rows, ts, cs = torch.arange(BN), torch.arange(4), torch.arange(C2)
    off = rows[:, None, None] * (4 * C2) + ts[None, :, None] * C2 + cs[None, None, :]
    for pid_n in range(-(-N // BN)):
        n = pid_n * BN + rows
        for pid_k in range(split):
            t0, t_end = pid_k * per_split, min(pid_k * per_split + per_split, k_tiles)
            acc = torch.zeros(BN, x.shape[0], dtype=torch.float64)
            part = torch.zeros(BN, x.shape[0], dtype=torch.float64)
            for t in range(t0, t_end):
                words = tiles[(pid_n * k_tiles + t) * BN * BK // 8 + off]  # [BN, 4, C2]
                g = 0 if group == 0 else t * BK // group
                z = torch.where(n < N, zcodes[g, n.clamp(max=N - 1)], 0).double()
                pairs = []
                for i in range(4):  # pair i: nibbles 2i, 2i + 1 of the word
                    q_lo, q_hi = (words >> (8 * i)) & 15, (words >> (8 * i + 4)) & 15
                    pairs.append(torch.stack(((q_lo - z[:, None, None]) / 64, (q_hi - z[:, None, None]) / 64), -1))
                j = torch.stack((torch.stack((pairs[0], pairs[2]), -1), torch.stack((pairs[1], pairs[3]), -1)), -1)
                # [BN, t, c2, p, c1, h] -> the kernel's [BN, t, c2, c1, h, p]
                w = j.permute(0, 1, 2, 4, 5, 3).permute(0, 2, 3, 4, 1, 5).reshape(BN, BK)
                prod = w @ x[:, t * BK:(t + 1) * BK].double().T
                s = torch.where(n < N, scales[g, n.clamp(max=N - 1)].double(), 0.0)[:, None]
                if tiles_per_group == 0:
                    acc += prod
                else:
                    fresh = t == t0 or t % tiles_per_group == 0
                    part = prod if fresh else part + prod
                    if (t + 1) % tiles_per_group == 0 or t == t_end - 1:
                        acc += 64 * s * part
            if tiles_per_group == 0:
                acc = 64 * torch.where(n < N, scales[0, n.clamp(max=N - 1)].double(), 0.0)[:, None] * acc
            out[:, pid_n * BN:(pid_n + 1) * BN] += acc.T
    return out[:, :N]


@pytest.mark.parametrize("group_size,BK,split", [(128, 128, 1), (128, 64, 3), (-1, 128, 2), (64, 64, 4)])
def test_kernel_data_flow_on_cpu(group_size, BK, split):
    """The kernel's arithmetic and indexing, emulated on the CPU (CI), equal x @ W^T of the dequantized
    layer: a wrong pair order, join nesting, permutation or group scaling would not (checked by mutation)."""
    seed = fresh_seed()
    N, K = 100, 512
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(N, K), 4, group_size, False), None)
    x = torch.randn(5, K).half()
    group = 0 if group_size <= 0 else group_size
    got = emulate_kernel(x, layer.qweight, layer.qzeros, layer.scales, N, K, group, BK, 64, split)
    ref = x.double() @ layer.dequantize(torch.float64).T
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6, f"seed {seed}"


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (wgmma) and Gluon")
@pytest.mark.parametrize("group_size", [128, 64, -1])
def test_wint_mma_kernel(group_size):
    """M = 2, 5, 16; N = 100 (a masked tile), 256; split-K 1, 3 and one split per K tile; K tiles of 64
    and 128, one and two warpgroups."""
    seed = fresh_seed()
    for N, K in ((100, 512), (256, 1024)):
        layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(N, K), 4, group_size, False), None).to(DEVICE)
        group = 0 if group_size <= 0 else group_size
        w = layer.dequantize(torch.float64)
        for M in (2, 5, 16):
            x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
            ref = x.double() @ w.T
            for bk, warps in ((128, 4), (64, 4), (128, 8)):
                if group and group % bk:
                    continue
                for split in (1, 3, K // bk):  # 3: with 4 K tiles the last split has none
                    cfg = {"KERNEL": "wint_mma", "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps}
                    y = run_mma(cfg, x, layer.qweight, layer.qzeros, layer.scales, 4, group, N)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    assert y.shape == (M, N) and err < 2e-3, f"rel err {err:.2e} seed {seed} M={M} N={N} {cfg}"
        # through the public entry point, the tuner choosing among all candidates
        x = torch.randn(16, K, device=DEVICE, dtype=torch.float16)
        y = wint_matmul(x, layer.qweight, layer.qzeros, layer.scales, None, 4, group_size)
        assert ((y.double() - x.double() @ w.T).norm() / (x.double() @ w.T).norm()).item() < 2e-3
