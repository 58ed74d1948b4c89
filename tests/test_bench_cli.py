"""The kernel benchmark's command line fails fast, in one line, on a bad shape list (before any GPU check)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_bad_shapes_argument_is_one_line_error(capsys):
    from qbench.bench.kernels import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--shapes", "4096by4096"])
    assert exit_info.value.code == 2
    assert "use all, big, rest or KxN" in capsys.readouterr().err


def test_put_row_replaces_only_the_same_shape_format_and_m():
    from qbench.bench.kernels import put_row

    rows = [dict(K=1, N=2, format="w4a16", M=1, ms=1.0), dict(K=1, N=2, format="w4a16", M=16, ms=2.0)]
    put_row(rows, dict(K=1, N=2, format="w4a16", M=1, ms=0.5))
    put_row(rows, dict(K=1, N=2, format="nf4", M=1, ms=3.0))
    assert sorted((r["format"], r["M"], r["ms"]) for r in rows) == [("nf4", 1, 3.0), ("w4a16", 1, 0.5), ("w4a16", 16, 2.0)]


@pytest.mark.parametrize("fmt", ["nf4", "nf4_dq", "w4a16", "llm_int8", "q4_k", "q5_0", "q6_k"])
def test_benchmark_formats_agree_with_their_reference_weight(fmt):
    """Each benchmark format's call (our kernel: interpreted on the CPU, compiled where there is a GPU)
    computes x @ ref^T of the reference weight it reports, and its byte count is what the format stores."""
    import torch

    from qbench.bench.kernels import make_format

    torch.manual_seed(0)
    K, N = 256, 64
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # conftest interprets only without one
    call, ref, nbytes, group = make_format(fmt, K, N, dev)
    for M in (2, 17) if fmt == "llm_int8" else (2,):  # LLM.int8(): outliers found on the device, index list
        x = torch.randn(M, K, dtype=torch.float16, device=dev)
        want = x.double() @ ref.double().T
        err = ((call(x).double() - want).norm() / want.norm()).item()
        assert err < (0.05 if fmt == "llm_int8" else 5e-3)  # W8A8: activations rounded to int8
    bits = {"nf4": 4 + 32 / 64, "nf4_dq": 4 + 8 / 64 + 32 / 64 / 256, "w4a16": 4 + (16 + 4) / 128,
            "llm_int8": 8 + 32 / K, "q4_k": 4.5, "q5_0": 5.5, "q6_k": 6.5625}[fmt]
    assert nbytes * 8 / (K * N) == pytest.approx(bits, rel=1e-6)


def test_report_marks_a_missed_target_and_points_to_the_reasons(tmp_path):
    """A missed target is a **no** row with its measured figure, followed by where its reasons are written."""
    from qbench.bench.kernels import MISSED_NOTE, write_report

    env = dict(gpu="Test GPU", torch="t", triton="tr", cuda="c", date="2026-12-01", copy_gbps=3000.0)
    row = dict(format="w4a16", group_size=128, K=8192, N=28672, M=1, path="wint_h2", ms=0.06, ms_eager=0.07,
               fp16_ms=0.12, speedup_vs_fp16=2.0, gbps=2000.0, pct_copy_bw=66.7, tflops=7.8, tinygemm_ms=0.07,
               int_mm_ms=None, scaled_mm_ms=None)
    md = tmp_path / "r.md"
    write_report(md, env, [row], [])
    text = md.read_text()
    assert "| W4A16 g128 M=1 >= 3.0x fp16 (8192x28672) | 2.00x | **no** |" in text
    assert "| W4A16 g128 M=1 faster than tinygemm (8192x28672) | 0.0600 vs 0.0700 ms | yes |" in text
    assert MISSED_NOTE in text and "reports/kernels/NOTES.md" in MISSED_NOTE


@pytest.mark.parametrize("fmt", ["w4a16", "int8", "fp8", "nf4", "q5_0"])
def test_host_profile_builds_each_format_s_layer(fmt):
    """The host profile's layers are the formats' real modules on their Triton path, computing the linear."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # research/ is imported from the repo root
    from research.host_profile import build_layer

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=False)
    layer = build_layer(fmt, linear)
    assert layer.kernel == "triton"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 256, device=dev, dtype=torch.float16 if dev == "cuda" else torch.float32)
    layer = layer.to(dev)
    want = x.double() @ linear.weight.to(dev).double().T
    err = ((layer(x).double() - want).norm() / want.norm()).item()
    assert err < 0.1  # 4-bit formats: the rounding of the weights


def test_describe_names_the_tensor_core_tile_and_scale_placement():
    from qbench.bench.kernels import describe

    cfg = {"KERNEL": "nf4_tc", "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "SCALE_IN": True}
    assert describe(("nf4", cfg)) == "nf4_tc 64x128 scale_in splitK4"
    assert describe(("q4_0", {"KERNEL": "gguf_tc", "BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 1})) == "gguf_tc 128x32"
    assert describe(("w4a16", {"KERNEL": "wint_h2", "SPLIT_K": 7})) == "wint_h2 splitK7"
