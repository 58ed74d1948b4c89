"""The kv_cache axis (issue 24): int8/fp8 KV caches (qbench/kvcache.py), perplexity through them, their
bytes, validation before load, and how records, reports and the gate tell them apart."""

import pytest
import torch
from transformers import LlamaConfig

from qbench import ConfigError, kvcache
from qbench.cli import prevalidate
from qbench.eval import speed
from qbench.eval.perplexity import perplexity, window_logits
from qbench.models import cache_keyword
from tiny_llama import tiny_llama

GEN = torch.Generator().manual_seed(0)


def _activations():
    """[batch 2, heads 3, tokens 17, head_dim 64] with a few outliers and one all-zero vector."""
    x = torch.randn(2, 3, 17, 64, generator=GEN)
    x[0, 1, 4, 7] = 40.0
    x[1, 2, 9] = 0.0
    return x


def test_int8_round_trip_is_within_half_a_step_of_each_vector():
    x = _activations()
    codes, scale = kvcache.quantize(x, "int8")
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (2, 3, 17, 1)
    back = kvcache.dequantize(codes, scale, "int8", torch.float32)
    assert torch.all((back - x).abs() <= scale.float() / 2 * (1 + 1e-3) + 1e-7)
    assert torch.equal(back[1, 2, 9], torch.zeros(64))  # an all-zero vector stays zero
    assert codes.abs().amax(dim=-1)[0, 0].min() >= 126  # the absmax of each vector lands on the grid's end


@pytest.mark.parametrize("kind,mantissa,subnormal", [("fp8", 3, 2.0**-9), ("fp8_e5m2", 2, 2.0**-16)])
def test_fp8_round_trip_is_within_half_an_ulp(kind, mantissa, subnormal):
    x = _activations()
    codes, scale = kvcache.quantize(x, kind)
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float16
    back = kvcache.dequantize(codes, scale, kind, torch.float32)
    s = scale.float()
    bound = x.abs() * 2.0 ** -(mantissa + 1) + s * subnormal / 2  # half an ulp, or half the smallest step
    assert torch.all((back - x).abs() <= bound * (1 + 1e-3) + 1e-7)
    assert torch.isfinite(back).all() and (back - x).abs().max() > 0


def test_quantized_cache_logits_are_close_to_the_unquantized_ones_and_not_equal():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (2, 48), generator=GEN)
    plain = window_logits(model, ids)
    # relative RMS error; E4M3's 3 mantissa bits round each element by up to 6 %, int8 by amax / 254
    for kind, bound in (("int8", 0.01), ("fp8", 0.05)):
        quantized = window_logits(model, ids, kind)
        error = (quantized - plain).norm() / (plain - plain.mean()).norm()
        assert 0 < error < bound, (kind, error)


def test_perplexity_through_the_int8_cache_is_near_none_and_uses_the_cache():
    model = tiny_llama()
    ids = torch.randint(0, 5000, (4 * 64,), generator=GEN)
    none = perplexity(model, ids, 64)
    int8 = perplexity(model, ids, 64, kv_cache="int8")
    fp8 = perplexity(model, ids, 64, kv_cache="fp8")
    chunked = perplexity(model, ids, 64, kv_cache="int8", chunk=16)  # later chunks read earlier ones back
    assert none == perplexity(model, ids, 64, kv_cache="none")  # the plain path is unchanged
    for quantized in (int8, fp8):
        assert quantized["ppl"] != none["ppl"] and abs(quantized["ppl"] / none["ppl"] - 1) < 0.01
    assert fp8["ppl"] != int8["ppl"]
    assert abs(chunked["ppl"] / int8["ppl"] - 1) < 1e-4


def _greedy_dynamic(model, prompt, steps, kind):
    cache, kv = kvcache.make_dynamic_cache(model, kind), cache_keyword(model)
    tok = model(prompt, **{kv: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    tokens = [tok]
    for _ in range(steps):
        tok = model(tok, **{kv: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(tok)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_static_quantized_cache_decodes_the_dynamic_caches_tokens(kind):
    """speed.static_decode's path (no capture on a CPU) with the static quantized cache, rewound between
    repeats, gives the tokens of a greedy decode through the dynamic quantized cache (untied head, small
    vocabulary: a tiny model whose greedy tokens vary)."""
    model = tiny_llama(seed=1, tie=False, vocab=512)
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ms, tokens = speed.static_decode(model, prompt, 5, 2, "cpu", cache_factory=kvcache.static_factory(kind))
        dynamic = _greedy_dynamic(model, prompt, 5, kind)
    assert ms > 0 and tokens.shape == (1, 6) and torch.equal(tokens, dynamic)
    assert len(set(tokens[0].tolist())) > 2, tokens  # a real continuation, not one token repeated


def test_static_cache_writes_codes_in_place_and_reads_what_the_dynamic_one_does():
    model = tiny_llama()
    static, dynamic = kvcache.make_static_cache(model, "int8", 32, 1), kvcache.make_dynamic_cache(model, "int8")
    kv = cache_keyword(model)
    prompt, token = torch.randint(0, 1000, (1, 5), generator=GEN), torch.randint(0, 1000, (1, 1), generator=GEN)
    with torch.no_grad():
        model(prompt, **{kv: static}, use_cache=True)
        layer = static.layers[0]
        pointer = layer.keys.data_ptr()
        logits = model(token, **{kv: static}, use_cache=True).logits
        model(prompt, **{kv: dynamic}, use_cache=True)
        expected = model(token, **{kv: dynamic}, use_cache=True).logits
        plain = model(torch.cat([prompt, token], dim=1), use_cache=False).logits[:, -1:]
    assert layer.keys.shape == (1, 2, 32, 16) and layer.keys.dtype == torch.int8 and layer.keys.data_ptr() == pointer
    assert int(static.get_seq_length()) == 6 and layer.key_scales[0, :, :6].min() > 0 and layer.key_scales[0, :, 6:].max() == 0
    assert torch.allclose(logits, expected, atol=1e-5) and not torch.equal(logits, plain)


@pytest.mark.parametrize("argv,needle", [
    (["kv_cache=nosuch"], "unknown kv_cache 'nosuch'; valid: fp8, int8, none"),
    (["kv_cache=fp8", "kv_cache.format=e3m4"], "unknown kv_cache.format for fp8 'e3m4'; valid: e4m3, e5m2"),
    (["kv_cache=int8", "kv_cache.granularity=channel"], "unknown kv_cache.granularity for int8 'channel'; valid: token_head"),
    (["kv_cache=int8", "kv_cache.chunk=0"], "kv_cache.chunk must be >= 1 or null, got 0"),
    (["kv_cache=int8", "kv_cache.chunk=abc"], "kv_cache.chunk must be an integer >= 1 or null"),
    (["-m", "kv_cache=none,int8,bad"], "unknown kv_cache 'bad'"),
])
def test_bad_kv_cache_values_fail_in_one_line_before_load(argv, needle):
    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_kv_cache_defaults_to_none_and_its_options_compose(cfg_factory):
    assert cfg_factory().kv_cache.name == "none"
    cfg = cfg_factory("kv_cache=fp8")
    assert (cfg.kv_cache.format, cfg.kv_cache.granularity, cfg.kv_cache.chunk) == ("e4m3", "token_head", None)
    assert kvcache.cache_kind(cfg.kv_cache) == "fp8_e4m3"
    assert kvcache.cache_kind(cfg_factory("kv_cache=fp8", "kv_cache.format=e5m2").kv_cache) == "fp8_e5m2"
    assert kvcache.cache_kind(None) == "none"  # a config from before the option
    prevalidate(["-m", "method=fp16,rtn", "kv_cache=none,int8,fp8"])


def test_kv_bytes_at_8k_by_hand():
    # SmolLM2-135M's attention: 30 layers, 9 query heads of 64, 3 KV heads.
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                         intermediate_size=1536, vocab_size=49152)
    vectors = 2 * 30 * 3 * 8192  # K and V, layers, KV heads, tokens (batch 1)
    assert kvcache.kv_bytes(config, "none", 8192, 1, torch.float16) == vectors * 64 * 2 == 188_743_680
    assert kvcache.kv_bytes(config, "none", 8192, 1, torch.float32) == vectors * 64 * 4
    assert kvcache.kv_bytes(config, "int8", 8192) == vectors * (64 + 2) == 97_320_960  # codes + a float16 scale
    assert kvcache.kv_bytes(config, "fp8", 8192) == kvcache.kv_bytes(config, "int8", 8192)
    assert kvcache.kv_bytes(config, "int8", 8192, batch=4) == 4 * 97_320_960


def test_records_tell_kv_caches_apart():
    from qbench.gate import config_key, label
    from qbench.leaderboard import run_label
    from qbench.records import config_identity, is_baseline, kv_variant, method_variant
    from qbench.runner import run_identity

    def rec(method, kv=None):
        config = {"method": {"name": method}, **({"kv_cache": kv} if kv is not None else {})}
        return {"method": method, "bits": 4, "group_size": 128, "model": "m", "eval_key": {"device": "cpu"}, "config": config}

    old, none = rec("rtn"), rec("rtn", {"name": "none", "choices": {}})
    int8 = rec("rtn", {"name": "int8", "granularity": "token_head", "chunk": None})
    e5m2 = rec("rtn", {"name": "fp8", "format": "e5m2", "granularity": "token_head", "chunk": 64})
    assert config_identity(old) == config_identity(none) != config_identity(int8)
    assert config_key(old) == config_key(none) != config_key(int8)
    assert run_identity(old["config"], 4, 128) == run_identity(none["config"], 4, 128)
    assert kv_variant(int8) == ["kv int8"] and kv_variant(e5m2) == ["kv fp8 e5m2 chunk=64"] and kv_variant(none) == []
    assert method_variant(int8) == [] and label(config_key(int8)).startswith("rtn w4 g128 kv int8 [")
    assert is_baseline(rec("fp16")) and is_baseline(rec("fp16", {"name": "none"}))
    fp16_int8 = rec("fp16", {"name": "int8"})
    assert not is_baseline(fp16_int8) and run_label(fp16_int8) == "fp16 w4 g128 kv int8"


def test_runs_with_a_kv_cache_record_it_against_one_baseline(data_dir, cfg_factory):
    """fp16 and RTN with kv_cache=int8 on the tiny shape model through the runner: one baseline
    (kv_cache=none), the fp16 int8-cache run is not taken for it, every record has kv_bytes_8k."""
    from qbench import runner
    from qbench.leaderboard import run_label, sections
    from qbench.records import read_records
    from qbench.report import comparison_frame

    small = ["model=shape:tiny-llama", "device=cpu", "dtype=float32", "eval.ppl.datasets=[wikitext2]",
             "eval.ppl.seqlen=128", "eval.ppl.max_windows=2"]
    first = cfg_factory(*small, "method=fp16", "kv_cache=int8")
    fp16_int8 = runner.run(first)
    rtn_int8 = runner.run(cfg_factory(*small, "method=rtn", "kv_cache=int8", f"results_dir={first.results_dir}"))
    records = read_records(first.results_dir)
    base = [r for r in records if r.get("role") == "baseline"]
    assert fp16_int8["status"] == rtn_int8["status"] == "ok" and len(base) == 1
    assert base[0]["config"]["kv_cache"]["name"] == "none" and base[0]["metrics"]["kv_cache"] == "none"
    fp16 = base[0]["metrics"]
    assert fp16_int8["metrics"]["kv_cache"] == "int8" and fp16_int8["metrics"]["kv_ppl_chunk"] == 128
    assert fp16_int8["config"]["kv_cache"]["granularity"] == "token_head"
    assert 0 < abs(fp16_int8["metrics"]["ppl_wikitext2"] / fp16["ppl_wikitext2"] - 1) < 0.01
    # tiny-llama: 2 layers, 2 KV heads of 64; K and V at 8192 tokens, float32 vs int8 codes + float16 scales
    assert fp16["kv_bytes_8k"] == 2 * 2 * 2 * 8192 * 64 * 4 == 16_777_216
    assert fp16_int8["metrics"]["kv_bytes_8k"] == rtn_int8["metrics"]["kv_bytes_8k"] == 2 * 2 * 2 * 8192 * 66
    frame = comparison_frame(records)
    assert list(frame["variant"]) == ["", "kv int8", "kv int8"] and list(frame["method"]) == ["fp16", "fp16", "rtn"]
    section = sections(records, "shape:tiny-llama")[0]
    assert [run_label(r) for r in section["rows"]] == ["fp16 (baseline)", "fp16 kv int8", "rtn w4 g128 kv int8"]
    assert section["baseline"]["run_id"] == base[0]["run_id"] and "kv_mib_8k" in [c[0] for c in section["cols"]]


def test_gpu_sweep_runs_fp16_and_rtn_with_both_caches():
    from pathlib import Path

    import yaml

    from qbench.sweep import plan

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "gpu.yaml").read_text())
    commands, _ = plan(spec, [])
    with_kv = [c for c in commands if "kv_cache=int8,fp8" in c]
    assert [c[1] for c in with_kv] == ["method=fp16", "method=rtn"] and "bits=4" in with_kv[1]


def test_kld_reads_the_quantized_model_through_its_cache():
    from qbench.eval import kld

    model = tiny_llama(seed=1, tie=False, vocab=512)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions, so that small logit changes show in the KL
    # its own generator: GEN's state depends on which tests of this file ran before in the same process (xdist),
    # and the float16 rounding of the reference (the "none" KLD, either sign) on other windows reached 2.6e-5
    windows = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    refs = [kld.reference(model, w, topk=-1) for w in windows]
    none = kld.compare(model, windows, refs)
    int8 = kld.compare(model, windows, refs, kv_cache="int8")
    assert none["kld_mean"] < 2e-5 and none["top1_agree"] == 1.0  # itself, up to the reference's float16
    assert 10 * none["kld_mean"] < int8["kld_mean"] < 1e-2
