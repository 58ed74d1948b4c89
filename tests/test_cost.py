"""$ per 1M generated tokens and the smallest listed GPU that holds a model plus its KV cache."""

from types import SimpleNamespace

import pytest
import torch

from qbench import cost

GIB = 2**30


def test_hardware_entries_are_complete():
    hw = {h["name"]: h for h in cost.hardware_list()}
    assert {"h100", "h200", "a100", "l4", "rtx4090"} <= set(hw)
    for h in hw.values():
        assert h["memory_gib"] > 0 and h["usd_per_hour"] > 0


def test_smallest_fit_and_price():
    hw = [{"name": "big", "memory_gib": 80, "usd_per_hour": 2.0}, {"name": "small", "memory_gib": 24, "usd_per_hour": 0.7},
          {"name": "small-cheap", "memory_gib": 24, "usd_per_hour": 0.5}]
    assert cost.smallest_fit(10 * GIB, hw)["name"] == "small-cheap"
    assert cost.smallest_fit(24 * GIB + 1, hw)["name"] == "big"
    assert cost.smallest_fit(81 * GIB, hw) is None
    assert cost.usd_per_mtok(3.6, 1000.0) == pytest.approx(1.0)  # 3.6 M tokens per hour for $3.60


def test_cost_metrics_price_only_gpu_throughput(cfg_factory):
    config = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=30, hidden_size=576)
    model = SimpleNamespace(config=config)
    metrics = {"model_bytes": 20 * GIB, "tok_s_b1": 100.0, "tok_s_b32": 2000.0}
    cfg = cfg_factory("hardware=h100", "eval.cost_context=8192")
    gpu = cost.cost_metrics(metrics, model, cfg, "cuda", torch.float16)
    assert gpu["fits_gpu"] in ("l4", "rtx4090") and gpu["cost_context"] == 8192 and gpu["cost_hardware"] == "h100"
    assert gpu["usd_per_mtok_b1"] == pytest.approx(2.49 / (100 * 3600) * 1e6)
    assert gpu["usd_per_mtok_b32"] == pytest.approx(2.49 / (2000 * 3600) * 1e6)
    cpu = cost.cost_metrics(metrics, model, cfg, "cpu", torch.float32)
    assert not any(k.startswith("usd_per_mtok") for k in cpu)
    assert cpu["serve_gib"] == pytest.approx(20 + 2 * 30 * 3 * 64 * 8192 * 4 / GIB)
    int8_cache = cost.cost_metrics(dict(metrics, kv_cache="int8"), model, cfg, "cuda", torch.float16)
    assert int8_cache["serve_gib"] == pytest.approx(20 + 2 * 30 * 3 * 8192 * (64 + 2) / GIB)  # codes + a scale per vector
