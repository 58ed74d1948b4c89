"""export.format=compressed-tensors: our tensors against the compressed-tensors package's own compressors
(bit for bit), and exported tiny models read back by transformers + compressed-tensors with the very
weights and logits of our quantized model. Runs where compressed-tensors is installed (the dev extra)."""

import json
import subprocess
import sys

import pytest
import torch

from qbench import ConfigError
from qbench.methods import RunContext, get_method
from qbench.quant.ct_export import check_linears, layer_layout, quantized_layers, save_compressed_tensors
from qbench.quant.fp8 import FP8Linear
from qbench.quant.grid import QuantizedWeight, default_g_idx
from qbench.quant.qlinear import QuantLinear
from tiny_llama import tiny_llama

ct = pytest.importorskip("compressed_tensors")


def _hand_layer(bits: int, sym: bool, K: int = 64, N: int = 40, group_size: int = 32) -> QuantLinear:
    """Codes covering every level; N = 40 zero points do not fill whole words at 3 bits."""
    g = torch.Generator().manual_seed(bits)
    G = K // group_size if group_size != -1 else 1
    codes = torch.randint(0, 2**bits, (N, K), generator=g).to(torch.uint8)
    zeros = torch.full((G, N), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (G, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.1 + 0.01).half()
    qw = QuantizedWeight(codes, scales, zeros.to(torch.uint8), default_g_idx(K, group_size), bits, group_size, sym)
    return QuantLinear.from_quantized(qw, None)


@pytest.mark.parametrize("bits,sym,group_size", [(4, False, 32), (3, False, 32), (8, True, -1), (2, False, -1),
                                                 (4, True, 32)])
def test_int_tensors_are_what_compressed_tensors_compresses_bit_for_bit(bits, sym, group_size):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    layer = _hand_layer(bits, sym, group_size=group_size)
    scheme_dict, ours = layer_layout("proj", layer, torch.float32)
    scheme = QuantizationScheme.model_validate(scheme_dict)
    zeros = layer.unpacked().zeros.T.to(torch.int32) - 2 ** (bits - 1)  # their zero point is signed
    state = {"weight": layer.dequantize(torch.float32), "weight_scale": layer.scales.T.float(),
             "weight_zero_point": zeros.to(torch.int8)}
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert set(theirs) == set(ours) == {"weight_packed", "weight_scale", "weight_shape"} | (
        set() if sym else {"weight_zero_point"})
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    back = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert torch.equal(back, layer.dequantize(torch.float32))


@pytest.mark.parametrize("scale", ["tensor", "channel"])
def test_fp8_tensors_are_what_compressed_tensors_compresses(scale):
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 64)
    layer = FP8Linear(w, None, "e4m3", scale)
    scheme_dict, ours = layer_layout("proj", layer, torch.float32)
    assert scheme_dict["format"] == "naive-quantized" and scheme_dict["weights"]["strategy"] == scale
    scheme = QuantizationScheme.model_validate(scheme_dict)
    theirs = NaiveQuantizationCompressor.compress({"weight": layer.dequantize(), "weight_scale": ours["weight_scale"]},
                                                  scheme)
    assert theirs["weight"].dtype == ours["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(theirs["weight"].view(torch.uint8), ours["weight"].view(torch.uint8))
    assert torch.equal(NaiveQuantizationCompressor.decompress(ours, scheme)["weight"], layer.dequantize())


def _quantized(method: str, cfg_factory, *overrides):
    from qbench.models import default_tokenizer

    model = tiny_llama()
    cfg = cfg_factory(f"method={method}", "calib.nsamples=2", "calib.seqlen=64", "export.format=compressed-tensors",
                      *overrides)
    ctx = RunContext(default_tokenizer(), "cpu", torch.float32, cfg.data_dir, True)
    check_linears(model, cfg)
    get_method(method).quantize(model, cfg, ctx)
    return model, cfg


def _load(path, dequantize: bool):
    """transformers + compressed-tensors. dequantize=True decompresses each checkpoint tensor on load; the
    default route (apply the scheme, compress, decompress on the first forward) cannot load asymmetric
    pack-quantized checkpoints with transformers 5.25 / compressed-tensors 0.20.1: it builds the zero point
    unpacked, [N, G], on the meta device, and the checkpoint's packed [N*bits/32, G] is a size mismatch."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **extra).eval()


@pytest.mark.parametrize("method,overrides,fmt,dequantize", [
    ("rtn", ["bits=4", "group_size=32"], "pack-quantized", True),  # asymmetric, zero points packed along N
    ("rtn", ["bits=8", "group_size=-1", "method.sym=true"], "pack-quantized", False),  # symmetric per channel
    ("rtn", ["bits=3", "group_size=32", "quantize_lm_head=true"], "pack-quantized", True),  # codes straddle words
    ("gptq", ["bits=4", "group_size=32", "method.act_order=true", "method.static_groups=true"], "pack-quantized", True),
    ("hqq", ["bits=4", "group_size=32", "method.optimize=false"], "pack-quantized", True),
    ("fp8", [], "naive-quantized", False),
    ("fp8", ["method.scale=channel", "method.activations=dynamic"], "float-quantized", False),
])
def test_export_reads_back_with_our_weights_and_logits(method, overrides, fmt, dequantize, cfg_factory, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    model, cfg = _quantized(method, cfg_factory, *overrides)
    act_order = "method.act_order=true" in overrides
    save_compressed_tensors(model, None, str(tmp_path), method, act_order)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    head_quantized = "quantize_lm_head=true" in overrides
    assert qc.quant_method == "compressed-tensors" and qc.format == fmt and qc.quantization_status == "compressed"
    assert qc.ignore == ([] if head_quantized else ["lm_head"]) and config["tie_word_embeddings"] == (not head_quantized)
    assert (qc.config_groups["group_0"].weights.actorder == "weight") == act_order
    loaded = _load(tmp_path, dequantize)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits  # the first forward decompresses (dequantize=False)
    layers = quantized_layers(model)
    assert len(layers) == (15 if head_quantized else 14)
    for name, layer in layers.items():
        assert torch.equal(loaded.get_submodule(name).weight, layer.dequantize(torch.float32)), name
    if "method.activations=dynamic" in overrides:  # both quantize each token's inputs to E4M3 with absmax / 448
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    else:
        assert torch.equal(theirs, ours)


def test_layers_the_format_cannot_hold_fail_in_one_line(cfg_factory, tmp_path):
    cfg = cfg_factory("method=rtn", "group_size=48", "export.format=compressed-tensors")
    with pytest.raises(ValueError, match=r"groups that divide in_features: model\.layers\.0\.self_attn\.q_proj has 64"):
        check_linears(tiny_llama(), cfg)  # before quantization: 64 and 160 are no multiples of 48
    layer = _hand_layer(4, False)
    layer.g_idx.copy_(layer.g_idx.flip(0))  # an act-order g_idx
    with pytest.raises(ValueError, match="act-order g_idx"):
        layer_layout("proj", layer, torch.float32)
    model, _ = _quantized("hqq", cfg_factory, "group_size=32")  # the solver's float zeros
    with pytest.raises(ValueError, match="not integers"):
        save_compressed_tensors(model, None, str(tmp_path), "hqq")


@pytest.mark.parametrize("argv,needle", [
    (["export.format=compressed-tensors", "method=nf4"], "does not support method nf4; supported: rtn, gptq"),
    (["export.format=safetensors"], "unknown export.format 'safetensors'; valid: native, compressed-tensors"),
    (["export.format=compressed-tensors", "method=gptq"], "needs method.static_groups=true or group_size=-1"),
    (["export.format=compressed-tensors", "method=hqq"], "hqq needs method.optimize=false"),
    (["export.format=compressed-tensors", "method=fp8", "method.format=e5m2"], "E4M3 only"),
])
def test_bad_combinations_fail_before_load(argv, needle):
    from qbench.cli import prevalidate

    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_supported_combinations_pass(cfg_factory):
    from qbench.cli import prevalidate

    for argv in (["method=gptq", "method.static_groups=true"], ["method=gptq", "group_size=-1"], ["method=awq"],
                 ["method=hqq", "method.optimize=false"], ["method=fp8"], ["method=rtn", "bits=8"]):
        prevalidate(["export.format=compressed-tensors", *argv])


def test_cli_refuses_nf4_without_torch(tmp_path):
    code = ("import sys; sys.argv=['qbench', 'method=nf4', 'export.format=compressed-tensors']\n"
            "from qbench.cli import main\n"
            "try:\n    main()\n"
            "except SystemExit:\n    assert 'torch' not in sys.modules, 'torch imported'\n    raise\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "does not support method nf4" in lines[0], out.stderr


def test_runner_exports_and_the_reloaded_model_has_the_recorded_perplexity(data_dir, cfg_factory, tmp_path):
    from qbench import runner
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import perplexity, tokenize
    from qbench.models import default_tokenizer

    small = ["model=shape:tiny-llama", "device=cpu", "dtype=float32", "eval.ppl.datasets=[wikitext2]",
             "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "method=rtn", "group_size=128",
             "export.format=compressed-tensors", f"export.path={tmp_path / 'ct'}"]
    record = runner.run(cfg_factory(*small))
    assert record["status"] == "ok" and record["export_format"] == "compressed-tensors", record.get("error")
    loaded = _load(tmp_path / "ct", dequantize=True)
    ids = tokenize(default_tokenizer(), perplexity_text("wikitext2", data_dir), key=f"wikitext2:{data_dir}")
    assert perplexity(loaded, ids, 128, 2, 1)["ppl"] == record["metrics"]["ppl_wikitext2"]
