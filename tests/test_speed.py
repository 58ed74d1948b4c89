"""Weight storage and bits per weight of quantized modules; greedy KV-cache generation used for timing."""

import pytest
import torch
from torch import nn

from qbench.eval import speed
from qbench.quant.grid import rtn_quantize
from qbench.quant.qlinear import QuantLinear


class Tiny(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, -1), (8, 32)])
def test_bits_per_weight_counts_scales_zeros_and_indices(bits, group_size):
    torch.manual_seed(0)
    k, n = 256, 96
    qw = rtn_quantize(torch.randn(n, k), bits, group_size, sym=False)
    model = Tiny([QuantLinear.from_quantized(qw, torch.zeros(n))])
    groups = 1 if group_size == -1 else k // group_size
    expected_bytes = (k * bits // 32 * 4 * n) + groups * (n * bits // 32 * 4) + groups * n * 2 + k * 4  # qweight qzeros scales g_idx
    stats = speed.weight_stats(model)
    assert stats["linear_weight_bytes"] == expected_bytes and stats["linear_weights"] == k * n
    assert stats["bits_per_weight"] == pytest.approx(8 * expected_bytes / (k * n))
    assert stats["model_bytes"] == expected_bytes + n * 4  # + the float32 bias
    if group_size == 128:  # the usual GPTQ figure: 4 + (16-bit scale + 4-bit zero) / 128 + 32-bit g_idx / n
        assert stats["bits_per_weight"] == pytest.approx(4 + 20 / 128 + 32 / n)


def test_unquantized_model_counts_its_dtype_and_skips_lm_head(smollm2):
    stats = speed.weight_stats(smollm2.model)
    assert stats["bits_per_weight"] == 32  # float32 on the CPU
    linears = speed.quantized_modules(smollm2.model, include_lm_head=False)
    assert "lm_head" not in linears and len(linears) == 30 * 7
    assert stats["linear_weights"] == sum(m.weight.numel() for m in linears.values())
    # tied embedding and lm_head are stored once
    buffers = sum(b.numel() * b.element_size() for b in smollm2.model.buffers())  # rotary inv_freq
    assert stats["model_bytes"] == 4 * sum(p.numel() for p in smollm2.model.parameters()) + buffers


def test_generation_is_greedy_with_kv_cache(smollm2):
    prompt = torch.randint(0, smollm2.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    times, tokens = speed.generate_timed(smollm2.model, prompt, 4, "cpu")
    ref = smollm2.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=4,
                                 min_new_tokens=4, pad_token_id=0)
    assert torch.equal(tokens, ref[:, 6:])
    assert len(times) == 4 and all(t > 0 for t in times)  # prefill + 3 decode steps


def test_cpu_speed_is_tiny_and_labelled(smollm2, cfg_factory):
    cfg = cfg_factory("eval.speed=true", "eval.speed_opts.prefill_tokens=2048", "eval.speed_opts.new_tokens=3",
                      "eval.speed_opts.prompt_tokens=4", "eval.speed_opts.repeats=1")
    metrics = speed.measure_speed(smollm2.model, cfg, "cpu")
    assert metrics["speed_device"] == "cpu" and metrics["speed_prefill_tokens"] == speed.CPU_CAPS["prefill_tokens"]
    assert set(metrics) >= {"prefill_ms", "decode_ms_per_token", "tok_s_b1"} and "tok_s_b8" not in metrics
    assert metrics["prefill_ms"] > 0 and metrics["decode_ms_per_token"] > 0 and metrics["tok_s_b1"] > 0
    assert metrics["speed_path"] == "static_cache"  # the served path's code, minus the CUDA graph capture
    assert metrics["eager_tok_s_b1"] > 0 and metrics["eager_decode_ms_per_token"] > 0
    assert metrics["prefill_ms_64"] == metrics["prefill_ms"] and "copy_gbs" not in metrics
    assert speed.PeakMemory(smollm2.model, "cpu").metrics() == {}


def test_static_cache_decode_matches_eager_generation(smollm2):
    """The decode that speed times as a CUDA graph on a GPU (static KV cache, rewound for each repeat),
    run here without the capture, generates the eager greedy tokens."""
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
    ms, tokens = speed.static_decode(smollm2.model, prompt, 5, 2, "cpu")
    _, eager = speed.generate_timed(smollm2.model, prompt, 6, "cpu")
    assert ms > 0 and tokens.shape == (1, 6) and torch.equal(tokens, eager)


def test_static_generate_batches_and_matches_eager_generation(smollm2):
    """The served path at batch 2: prefill then decode on a static cache, timed as prefill + decode."""
    prompt = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(5))
    total, step, tokens = speed.static_generate(smollm2.model, prompt, 4, 2, "cpu")
    _, eager = speed.generate_timed(smollm2.model, prompt, 5, "cpu")
    assert tokens.shape == (2, 5) and torch.equal(tokens, eager)
    assert total > 4 * step > 0  # the total holds the prefill and the four decode steps


def test_timed_repeats_stop_once_stable():
    stable = iter([10.0, 10.1, 10.05, 50.0, 50.0])
    assert speed.timed_repeats(lambda: next(stable), 5) == [10.0, 10.1, 10.05]
    noisy = iter([10.0, 20.0, 30.0, 40.0])
    assert speed.timed_repeats(lambda: next(noisy), 4) == [10.0, 20.0, 30.0, 40.0]  # never stable: all repeats
    assert speed.timed_repeats(lambda: 1.0, 2) == [1.0, 1.0]  # fewer repeats than the stability window


def test_speed_falls_back_to_eager_when_the_served_path_fails(smollm2, cfg_factory, monkeypatch):
    def cannot_capture(*args, **kwargs):
        raise RuntimeError("capture failed\nsecond line")

    monkeypatch.setattr(speed, "static_generate", cannot_capture)
    cfg = cfg_factory("eval.speed=true", "eval.speed_opts.new_tokens=3", "eval.speed_opts.prompt_tokens=4",
                      "eval.speed_opts.repeats=1")
    metrics = speed.measure_speed(smollm2.model, cfg, "cpu")
    assert metrics["speed_path"] == "eager" and metrics["decode_graph_error"] == "RuntimeError: capture failed"
    assert metrics["tok_s_b1"] == metrics["eager_tok_s_b1"] > 0
    assert metrics["decode_ms_per_token"] == metrics["eager_decode_ms_per_token"] > 0


def test_decode_bytes_leave_out_an_untied_input_embedding(smollm2):
    model = smollm2.model
    total = speed.weight_stats(model)["model_bytes"]
    assert speed.decode_bytes_per_token(model) == total  # SmolLM2 ties lm_head to the embedding: it is read
    untied = nn.Module()
    untied.embed, untied.head = nn.Embedding(100, 8), nn.Linear(8, 100, bias=False)
    untied.get_input_embeddings = lambda: untied.embed
    untied.get_output_embeddings = lambda: untied.head
    assert speed.decode_bytes_per_token(untied) == 100 * 8 * 4  # the head only, float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_speed_and_peak_memory(smollm2, cfg_factory):
    import copy

    model = copy.deepcopy(smollm2.model).half().cuda()
    cfg = cfg_factory("eval.speed=true", "eval.speed_opts.batch_sizes=[1,8]", "eval.speed_opts.repeats=2")
    memory = speed.PeakMemory(model, "cuda")
    metrics = speed.measure_speed(model, cfg, "cuda")
    peak = memory.metrics()
    assert metrics["speed_device"] == "cuda" and metrics["tok_s_b8"] > metrics["tok_s_b1"] > 0
    assert "decode_graph_error" not in metrics and metrics["speed_path"] == "cuda_graph"
    assert metrics["eager_decode_ms_per_token"] > metrics["decode_ms_per_token"] > 0  # no Python loop in a replay
    assert metrics["copy_gbs"] > 0 and 0 < metrics["decode_bandwidth_fraction"]
    prompt = torch.randint(0, 1000, (1, 8), device="cuda")
    _, graph_tokens = speed.static_decode(model, prompt, 6, 1, "cuda")  # the CUDA graph decodes what eager does
    _, eager_tokens = speed.generate_timed(model, prompt, 7, "cuda")
    assert torch.equal(graph_tokens[:, :4], eager_tokens[:, :4])
    assert peak["vram_peak_reserved_gib"] >= peak["vram_peak_allocated_gib"] >= peak["vram_peak_run_gib"] > 0


@pytest.mark.slow
def test_compiled_static_step_generates_the_eager_tokens(smollm2):
    """eval.speed_opts.compile: the decode step's forward through torch.compile (on the CPU, inductor's
    C++ backend) still generates the eager greedy tokens."""
    prompt = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(7))
    _, step, tokens = speed.static_generate(smollm2.model, prompt, 3, 1, "cpu", compile_step=True)
    _, eager = speed.generate_timed(smollm2.model, prompt, 4, "cpu")
    assert step > 0 and torch.equal(tokens, eager)


def test_speed_of_a_quantized_kv_cache_runs_through_that_cache(smollm2, cfg_factory, monkeypatch):
    from qbench import kvcache

    made = []
    for name in ("make_static_cache", "make_dynamic_cache"):
        real = getattr(kvcache, name)
        monkeypatch.setattr(kvcache, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    cfg = cfg_factory("eval.speed=true", "eval.speed_opts.new_tokens=3", "eval.speed_opts.prompt_tokens=4",
                      "eval.speed_opts.repeats=1")
    metrics = speed.measure_speed(smollm2.model, cfg, "cpu", "int8")
    assert metrics["speed_path"] == "static_cache" and "decode_graph_error" not in metrics
    assert metrics["tok_s_b1"] > 0 and metrics["eager_tok_s_b1"] > 0
    assert "make_static_cache" in made and made.count("make_dynamic_cache") == 2  # eager warm-up + one repeat
