"""GGUF with an importance matrix: our quantizers against ggml's quantize with quant_weights.

ggml_quantize_chunk (libggml-base of llama-cpp-python, the call llama.cpp's quantize makes per tensor)
and qbench.quant.gguf_quants.quantize get the same rows and the same importance matrix; the bytes must
be identical for every block type."""

import numpy as np
import pytest
import torch

from qbench.quant.gguf_quants import TYPES, quantize

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from qbench.eval.llamacpp import ggml_quantize  # noqa: E402


def rows(n: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows with the awkward cases: zero blocks and super-blocks, an outlier, a constant block,
    an all-positive and an all-negative row, outliers every 97 elements, float16-exact values."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, cols)) * 0.02).astype(np.float32)
    w.reshape(-1)[::97] *= 10
    w[0, :32] = 0
    w[1, :256] = 0
    w[2, 5] = 0.9
    w[3, 32:64] = 0.0125
    w[4] = np.abs(w[4])
    w[5] = -np.abs(w[5])
    w[6:10] = w[6:10].astype(np.float16).astype(np.float32)
    return w


def importance(cols: int, seed: int) -> np.ndarray:
    """Mean squared activations spread over orders of magnitude, a few columns never active (0)."""
    rng = np.random.default_rng(seed + 100)
    im = rng.lognormal(0, 2, cols).astype(np.float32)
    im[7] = 0
    im[100:132] = 0
    return im


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("cols", [768, 1536])
def test_bytes_equal_ggml_with_imatrix(qtype, cols):
    t = TYPES[qtype]
    w, im = rows(24, cols, cols), importance(cols, cols)
    theirs = ggml_quantize(w, t.ggml_type, t.block_elems, t.block_bytes, im)
    ours = quantize(torch.from_numpy(w), qtype, imatrix=im).numpy()
    differ = np.nonzero((ours != theirs).any(axis=1))[0]
    assert differ.size == 0, f"{qtype}: rows {differ.tolist()} differ from ggml's"
    if qtype != "Q8_0":  # ggml's Q8_0 ignores the importance matrix; every other type uses it
        assert not np.array_equal(ours, quantize(torch.from_numpy(w), qtype).numpy())


def test_without_imatrix_ggml_takes_the_reference_path():
    w = rows(8, 512, 3)
    for qtype in ("Q4_K", "Q3_K", "Q4_0"):
        t = TYPES[qtype]
        assert np.array_equal(ggml_quantize(w, t.ggml_type, t.block_elems, t.block_bytes),
                              quantize(torch.from_numpy(w), qtype).numpy())


def test_imatrix_lowers_the_weighted_error():
    """What the importance matrix is for: the error weighted by it falls (Q4_K, Q3_K, Q4_0)."""
    from qbench.quant.gguf_quants import dequantize

    w = rows(64, 1536, 5)
    im = importance(1536, 5)
    for qtype in ("Q3_K", "Q4_K", "Q4_0"):
        err = {}
        for label, weights in (("plain", None), ("imatrix", im)):
            raw = quantize(torch.from_numpy(w), qtype, imatrix=weights)
            err[label] = float((((dequantize(raw, qtype, 1536).numpy() - w) ** 2) * im).sum())
        assert err["imatrix"] < 0.9 * err["plain"], (qtype, err)


def test_imatrix_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="512 values for rows of 768"):
        quantize(torch.zeros(2, 768), "Q4_K", imatrix=np.ones(512, dtype=np.float32))
