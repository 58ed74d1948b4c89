"""What serving a model costs: $ per 1M generated tokens, and the smallest GPU it fits on.

The GPUs are data: conf/hardware/<name>.yaml holds `name`, `memory_gib` and `usd_per_hour`; the run's
`hardware=` entry prices the throughput measured by eval.speed (GPU runs only: a CPU's throughput
priced at a GPU's rate would mean nothing):
    usd_per_mtok_b<B> = usd_per_hour / (tok_s_b<B> * 3600) * 1e6
`fits_gpu` is the listed GPU with the least memory (the cheaper one on a tie) that holds the model as
stored (`model_bytes`: every parameter and buffer in the run's dtype) plus its KV cache for one
sequence of eval.cost_context tokens in the run's cache format (qbench.kvcache.kv_bytes: 2 x layers x
kv_heads x context x head_dim elements of the run's dtype, or 1-byte codes plus a 2-byte scale per
vector for kv_cache=int8|fp8), with no other allowance: activations and the framework's workspace
come on top.
"""

import yaml

from qbench.paths import conf_dir

GIB = 2.0**30


def hardware_list() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((conf_dir() / "hardware").glob("*.yaml"))]


def smallest_fit(need_bytes: int, hardware: list[dict]) -> dict | None:
    fits = [h for h in hardware if h["memory_gib"] * GIB >= need_bytes]
    return min(fits, key=lambda h: (h["memory_gib"], h["usd_per_hour"]), default=None)


def usd_per_mtok(usd_per_hour: float, tokens_per_s: float) -> float:
    return usd_per_hour / (tokens_per_s * 3600) * 1e6


def cost_metrics(metrics: dict, model, cfg, device: str, dtype) -> dict:
    from qbench.kvcache import kv_bytes

    context = int(cfg.eval.cost_context)
    need = int(metrics["model_bytes"]) + kv_bytes(model.config, metrics.get("kv_cache", "none"), context, 1, dtype)
    fit = smallest_fit(need, hardware_list())
    out = {"serve_gib": need / GIB, "cost_context": context, "fits_gpu": fit["name"] if fit else None}
    if device == "cuda":
        out["cost_hardware"] = str(cfg.hardware.name)
        for key, value in list(metrics.items()):
            if key.startswith("tok_s_b") and value:
                out[f"usd_per_mtok_b{key[len('tok_s_b'):]}"] = usd_per_mtok(float(cfg.hardware.usd_per_hour), value)
    return out
