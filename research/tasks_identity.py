"""Identity check: qbench's zero-shot numbers vs lm-eval's own run on the same model object and files.

qbench resolves each task from conf/tasks (lm-eval's official YAML with the dataset swapped for the
local file) and runs lm-eval on the model it built. This check builds lm-eval's side independently:
a task YAML that `include`s the official one and overrides only the dataset location, registered
through lm-eval's own TaskManager, evaluated by `simple_evaluate` on a second HFLM wrapper of the same
model object. Every number must be equal to the last digit.

    python research/tasks_identity.py --device cuda --dtype float16 --limit 0 --out reports/zero-shot-identity.json
(--limit 0 = full splits; the CI test runs it on 20 items per task on the CPU.)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ALL_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq", "lambada_openai")


def own_task_yamls(names, data_dir: str, folder: Path) -> list[str]:
    """lm-eval task YAMLs `own_<task>`: the official definition, only the dataset location overridden."""
    from qbench.eval.tasks import lm_eval_tasks_dir, task_entry

    out = []
    for name in names:
        entry = task_entry(name)
        (split, rel), = entry["local"]["data_files"].items()
        spec = {"include": str(lm_eval_tasks_dir() / entry["lm_eval_config"]), "task": f"own_{name}",
                "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(Path(data_dir) / rel)}}}
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            spec[key] = split if key.startswith(split) else None
        (folder / f"own_{name}.yaml").write_text(yaml.safe_dump(spec))
        out.append(f"own_{name}")
    return out


def compare(model, tokenizer, names, data_dir: str, limit=None, batch_size: int = 16, device: str = "cpu",
            bootstrap_iters: int = 1000) -> dict:
    """Run both sides; returns {task: {metric: (qbench, lm_eval)}}, timings and whether all are equal."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qbench.eval import tasks as qtasks

    t0 = time.perf_counter()
    sources = [qtasks.resolve_task(n, data_dir) for n in names]
    ours = qtasks.to_metrics(qtasks.run_lm_eval(model, tokenizer, sources, limit, batch_size, bootstrap_iters, device))
    t_ours = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        own = own_task_yamls(names, data_dir, Path(tmp))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        t0 = time.perf_counter()
        theirs = simple_evaluate(model=lm, tasks=own, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False,
                                 task_manager=TaskManager(include_path=tmp, include_defaults=False))
        t_theirs = time.perf_counter() - t0
    theirs = qtasks.to_metrics({"results": {k[len("own_"):]: v for k, v in theirs["results"].items()},
                                "n-samples": {k[len("own_"):]: v for k, v in theirs.get("n-samples", {}).items()}})
    table = {n: {k[: -len(n) - 1]: (ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs))
                 if k.endswith(f"_{n}")} for n in names}
    equal = all(a == b for metrics in table.values() for a, b in metrics.values())
    return {"tasks": table, "equal": equal, "seconds": {"qbench": t_ours, "lm_eval": t_theirs}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tasks", default=",".join(ALL_TASKS))
    parser.add_argument("--limit", type=int, default=20, help="items per task; 0 = the full split")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap-iters", type=int, default=100000)
    parser.add_argument("--data-dir", default=None, help="default: $QBENCH_DATA_DIR")
    parser.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = parser.parse_args(argv)

    from qbench.models import load_model
    from qbench.paths import data_root
    from qbench.records import environment

    data_dir = str(data_root(args.data_dir))
    loaded = load_model(args.model, args.device, args.dtype)
    names = args.tasks.split(",")
    result = compare(loaded.model, loaded.tokenizer, names, data_dir, args.limit or None, args.batch_size,
                     loaded.device, args.bootstrap_iters)
    result.update(model=args.model, dtype=args.dtype, limit=args.limit or None, batch_size=args.batch_size,
                  bootstrap_iters=args.bootstrap_iters, env=environment(loaded.device))
    for name, metrics in result["tasks"].items():
        for metric, (a, b) in metrics.items():
            print(f"{name:15s} {metric:18s} qbench {a!r:>22} lm-eval {b!r:>22} {'==' if a == b else 'DIFFERENT'}")
    print(f"identical: {result['equal']}; seconds qbench {result['seconds']['qbench']:.1f}, "
          f"lm-eval {result['seconds']['lm_eval']:.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
