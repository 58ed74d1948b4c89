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
    assert speed.PeakMemory(smollm2.model, "cpu").metrics() == {}


def test_static_cache_decode_matches_eager_generation(smollm2):
    """The decode that speed times as a CUDA graph on a GPU (static KV cache, rewound for each repeat),
    run here without the capture, generates the eager greedy tokens."""
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
    ms, tokens = speed.static_decode(smollm2.model, prompt, 5, 2, "cpu")
    _, eager = speed.generate_timed(smollm2.model, prompt, 6, "cpu")
    assert ms > 0 and tokens.shape == (1, 6) and torch.equal(tokens, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_speed_and_peak_memory(smollm2, cfg_factory):
    import copy

    model = copy.deepcopy(smollm2.model).half().cuda()
    cfg = cfg_factory("eval.speed=true", "eval.speed_opts.batch_sizes=[1,8]", "eval.speed_opts.repeats=2")
    memory = speed.PeakMemory(model, "cuda")
    metrics = speed.measure_speed(model, cfg, "cuda")
    peak = memory.metrics()
    assert metrics["speed_device"] == "cuda" and metrics["tok_s_b8"] > metrics["tok_s_b1"] > 0
    assert "decode_graph_error" not in metrics and metrics["decode_ms_per_token_graph"] > 0
    prompt = torch.randint(0, 1000, (1, 8), device="cuda")
    _, graph_tokens = speed.static_decode(model, prompt, 6, 1, "cuda")  # the CUDA graph decodes what eager does
    _, eager_tokens = speed.generate_timed(model, prompt, 7, "cuda")
    assert torch.equal(graph_tokens[:, :4], eager_tokens[:, :4])
    assert peak["vram_peak_reserved_gib"] >= peak["vram_peak_allocated_gib"] >= peak["vram_peak_run_gib"] > 0
