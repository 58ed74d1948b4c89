"""Zero-shot accuracy through lm-evaluation-harness, on the model object qbench built.

The (quantized) model is handed to lm-eval's HFLM wrapper, so every number is lm-eval's own. Where a
task's data comes from is data, not code: conf/tasks/<task>.yaml names lm-eval's official task
definition (prompts, choices, metrics) and, once the data root holds a copy, its local files:

    task: piqa
    lm_eval_config: piqa/piqa.yaml     # inside lm_eval/tasks/
    local: {builder: json, data_files: {validation: piqa/validation.jsonl},   # under the data root
            fields: [goal, sol1, sol2, label]}                               # columns every row must have

A task with local files present runs the official definition with only its dataset location
changed (each file is checked for its columns first: a malformed file is a one-line ConfigError
naming the file and line, before any model loads); otherwise, with network, lm-eval's hub task runs
unchanged; otherwise it is a one-line ConfigError naming the expected files. Records get
`<metric>_<task>` and `<metric>_stderr_<task>` for lm-eval's metrics (acc, acc_norm; perplexity and
acc for LAMBADA) and `samples_<task>`. research/tasks_identity.py checks that these numbers equal
lm-eval's own simple_evaluate on the same model object and files.
This module imports neither torch nor lm-eval until a task is evaluated.
"""

import functools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from qbench import ConfigError
from qbench.paths import conf_dir, data_root

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass
class TaskSource:
    name: str
    where: str  # "local:<files>" or "hub"
    config: dict | str  # lm-eval task config dict (local) or the registered name (hub)


def tasks_dir() -> Path:
    """conf/tasks, or $QBENCH_TASKS_DIR (your own task -> local files definitions)."""
    return Path(os.environ.get("QBENCH_TASKS_DIR") or conf_dir() / "tasks")


def lm_eval_tasks_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("eval.tasks needs lm-eval (pip install 'qbench[eval]')")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def task_entry(name: str, where: Path | None = None) -> dict | None:
    path = (where or tasks_dir()) / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def local_files(entry: dict | None, data_dir: str | None) -> dict[str, Path] | None:
    """split -> file under the data root, when the entry lists local files and all of them exist
    (each checked for its columns: a malformed file is a ConfigError, not a fall-back to the hub)."""
    root = data_root(data_dir)
    if not entry or not entry.get("local") or root is None:
        return None
    files = {split: root / rel for split, rel in entry["local"]["data_files"].items()}
    if not all(p.is_file() for p in files.values()):
        return None
    for path in files.values():
        stat = path.stat()
        _check_rows(str(path), stat.st_size, stat.st_mtime_ns, tuple(entry["local"].get("fields") or ()), entry["task"])
    return files


@functools.cache
def _check_rows(path: str, size: int, mtime_ns: int, fields: tuple, task: str) -> None:
    """Every row of a JSONL task file is a JSON object with the task's columns (cached per file version)."""
    import json

    rows = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"task {task}: {path} line {n} is not valid JSON ({err.msg}); "
                                  f"expected one object per line with {', '.join(fields) or 'the task columns'}") from None
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise ConfigError(f"task {task}: {path} line {n} lacks {', '.join(missing)}; "
                                  f"expected one object per line with {', '.join(fields)}")
            rows += 1
    if rows == 0:
        raise ConfigError(f"task {task}: {path} holds no rows; expected one JSON object per line with {', '.join(fields)}")


def expected_files(entry: dict | None, data_dir: str | None) -> str:
    """The files a task entry wants, as paths under the data root (for error messages)."""
    if not entry or not entry.get("local"):
        return "none listed"
    root = data_root(data_dir)
    rels = entry["local"]["data_files"].values()
    return ", ".join(str(root / rel) if root else f"<data root>/{rel}" for rel in rels)


@functools.cache
def network_available(host: str = "huggingface.co") -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_ENV):
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


@functools.cache
def _lm_eval_task_names() -> frozenset:
    from lm_eval.tasks import TaskManager  # indexes every lm-eval task yaml (seconds)

    return frozenset(TaskManager().all_tasks)


def resolve_task(name: str, data_dir: str | None, where: Path | None = None) -> TaskSource:
    """Where a task's documents come from; ConfigError (one line) when nowhere. Torch-free."""
    entry = task_entry(name, where)
    files = local_files(entry, data_dir)
    if files is not None:
        from lm_eval.tasks._yaml_loader import load_yaml

        config = load_yaml(lm_eval_tasks_dir() / entry["lm_eval_config"], resolve_func=True)
        config.pop("tag", None)
        eval_split = config.get("test_split") or config.get("validation_split")
        if eval_split not in files:
            raise ConfigError(f"task {name}: conf/tasks/{name}.yaml lists no {eval_split!r} split, the one lm-eval evaluates")
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if config.get(key) not in files:  # zero-shot: splits without a local file are not needed
                config[key] = None
        config.update(task=name, dataset_path=entry["local"]["builder"], dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(p) for split, p in files.items()}})
        rel = ",".join(str(v) for v in entry["local"]["data_files"].values())
        return TaskSource(name, f"local:{rel}", config)
    online = network_available()
    if entry is None and (not online or name not in _lm_eval_task_names()):
        known = ", ".join(sorted(p.stem for p in (where or tasks_dir()).glob("*.yaml")))
        why = "not an lm-eval task" if online else "no conf/tasks entry, and other lm-eval tasks need network"
        raise ConfigError(f"unknown task {name!r} ({why}); qbench's task definitions: {known}")
    if not online:
        where = f"the data root {data_root(data_dir)}" if data_root(data_dir) else "no data root (set QBENCH_DATA_DIR or data_dir=)"
        raise ConfigError(f"task {name}: no local data under {where}; expected {expected_files(entry, data_dir)}, "
                          "and no network for the hub")
    return TaskSource(name, "hub", name)


@functools.cache
def _check_cached(names: tuple, data_dir: str | None) -> None:
    for name in names:
        resolve_task(name, data_dir)


def check_tasks(names, data_dir: str | None) -> None:
    """Config-time check of eval.tasks (cached per process, so a sweep checks once)."""
    _check_cached(tuple(str(n) for n in names), data_dir)


def task_sources(names, data_dir: str | None) -> dict[str, str]:
    """task -> where its documents come from, for the record's eval key."""
    return {str(n): resolve_task(str(n), data_dir).where for n in names}


def to_metrics(results: dict) -> dict:
    """lm-eval's results dict -> flat record metrics: acc_piqa, acc_stderr_piqa, ..."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or not isinstance(value, (int, float)):
                continue
            metrics[f"{metric}_{task}"] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        if n:
            metrics[f"samples_{task}"] = int(n.get("effective", n.get("original", 0)))
    return metrics


def run_lm_eval(model, tokenizer, sources: list[TaskSource], limit=None, batch_size: int = 16,
                bootstrap_iters: int = 100000, device: str | None = None) -> dict:
    """lm-eval's simple_evaluate on a built model object; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    hub = any(s.where == "hub" for s in sources)
    return simple_evaluate(model=lm, tasks=[s.config for s in sources], limit=limit, log_samples=False,
                           bootstrap_iters=bootstrap_iters, task_manager=TaskManager(include_defaults=hub))


def evaluate_tasks(model, tokenizer, cfg, ctx) -> dict:
    names = [str(n) for n in cfg.eval.tasks]
    if not names:
        return {}
    sources = [resolve_task(n, cfg.data_dir) for n in names]
    start = time.perf_counter()
    results = run_lm_eval(model, tokenizer, sources, cfg.eval.limit, int(cfg.eval.tasks_batch_size),
                          int(cfg.eval.tasks_bootstrap_iters), ctx.device)
    # wall time of all tasks together (lm-eval batches requests across tasks, so there is no per-task split)
    return {**to_metrics(results), "tasks_s": time.perf_counter() - start}
