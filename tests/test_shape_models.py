"""Shape models (model=shape:<name>): seeded builds, every method on a tiny one on the CPU, the fit
check before load, synthetic weights in records and leaderboards (issue 21)."""

import math
from pathlib import Path

import pytest
import torch

from qbench import ConfigError, models, shapes

GIB = 2**30
TINY = "shape:tiny-llama"
# Every method at its 4-bit (or only) setting; GGUF as the Q4_K_M mix.
METHODS = [["method=rtn"], ["method=gptq"], ["method=awq"], ["method=int8"], ["method=nf4"], ["method=fp4"],
           ["method=fp8"], ["method=gguf", "method.type=Q4_K_M"]]
SMALL_RUN = ["device=cpu", "dtype=float32", "calib.nsamples=4", "calib.seqlen=128", "eval.ppl.datasets=[wikitext2]",
             "eval.ppl.seqlen=128", "eval.ppl.max_windows=2"]


def test_tiny_shape_builds_deterministically_from_its_seed():
    path = shapes.shape_file(TINY)
    a, b = shapes.build(path, "cpu", torch.float32), shapes.build(path, "cpu", torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    shapes.init_weights(b, seed=1, layers=b.config.num_hidden_layers)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shape_activations_stay_finite_and_perplexity_is_finite(dtype):
    model = shapes.build(shapes.shape_file("tiny-qwen2"), "cpu", dtype)
    assert model.dtype == dtype and model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    assert 1 < math.exp(out.loss.item()) < 10 * model.config.vocab_size  # about the vocabulary size: random logits


REAL = {"llama-3-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400, "qwen2.5-7b": 7_615_616_512,
        "llama-3-70b": 70_553_706_496}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_have_the_real_parameter_count(name):
    assert shapes.shape_parameters(shapes.shape_file(name)) == REAL[name]


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3.2-1b", "qwen2.5-7b", "llama-3-70b-layers4"])
def test_real_shapes_divide_into_every_methods_blocks(name):
    """Every linear's rows split into GPTQ/AWQ/RTN groups of 128, NF4 blocks of 64 and GGUF K-quant
    super-blocks of 256, so no method falls back to another type or a short last group."""
    config = shapes.hf_config(shapes.read_shape(shapes.shape_file(name)))
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert widths and all(w % 256 == 0 for w in widths)
    assert config.vocab_size > 49152  # the real vocabulary: SmolLM2's token ids all index it


def test_a_model_that_cannot_fit_fails_before_load_in_one_line(monkeypatch, capsys):
    from qbench.cli import run_cli

    monkeypatch.setattr(models, "_host_available", lambda: 24 * GIB)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    assert run_cli(["model=shape:llama-3-70b", "device=cpu", "quiet=true", "wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("qbench: error: shape:llama-3-70b needs ~290 GiB in float32 (70.55B parameters")
    assert err.endswith("the host has 24 GiB available (device=cpu)")


def test_fit_check_names_the_gpu_memory(monkeypatch):
    monkeypatch.setattr(models, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(models, "device_memory", lambda device: (139 * GIB, "the GPU has {} GiB"))
    with pytest.raises(ConfigError, match=r"^shape:llama-3-70b needs ~146 GiB in bfloat16 .*, the GPU has 139 GiB$"):
        models.check_fit("shape:llama-3-70b", "cuda", "bfloat16")
    models.check_fit("shape:llama-3-8b", "cuda", "bfloat16")  # 15 GiB of weights: fits
    models.check_fit("shape:llama-3-70b-layers4", "cuda", "float16")


def test_local_checkpoint_is_counted_from_its_config_and_loaded_onto_the_device(tmp_path):
    model = shapes.build(shapes.shape_file(TINY), "cpu", torch.float32)
    model.save_pretrained(tmp_path)
    models.default_tokenizer().save_pretrained(tmp_path)
    assert models.parameter_count(models.resolve_source(str(tmp_path))) == sum(p.numel() for p in model.parameters())
    loaded = models.load_model(str(tmp_path), "cpu", "float32")
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), loaded.model.state_dict().values()))


@pytest.fixture(scope="module")
def shape_records(data_dir, cfg_factory):
    """Every method on the tiny shape through the runner, one results dir: (records, results dir)."""
    from qbench import runner

    records, results = [], None
    for overrides in METHODS:
        cfg = cfg_factory(f"model={TINY}", *SMALL_RUN, *overrides, *([f"results_dir={results}"] if results else []))
        results = cfg.results_dir
        records.append(runner.run(cfg))
    return records, results


def test_every_method_quantizes_a_shape_model_in_place_on_cpu(shape_records):
    records, _ = shape_records
    for rec, overrides in zip(records, METHODS):
        assert rec["status"] == "ok", (overrides, rec["error"], rec.get("traceback"))
        assert rec["synthetic_weights"] is True and rec["quantized_in_place"] is True
        assert rec["eval_key"]["synthetic_weights"]["shape"] == "tiny-llama"
        assert rec["metrics"]["vram_quantize_peak_gib"] is None  # a CPU run
        assert math.isfinite(rec["metrics"]["ppl_wikitext2"]) and rec["timings"]["quantize_s"] > 0
        assert rec["quant_info"].get("quantized_layers") == 14 or rec["method"] == "gguf"


def test_leaderboard_keeps_synthetic_perplexity_out_of_the_ranking(shape_records, tmp_path):
    from qbench.leaderboard import write_leaderboards
    from qbench.records import read_records

    _, results = shape_records
    written = write_leaderboards(read_records(results), tmp_path, TINY)
    assert {p.parent.name for p in written} == {"tiny-llama-shape"}
    md = (tmp_path / "tiny-llama-shape" / "leaderboard.md").read_text()
    assert "ppl wikitext2 (sanity)" in md and "Δppl" not in md and "synthetic weights" in md
    html = (tmp_path / "tiny-llama-shape" / "leaderboard.html").read_text()
    assert "ppl_wikitext2 vs" not in html  # no perplexity plot, so no Pareto front on it
    assert "<th data-key='ppl_wikitext2' class='sanity'" in html  # not sortable


def test_gpu_8b_sweep_and_its_leaderboard_folder(shape_records, tmp_path):
    """sweeps/gpu-8b.yaml runs every method on shape:llama-3-8b, and its records (here the tiny shape's,
    renamed and given GPU figures) render reports/llama-3-8b-shape/ with the quantize-memory column and a
    latency plot instead of a perplexity one."""
    import copy

    import yaml

    from qbench.leaderboard import write_leaderboards
    from qbench.sweep import plan

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "gpu-8b.yaml").read_text())
    commands, _ = plan(spec, [])
    methods = {m for args in commands for m in args[1].removeprefix("method=").split(",")}
    assert methods == {"fp16", "rtn", "gptq", "awq", "nf4", "fp4", "int8", "fp8", "gguf"}
    assert all("model=shape:llama-3-8b" in args for args in commands)
    records = []
    for i, rec in enumerate(copy.deepcopy(shape_records[0])):
        rec["model"] = rec["eval_key"]["model"] = "shape:llama-3-8b"
        rec["metrics"].update(vram_quantize_peak_gib=16.0 + i, decode_ms_per_token=10.0 - i)
        records.append(rec)
    write_leaderboards(records, tmp_path)
    md = (tmp_path / "llama-3-8b-shape" / "leaderboard.md").read_text()
    assert "quantize VRAM GiB" in md and "16.00" in md
    assert "decode_ms_per_token vs bits_per_weight" in (tmp_path / "llama-3-8b-shape" / "leaderboard.html").read_text()


def test_a_run_records_where_its_eval_time_goes(data_dir, cfg_factory):
    from qbench import runner

    cfg = cfg_factory(f"model={TINY}", *SMALL_RUN, "method=rtn", "bits=4", "eval.speed=true", "eval.kld=true",
                      "eval.kld_windows=1", "eval.speed_opts.new_tokens=2", "eval.speed_opts.prompt_tokens=4",
                      "eval.speed_opts.repeats=1")
    rec = runner.run(cfg)
    assert rec["status"] == "ok", rec["error"]
    phases = [rec["metrics"][k] for k in ("eval_ppl_s", "eval_kld_s", "eval_speed_s")]
    assert all(p > 0 for p in phases) and sum(phases) <= rec["timings"]["eval_s"]
