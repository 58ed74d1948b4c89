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


# ---------------------------------------------------------------- computing and storing the matrix

def _names(model):
    from qbench.quant.gguf_export import gguf_names
    from qbench.quant.modules import quantizable_linears

    linears = quantizable_linears(model, True)
    return {n: g for n, g in gguf_names(model).items() if n in linears and g.startswith("blk.")}


def test_collect_is_the_mean_squared_input_of_each_column():
    from tiny_llama import tiny_llama

    from qbench.quant import imatrix as imx

    model = tiny_llama()
    ids = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(0))
    names = _names(model)
    assert len(names) == 2 * 7 and "lm_head" not in names  # blk.* only: the tied output is token_embd
    matrix = imx.collect(model, ids, names, batch_size=2)
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64).double()
    assert matrix.counts["blk.0.attn_q.weight"].tolist() == [48.0]
    expect = (x * x).mean(dim=0).float().numpy()
    assert np.allclose(matrix.values("blk.0.attn_q.weight"), expect, rtol=1e-5)
    assert np.array_equal(matrix.values("blk.0.attn_q.weight"), matrix.values("blk.0.attn_v.weight"))
    assert matrix.values("blk.1.ffn_down.weight").shape == (160,) and matrix.values("token_embd.weight") is None


def _ggml_reads(path):
    """What ggml's own GGUF parser (gguf_init_from_file) finds in a file: general.type, the imatrix keys,
    tensor name -> (type, float32 data read at the offsets it gives)."""
    import ctypes
    from pathlib import Path

    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    for fn, res, args in (("gguf_find_key", ctypes.c_int64, [ctypes.c_char_p]), ("gguf_get_val_u32", ctypes.c_uint32, [ctypes.c_int64]),
                          ("gguf_get_val_str", ctypes.c_char_p, [ctypes.c_int64]), ("gguf_get_n_tensors", ctypes.c_int64, []),
                          ("gguf_get_tensor_name", ctypes.c_char_p, [ctypes.c_int64]), ("gguf_get_tensor_type", ctypes.c_int, [ctypes.c_int64]),
                          ("gguf_get_tensor_offset", ctypes.c_size_t, [ctypes.c_int64]), ("gguf_get_tensor_size", ctypes.c_size_t, [ctypes.c_int64]),
                          ("gguf_get_data_offset", ctypes.c_size_t, []), ("gguf_get_arr_n", ctypes.c_size_t, [ctypes.c_int64]),
                          ("gguf_get_arr_str", ctypes.c_char_p, [ctypes.c_int64, ctypes.c_size_t])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p, *args]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, "ggml could not parse the file"
    try:
        key = lambda k: lib.gguf_find_key(ctx, k.encode())  # noqa: E731
        meta = {"general.type": lib.gguf_get_val_str(ctx, key("general.type")).decode(),
                "chunk_count": lib.gguf_get_val_u32(ctx, key("imatrix.chunk_count")),
                "chunk_size": lib.gguf_get_val_u32(ctx, key("imatrix.chunk_size")),
                "datasets": [lib.gguf_get_arr_str(ctx, key("imatrix.datasets"), i).decode()
                             for i in range(lib.gguf_get_arr_n(ctx, key("imatrix.datasets")))]}
        raw, base, tensors = Path(path).read_bytes(), lib.gguf_get_data_offset(ctx), {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            start = base + lib.gguf_get_tensor_offset(ctx, i)
            data = np.frombuffer(raw[start : start + lib.gguf_get_tensor_size(ctx, i)], dtype="<f4")
            tensors[lib.gguf_get_tensor_name(ctx, i).decode()] = (lib.gguf_get_tensor_type(ctx, i), data)
    finally:
        lib.gguf_free(ctx)
    return meta, tensors


def test_gguf_imatrix_file_round_trip_and_ggml_parses_it(tmp_path):
    from qbench.quant import imatrix as imx

    rng = np.random.default_rng(0)
    matrix = imx.ImportanceMatrix({"blk.0.attn_q.weight": rng.random((1, 64)) * 100, "blk.0.ffn_down.weight": rng.random((1, 160))},
                                  {"blk.0.attn_q.weight": np.array([512.0]), "blk.0.ffn_down.weight": np.array([0.0])},
                                  ["calib text"], 4, 128)
    path = tmp_path / "im.gguf"
    imx.write_gguf(matrix, str(path))
    back = imx.read(str(path))
    assert np.array_equal(back.values("blk.0.attn_q.weight"), matrix.values("blk.0.attn_q.weight"))
    assert np.array_equal(back.values("blk.0.ffn_down.weight"), np.ones(160, np.float32))  # count 0: ones, as llama-quantize
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib text"], 4, 128)
    meta, tensors = _ggml_reads(path)
    assert meta == {"general.type": "imatrix", "chunk_count": 4, "chunk_size": 128, "datasets": ["calib text"]}
    assert sorted(tensors) == ["blk.0.attn_q.weight.counts", "blk.0.attn_q.weight.in_sum2",
                               "blk.0.ffn_down.weight.counts", "blk.0.ffn_down.weight.in_sum2"]
    kind, sums = tensors["blk.0.attn_q.weight.in_sum2"]
    assert kind == 0 and np.array_equal(sums, matrix.sums["blk.0.attn_q.weight"][0].astype(np.float32))
    assert tensors["blk.0.attn_q.weight.counts"][1].tolist() == [512.0]


def test_legacy_dat_file_is_read_as_llama_quantize_does(tmp_path):
    """llama-imatrix --output-format dat: per entry the mean x^2 times ncall; loading divides by ncall."""
    import struct

    from qbench.quant import imatrix as imx

    means = np.arange(1, 33, dtype=np.float32) / 8
    name, ncall, dataset = b"blk.3.ffn_up.weight", 7, b"wiki.train.raw"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, means.size)
    data += (means * np.float32(ncall)).astype("<f4").tobytes() + struct.pack("<i", 12) + struct.pack("<i", len(dataset)) + dataset
    path = tmp_path / "im.dat"
    path.write_bytes(data)
    matrix = imx.read(str(path))
    assert np.allclose(matrix.values("blk.3.ffn_up.weight"), means, rtol=1e-6)
    assert (matrix.datasets, matrix.chunk_count) == (["wiki.train.raw"], 12)
    assert imx.file_info(str(path))["format"] == "dat"


# ---------------------------------------------------------------- method.imatrix

def _gguf_cfg(cfg_factory, *overrides):
    return cfg_factory("method=gguf", "method.type=Q4_0", "quantize_lm_head=true", *overrides)


def test_method_with_an_imatrix_file(cfg_factory, tmp_path):
    """Each linear gets ggml's weighted quantization with its own row of the file; token_embd (no data) not."""
    from tiny_llama import tiny_llama

    from qbench.methods import RunContext
    from qbench.methods import gguf as gguf_method
    from qbench.quant import imatrix as imx

    model = tiny_llama()
    names = _names(model)
    rng = np.random.default_rng(1)
    modules = dict(model.named_modules())
    sums = {g: rng.lognormal(0, 2, (1, modules[n].in_features)) for n, g in names.items()}
    path = tmp_path / "im.gguf"
    imx.write_gguf(imx.ImportanceMatrix(sums, dict.fromkeys(sums, np.array([10.0]))), str(path))
    weights = {n: m.weight.detach().clone() for n, m in modules.items() if n in names or n == "lm_head"}
    cfg = _gguf_cfg(cfg_factory, f"method.imatrix={path}")
    info = gguf_method.quantize(model, cfg, RunContext(None, "cpu", torch.float32, quiet=True))
    layers = dict(model.named_modules())
    for name, gguf_name in names.items():
        want = quantize(weights[name], "Q4_0", imatrix=(sums[gguf_name][0].astype(np.float32) / np.float32(10)))
        assert torch.equal(layers[name].qweight, want), name
    assert torch.equal(layers["lm_head"].qweight, quantize(weights["lm_head"], "Q4_0"))
    im = info["imatrix"]
    assert im["source"] == "file" and im["format"] == "gguf" and im["entries"] == 14
    assert im["weighted_tensors"] == 14 and im["tensors_without_data"] == ["token_embd.weight"]


def test_method_imatrix_auto_from_the_calibration_set(cfg_factory, smollm2, tmp_path):
    from tiny_llama import tiny_llama

    from qbench.calib import calibration_ids
    from qbench.methods import RunContext
    from qbench.methods import gguf as gguf_method
    from qbench.quant import imatrix as imx

    cfg = _gguf_cfg(cfg_factory, "method.imatrix=auto", "calib.nsamples=3", "calib.seqlen=32")
    ctx = RunContext(smollm2.tokenizer, "cpu", torch.float32, cfg.data_dir, True)
    model = tiny_llama()
    expect = imx.collect(tiny_llama(), calibration_ids(cfg, smollm2.tokenizer)[0], _names(model))
    info = gguf_method.quantize(model, cfg, ctx)["imatrix"]
    assert info["source"] == "auto" and info["tokens"] == 96 and info["entries"] == 14
    assert {k: info["calib"][k] for k in ("name", "nsamples", "seqlen", "seed")} == \
           {"name": "c4", "nsamples": 3, "seqlen": 32, "seed": 0}
    written = imx.read(info["written_to"])  # the file of the run: llama-quantize --imatrix reads it
    assert written.chunk_count == 3 and written.chunk_size == 32 and "calib=c4" in written.datasets[0]
    for name in expect.sums:
        assert np.allclose(written.values(name), expect.values(name), rtol=1e-6)


def test_imatrix_config_checked_before_load(tmp_path):
    from qbench import ConfigError
    from qbench.cli import prevalidate

    missing = tmp_path / "nowhere" / "im.gguf"
    with pytest.raises(ConfigError, match=f"^method.imatrix for gguf: no such file {missing}$"):
        prevalidate(["method=gguf", f"method.imatrix={missing}"])
    prevalidate(["method=gguf", "method.imatrix=auto"])
    path = tmp_path / "im.gguf"
    path.write_bytes(b"GGUF")
    prevalidate(["method=gguf", f"method.imatrix={path}"])


def test_export_names_the_imatrix_as_llama_quantize_does(cfg_factory, tmp_path):
    from tiny_llama import tiny_llama

    from qbench.methods import RunContext
    from qbench.methods import gguf as gguf_method
    from qbench.quant import imatrix as imx
    from qbench.quant.gguf_export import read_metadata

    model = tiny_llama()
    modules = dict(model.named_modules())
    sums = {g: np.ones((1, modules[n].in_features)) for n, g in _names(model).items()}
    path = tmp_path / "im.gguf"
    imx.write_gguf(imx.ImportanceMatrix(sums, dict.fromkeys(sums, np.array([1.0])), ["some.txt"], 9, 512), str(path))
    cfg = _gguf_cfg(cfg_factory, f"method.imatrix={path}", f"export.path={tmp_path / 'out.gguf'}")
    ctx = RunContext(None, "cpu", torch.float32, quiet=True)
    gguf_method.quantize(model, cfg, ctx)
    gguf_method.export(model, cfg, ctx, str(tmp_path / "out.gguf"))
    meta = {key: value for key, value, *_ in read_metadata(str(tmp_path / "out.gguf"))}
    assert meta["quantize.imatrix.file"] == str(path) and meta["quantize.imatrix.dataset"] == "some.txt"
    assert meta["quantize.imatrix.entries_count"] == 14 and meta["quantize.imatrix.chunks_count"] == 9
