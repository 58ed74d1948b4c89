"""The GPTQ checkpoint layout: bit order and the zero-point offset on hand-made examples, and
export -> load round trips with identical outputs and perplexity."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qbench.eval.perplexity import perplexity
from qbench.methods import RunContext, get_method
from qbench.quant.grid import QuantizedWeight
from qbench.quant.gptq_format import from_v1_qzeros, load_checkpoint, save_checkpoint, to_v1_qzeros
from qbench.quant.qlinear import QuantLinear
from qbench.records import read_records
from tiny_llama import tiny_llama


def _u32(word: int) -> int:
    return word & 0xFFFFFFFF


class _OneLinear(torch.nn.Module):
    """The smallest 'model' save_checkpoint accepts: one QuantLinear and a config."""

    def __init__(self, layer):
        super().__init__()
        from transformers import LlamaConfig

        self.proj = layer
        self.config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)

    def get_output_embeddings(self):
        return None


def test_hand_made_4bit_layer_matches_the_documented_layout(tmp_path):
    K, N = 16, 8  # in, out; two groups of 8 input channels
    codes = torch.tensor([[(k + n) % 16 for k in range(K)] for n in range(N)], dtype=torch.uint8)
    zeros = torch.stack([torch.arange(1, 9), torch.arange(0, 16, 2)]).to(torch.uint8)  # group 1 has zero = 0
    scales = torch.full((2, N), 0.5, dtype=torch.float16)
    qw = QuantizedWeight(codes, scales, zeros, (torch.arange(K) // 8).to(torch.int32), 4, 8, False)
    save_checkpoint(_OneLinear(QuantLinear.from_quantized(qw, None)), None, str(tmp_path), "test", False)
    t = load_file(str(tmp_path / "model.safetensors"))
    assert t["proj.qweight"].dtype == torch.int32 and t["proj.qweight"].shape == (2, 8)
    # qweight: code of input k at bits [4k, 4k+4) of word k // 8, column n = output n
    assert _u32(t["proj.qweight"][0, 0].item()) == 0x76543210  # output 0, inputs 0..7: codes 0..7
    assert _u32(t["proj.qweight"][1, 0].item()) == 0xFEDCBA98  # inputs 8..15: codes 8..15
    assert _u32(t["proj.qweight"][0, 1].item()) == 0x87654321  # output 1: codes 1..8
    # qzeros: output n at bits [4n, 4n+4), stored as zero - 1 (v1); zero 0 is stored as 15
    assert _u32(t["proj.qzeros"][0, 0].item()) == 0x76543210  # zeros 1..8
    assert _u32(t["proj.qzeros"][1, 0].item()) == 0xDB97531F  # zeros 0, 2, ..., 14
    assert t["proj.scales"].dtype == torch.float16 and t["proj.scales"].shape == (2, 8)
    assert torch.equal(t["proj.g_idx"], (torch.arange(K) // 8).to(torch.int32))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (4, 8, False, False)
    assert qc["meta"]["zero_points_at_0"] == 1


@pytest.mark.parametrize("bits,word", [(4, 0x77777777), (2, 0x55555555), (8, 0x7F7F7F7F)])
def test_symmetric_zero_points_give_the_familiar_v1_words(bits, word):
    N = 32
    zeros = torch.full((3, N), 2 ** (bits - 1), dtype=torch.int32)  # the symmetric grid's zero point
    from qbench.quant.packing import pack_cols

    stored = to_v1_qzeros(pack_cols(zeros, bits), bits, N)
    assert stored.shape == (3, N * bits // 32) and all(_u32(w) == word for w in stored.view(-1).tolist())
    assert torch.equal(from_v1_qzeros(stored, bits, N), pack_cols(zeros, bits))


def test_3bit_v1_zeros_round_trip_with_every_value():
    from qbench.quant.packing import pack_cols, unpack_cols

    zeros = torch.arange(64).remainder(8).view(2, 32).to(torch.int32)
    stored = to_v1_qzeros(pack_cols(zeros, 3), 3, 32)
    assert stored.shape == (2, 3)  # 32 zero points in 3 words
    assert torch.equal(unpack_cols(stored, 3, 32), (zeros - 1) % 8)
    assert torch.equal(unpack_cols(from_v1_qzeros(stored, 3, 32), 3, 32), zeros)


def _quantized_tiny(method, cfg_factory, tok, *overrides, tie=True):
    model = tiny_llama(kv_heads=2, tie=tie)
    cfg = cfg_factory(f"method={method}", "calib.nsamples=2", "calib.seqlen=64", *overrides)
    ctx = RunContext(tok, "cpu", torch.float32, cfg.data_dir, True)
    get_method(method).quantize(model, cfg, ctx)
    return model, cfg, ctx


@pytest.mark.parametrize("method,overrides", [
    ("gptq", ["bits=3", "group_size=48", "method.act_order=true"]),  # act-order g_idx, partial groups (64, 160 wide)
    ("gptq", ["bits=4", "group_size=-1", "quantize_lm_head=true"]),  # lm_head quantized: the tie is broken
    ("awq", ["bits=4", "group_size=32"]),
])
def test_export_then_load_gives_identical_outputs(method, overrides, cfg_factory, smollm2, tmp_path):
    from qbench.models import load_model

    model, cfg, ctx = _quantized_tiny(method, cfg_factory, smollm2.tokenizer, *overrides)
    get_method(method).export(model, cfg, ctx, str(tmp_path))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] == (method == "gptq") and qc["meta"]["method"] == method
    loaded = load_checkpoint(str(tmp_path), torch.float32)
    names = lambda m: sorted(n for n, x in m.named_modules() if isinstance(x, QuantLinear))  # noqa: E731
    assert names(loaded) == names(model) and len(names(model)) == (15 if "quantize_lm_head=true" in overrides else 14)
    for name in names(model):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(a, buf), getattr(b, buf)), (name, buf)
    ids = torch.randint(0, 49152, (1, 4 * 64))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert perplexity(model, ids[0], 64)["ppl"] == perplexity(loaded, ids[0], 64)["ppl"]
    via_cli_loader = load_model(str(tmp_path), "cpu", "float32")  # model=DIR: config + tokenizer
    assert via_cli_loader.tokenizer("hello").input_ids == smollm2.tokenizer("hello").input_ids
    with torch.no_grad():
        assert torch.equal(via_cli_loader.model(ids).logits, model(ids).logits)


@pytest.mark.slow  # about 3 minutes on a 2-core CPU: GPTQ of the real model, then a second qbench process
def test_cli_export_and_reload_record_the_same_perplexity(tmp_path, data_dir, smollm2):
    quick = ["eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=256", "eval.ppl.max_windows=2", "quiet=true",
             "wandb.mode=disabled"]
    out_dir = tmp_path / "gptq-w4"
    run = lambda *a: subprocess.run([sys.executable, "-m", "qbench.cli", *a, *quick], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path, timeout=900)
    first = run("method=gptq", "calib.nsamples=2", "calib.seqlen=128", f"export.path={out_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(f"model={out_dir}", "method=fp16")
    assert second.returncode == 0, second.stderr[-2000:]
    records = read_records(tmp_path / "results")
    gptq = next(r for r in records if r["method"] == "gptq")
    reloaded = next(r for r in records if r["model"] == str(out_dir))
    assert gptq["status"] == reloaded["status"] == "ok" and gptq["export_path"] == str(out_dir)
    assert reloaded["metrics"]["ppl_wikitext2"] == gptq["metrics"]["ppl_wikitext2"]
