"""One run: config in, one result record out.

    validate -> (resume=true: skip it if results_dir has its `ok` record) -> load model (cached per
    process) -> make sure the baseline is recorded -> quantize (method from the registry) -> export
    -> evaluate -> append the record
A small model is quantized as a copy, so the runs of a multirun share one load. A shape model, or any
model over KEEP_COPY_MAX_BYTES, is quantized in place, layer by layer, with no second full-precision
copy: the process forgets it first, and the next run loads (or builds) it again. The quantization's
peak GPU memory is recorded as `vram_quantize_peak_gib` (None on a CPU).
A run that raises (bad data, NaN loss, out of memory) is recorded as `failed` with its reason, so a
sweep goes on and no other run's record is lost; one cut short by Ctrl-C is recorded as `interrupted`
and the KeyboardInterrupt goes on up (the command exits 130).
Runs of a parallel sweep (other processes or nodes, one results dir) measure each eval key's baseline
once: whoever needs it first measures it under that key's lock while the others wait.
"""

import contextlib
import copy
import hashlib
import gc
import json
import time
import traceback
import uuid

from omegaconf import DictConfig, OmegaConf, open_dict

from qbench import config as qconfig
from qbench.records import append_record, environment, is_baseline, locked, now, read_records, records_path

_MODELS: dict = {}  # (model, device, dtype) -> LoadedModel, the unquantized model of this process
_CACHE: dict = {}  # RunContext.cache shared by the runs of this process (calibration captures); follows _MODELS
KEEP_COPY_MAX_BYTES = 2 * 2**30  # larger models are quantized in place: a copy would double their memory


def _loaded(cfg: DictConfig):
    from qbench.models import load_model

    key = (str(cfg.model), cfg.device, cfg.dtype, bool(cfg.trust_remote_code))
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time
        _CACHE.clear()
        gc.collect()  # the previous model's memory is free before the next one is allocated
        _MODELS[key] = load_model(str(cfg.model), cfg.device, cfg.dtype, bool(cfg.trust_remote_code))
    return _MODELS[key]


def eval_key(cfg: DictConfig, device: str, dtype) -> dict:
    """Everything that changes a metric besides the quantization: records compare only within one key."""
    from qbench.data import perplexity_source

    ppl = cfg.eval.ppl
    key = {
        "model": str(cfg.model),
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "ppl_datasets": list(ppl.datasets),
        "ppl_seqlen": int(ppl.seqlen),
        "ppl_max_windows": ppl.max_windows,
        "data": {name: perplexity_source(name, cfg.data_dir) for name in ppl.datasets},
        **_extra_eval_key(cfg),
        **_synthetic_key(cfg),
    }
    return json.loads(json.dumps(key, default=str))  # as the record stores it, so lookups compare equal


def _synthetic_key(cfg: DictConfig) -> dict:
    """A shape model's weights are a function of its shape file: name, seed and digest tell them apart."""
    from qbench.models import is_synthetic, resolve_source
    from qbench.shapes import identity

    if not is_synthetic(str(cfg.model)):
        return {}
    return {"synthetic_weights": identity(resolve_source(str(cfg.model)).path)}


def _extra_eval_key(cfg: DictConfig) -> dict:
    """Settings of the optional metrics, only when they are on (older keys stay unchanged)."""
    ev, key = cfg.eval, {}
    if ev.get("tasks"):
        from qbench.eval.tasks import task_sources

        key.update(tasks=[str(t) for t in ev.tasks], tasks_limit=ev.limit, tasks_data=task_sources(ev.tasks, cfg.data_dir))
    if ev.get("kld"):
        key["kld"] = {"topk": int(ev.kld_topk), "windows": ev.kld_windows}
    if ev.get("speed"):
        key["speed"] = OmegaConf.to_container(ev.speed_opts, resolve=True)
    return key


def _base_record(cfg: DictConfig) -> dict:
    from qbench.models import is_synthetic
    from qbench.packaged_models import stored_as

    synthetic = {"synthetic_weights": True} if is_synthetic(str(cfg.model)) else {}  # accuracy is a sanity value
    stored = stored_as(str(cfg.model))  # a registered model's baseline is its stored weights dequantized
    return {
        "run_id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}",
        "status": None,
        "error": None,
        "model": str(cfg.model),
        "method": cfg.method.name,
        "bits": qconfig.resolved_bits(cfg),
        "group_size": qconfig.resolved_group_size(cfg),
        "calib": cfg.calib.name if qconfig.needs_calibration(cfg) else None,
        "metrics": {},
        "timings": {},
        "quant_info": {},
        "started_at": now(),
        "config": qconfig.to_plain(cfg),
        **synthetic,
        **({"weights_stored_as": stored} if stored else {}),
    }


def baseline_lock(key: dict) -> str:
    """The name of the lock that workers needing the baseline of eval key `key` take turns on."""
    return "baseline-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def find_baseline(results_dir: str, key: dict) -> dict | None:
    for rec in reversed(read_records(records_path(results_dir))):
        if is_baseline(rec) and rec.get("status") == "ok" and rec.get("eval_key") == key:
            return rec
    return None


# Config keys that say where results go and how a run is shown, not what it measures.
NOT_IDENTITY = ("results_dir", "resume", "quiet", "wandb")


def run_identity(config: dict, bits, group_size) -> dict:
    """What decides a run's numbers: its config with bits and group size resolved, NOT_IDENTITY left out
    (and kv_cache=none and export.format=native, so that records from before those options still match)."""
    ident = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if (ident.get("kv_cache") or {}).get("name", "none") == "none":
        ident.pop("kv_cache", None)
    if (ident.get("export") or {}).get("format") == "native":  # records from before export.format still match
        ident["export"] = {k: v for k, v in ident["export"].items() if k != "format"}
    ident.update(bits=bits, group_size=group_size)
    return ident


def find_done(results_dir: str, record: dict) -> dict | None:
    """The last `ok` record in results_dir of the run `record` is about to make (for resume=true)."""
    want = run_identity(record["config"], record["bits"], record["group_size"])
    for rec in reversed(read_records(records_path(results_dir))):
        if rec.get("status") == "ok" and "config" in rec and \
                run_identity(rec["config"], rec.get("bits"), rec.get("group_size")) == want:
            return rec
    return None


def evaluate(model, tokenizer, cfg: DictConfig, ctx) -> dict:
    from qbench.data import perplexity_text
    from qbench.eval.perplexity import perplexity, tokenize

    from qbench.cost import cost_metrics
    from qbench.eval import speed

    metrics = {}
    memory = speed.PeakMemory(model, ctx.device)
    ppl = cfg.eval.ppl
    who = progress_label(cfg)
    kv = kv_metrics(model.config, cfg, ctx.dtype)
    started = time.perf_counter()
    for name in ppl.datasets:
        ids = tokenize(tokenizer, perplexity_text(name, cfg.data_dir), key=f"{name}:{cfg.data_dir}")
        bar = _titled(ctx, f"{who}: ppl {name}")
        result = perplexity(model, ids, int(ppl.seqlen), ppl.max_windows, int(ppl.batch_size), bar,
                            kv_cache=kv["kv_cache"], chunk=kv.get("kv_ppl_chunk"))
        for field, value in result.items():
            metrics[f"{field}_{name}"] = value
    metrics["eval_ppl_s"] = time.perf_counter() - started  # where eval time goes: eval_ppl_s, tasks_s, eval_kld_s, eval_speed_s
    metrics.update(kv)
    if cfg.eval.get("tasks"):
        from qbench.eval.tasks import evaluate_tasks

        metrics.update(evaluate_tasks(model, tokenizer, cfg, ctx))
    if cfg.eval.get("kld"):
        from qbench.eval.kld import kld_metrics

        started = time.perf_counter()
        metrics.update(kld_metrics(model, tokenizer, cfg, _labelled(ctx, who), base_model=lambda: _loaded(cfg).model))
        metrics["eval_kld_s"] = time.perf_counter() - started
    metrics.update(speed.weight_stats(model, bool(cfg.quantize_lm_head)))
    if cfg.eval.get("speed"):
        started = time.perf_counter()
        metrics.update(speed.measure_speed(model, cfg, ctx.device, kv["kv_cache"]))
        metrics["eval_speed_s"] = time.perf_counter() - started
    metrics.update(memory.metrics())
    metrics.update(cost_metrics(metrics, model, cfg, ctx.device, ctx.dtype))
    return metrics


def kv_metrics(config, cfg: DictConfig, dtype) -> dict:
    """The KV cache's format (qbench.kvcache kind), its bytes at 8192 tokens of batch 1 for this model,
    and the perplexity chunk (tokens per forward through the quantized cache) where it is quantized."""
    from qbench.kvcache import cache_kind, kv_bytes

    kind = cache_kind(cfg.get("kv_cache"))
    out = {"kv_cache": kind, "kv_bytes_8k": kv_bytes(config, kind, 8192, 1, dtype)}
    if kind != "none":
        out["kv_ppl_chunk"] = int(cfg.kv_cache.get("chunk") or cfg.eval.ppl.seqlen)
    return out


def progress_label(cfg: DictConfig) -> str:
    """Which model a progress bar is about: "fp16 baseline" or the quantized one, "rtn w4 g128"."""
    kind = (cfg.get("kv_cache") or {}).get("name", "none")
    kv = [] if kind == "none" else [f"kv {kind}"]
    if cfg.method.name == "fp16":
        return " ".join(["fp16"] + kv) if kv else "fp16 baseline"
    bits, gs = qconfig.resolved_bits(cfg), qconfig.resolved_group_size(cfg)
    return " ".join([cfg.method.name] + ([f"w{bits}"] if bits is not None else []) + ([f"g{gs}"] if gs is not None else [])
                    + kv)


def _titled(ctx, title: str):
    """A progress function that shows `title` whatever the caller names its bar."""
    return lambda iterable, desc, total=None: ctx.progress(iterable, title, total)


def _labelled(ctx, who: str):
    """A copy of ctx whose progress bars name the model first ("rtn w4 g128: kld")."""
    labelled = copy.copy(ctx)
    labelled.progress = lambda iterable, desc, total=None: ctx.progress(iterable, f"{who}: {desc}", total)
    return labelled


def _finish(cfg: DictConfig, record: dict, status: str, error: str | None = None) -> dict:
    record["status"], record["error"], record["finished_at"] = status, error, now()
    if status not in ("skipped", "interrupted"):  # W&B is not waited for after a Ctrl-C
        from qbench.wandb_log import log_run

        try:
            log_run(cfg, record)
        except Exception as err:  # logging must never cost the record
            record["wandb_error"] = f"{type(err).__name__}: {err}"
    append_record(cfg.results_dir, record)
    return record


def run(cfg: DictConfig, sweep_id: str | None = None) -> dict:
    """Run one config and return its record (already appended to runs.jsonl)."""
    import torch

    from qbench.methods import RunContext, get_method

    record = _base_record(cfg)
    record["sweep_id"] = sweep_id
    reason = qconfig.skip_reason(cfg)
    if reason:
        return _finish(cfg, record, "skipped", reason)
    done = find_done(cfg.results_dir, record) if cfg.get("resume") else None
    if done is not None:
        record["done_run_id"] = done["run_id"]  # the multirun's resume summary names these
        return _finish(cfg, record, "skipped", f"already recorded as run {done['run_id']} (resume=true)")
    held = contextlib.ExitStack()  # the baseline lock, while this run holds it
    try:
        torch.manual_seed(int(cfg.seed))
        t0 = time.perf_counter()
        loaded = _loaded(cfg)
        record["timings"]["load_s"] = time.perf_counter() - t0
        record["env"] = environment(loaded.device)
        key = eval_key(cfg, loaded.device, loaded.dtype)
        record["eval_key"] = key
        ctx = RunContext(loaded.tokenizer, loaded.device, loaded.dtype, cfg.data_dir, bool(cfg.quiet), cache=_CACHE)
        held.enter_context(locked(cfg.results_dir, baseline_lock(key)))  # the records are read again under it
        baseline = find_baseline(cfg.results_dir, key)
        is_base = is_baseline(record)  # fp16 with kv_cache=int8 is measured against the baseline, like a method
        if is_base and baseline is not None:
            return _finish(cfg, record, "skipped", f"baseline already recorded as run {baseline['run_id']}")
        if not is_base:
            if baseline is None:
                _record_baseline(cfg, loaded, key, ctx, sweep_id)
            held.close()  # an fp16 run is the baseline: it keeps the lock until its record is written
        method = get_method(cfg.method.name)
        in_place = cfg.method.name != "fp16" and quantizes_in_place(loaded)
        if in_place:
            _MODELS.clear()  # it is about to be quantized: the next run loads it again
            record["quantized_in_place"] = True
        model = loaded.model if cfg.method.name == "fp16" or in_place else copy.deepcopy(loaded.model)
        from qbench.eval.speed import PeakMemory  # torch is imported only once a run starts
        from qbench.quant.blocks import synchronize

        quantize_peak = PeakMemory(model, loaded.device)
        if cfg.export.path and _export_format(cfg) == "compressed-tensors":  # shapes the format refuses: before the work
            from qbench.quant.ct_export import check_linears

            check_linears(model, cfg)
        t0 = time.perf_counter()
        record["quant_info"] = method.quantize(model, cfg, ctx) or {}
        synchronize(loaded.device)
        record["timings"]["quantize_s"] = time.perf_counter() - t0
        quantize_memory = {"vram_quantize_peak_gib": quantize_peak.metrics().get("vram_peak_allocated_gib")}
        if cfg.export.path:
            _export(method, model, cfg, ctx)
            record["export_path"], record["export_format"] = str(cfg.export.path), _export_format(cfg)
        t0 = time.perf_counter()
        record["metrics"] = {**quantize_memory, **evaluate(model, loaded.tokenizer, cfg, ctx)}
        record["timings"]["eval_s"] = time.perf_counter() - t0
        if hasattr(method, "after_eval"):  # info known only after evaluation (LLM.int8() outlier counts)
            record["quant_info"].update(method.after_eval(model, cfg, ctx) or {})
        del model
        return _finish(cfg, record, "ok")
    except Exception as err:  # recorded, never lost: the sweep goes on
        record["traceback"] = traceback.format_exc(limit=8)
        return _finish(cfg, record, "failed", f"{type(err).__name__}: {err}")
    except KeyboardInterrupt:  # Ctrl-C: recorded, then qbench ends with exit code 130
        _finish(cfg, record, "interrupted", "KeyboardInterrupt: interrupted (Ctrl-C)")
        raise
    finally:
        held.close()


def _export_format(cfg: DictConfig) -> str:
    return cfg.export.get("format", "native")


def _export(method, model, cfg: DictConfig, ctx) -> None:
    """Write the quantized model to export.path: the method's own format, or compressed-tensors."""
    path = str(cfg.export.path)
    if _export_format(cfg) == "compressed-tensors":
        from qbench.quant.ct_export import save_compressed_tensors

        act_order = cfg.method.name == "gptq" and bool(cfg.method.act_order)
        save_compressed_tensors(model, ctx.tokenizer, path, cfg.method.name, act_order)
        return
    if not hasattr(method, "export"):
        raise ValueError(f"method {cfg.method.name} has no export format")
    method.export(model, cfg, ctx, path)


def _record_baseline(cfg: DictConfig, loaded, key: dict, ctx, sweep_id) -> dict:
    """Evaluate the unquantized model once for this eval key and record it."""
    base_cfg = copy.deepcopy(cfg)
    with open_dict(base_cfg):
        base_cfg.method = {"name": "fp16", "bits_choices": [], "default_bits": None, "group_sizes": "none",
                           "default_group_size": None, "choices": {}}
        base_cfg.bits, base_cfg.group_size = None, None
        base_cfg.kv_cache = {"name": "none", "choices": {}}
    record = _base_record(base_cfg)
    record.update(sweep_id=sweep_id, eval_key=key, env=environment(loaded.device), role="baseline")
    t0 = time.perf_counter()
    record["metrics"] = evaluate(loaded.model, loaded.tokenizer, base_cfg, ctx)
    record["timings"] = {"load_s": 0.0, "quantize_s": 0.0, "eval_s": time.perf_counter() - t0}
    return _finish(base_cfg, record, "ok")


def quantizes_in_place(loaded) -> bool:
    """A shape model (rebuilt in seconds, there to measure large models) or a model whose copy would cost
    more than KEEP_COPY_MAX_BYTES is quantized in place; a small one as a copy, kept for the next run."""
    if loaded.source.kind == "shape":
        return True
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters()) > KEEP_COPY_MAX_BYTES


