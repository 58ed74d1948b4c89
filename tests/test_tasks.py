"""Zero-shot tasks through lm-eval: qbench's numbers are lm-eval's own for the same model and documents.

The documents are a tiny hand-written fixture in the columns of the hub datasets (PIQA, LAMBADA), used
only to check the plumbing; accuracies are never published from it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qbench import ConfigError
from qbench.eval import tasks as qtasks

pytest.importorskip("lm_eval")

PIQA = [
    {"goal": "To boil water quickly,", "sol1": "put a lid on the pot.", "sol2": "put the pot in the freezer.", "label": 0},
    {"goal": "How do you dry wet shoes?", "sol1": "Fill them with ice cubes.", "sol2": "Stuff them with newspaper.", "label": 1},
    {"goal": "To cut a sheet of paper in half,", "sol1": "use scissors.", "sol2": "use a spoon.", "label": 0},
    {"goal": "How do you keep bread fresh?", "sol1": "Leave it open in the sun.", "sol2": "Keep it in a closed bag.", "label": 1},
]
LAMBADA = [
    {"text": "She opened the door and saw that it was raining, so she went back inside to get her umbrella"},
    {"text": "The children ran to the beach and spent the whole afternoon building a castle out of sand"},
]


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory):
    """A data root with the fixture files and a tasks dir mapping piqa/lambada_openai onto them."""
    root = tmp_path_factory.mktemp("taskdata")
    (root / "data" / "fx").mkdir(parents=True)
    (root / "tasks").mkdir()
    for name, docs, split, official in (("piqa", PIQA, "validation", "piqa/piqa.yaml"),
                                        ("lambada_openai", LAMBADA, "test", "lambada/lambada_openai.yaml")):
        (root / "data" / "fx" / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        entry = {"task": name, "lm_eval_config": official,
                 "local": {"builder": "json", "data_files": {split: f"fx/{name}.jsonl"}}}
        (root / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    return root


def test_every_shipped_definition_names_an_official_task():
    for path in sorted(qtasks.tasks_dir().glob("*.yaml")):
        entry = yaml.safe_load(path.read_text())
        assert entry["task"] == path.stem
        assert (qtasks.lm_eval_tasks_dir() / entry["lm_eval_config"]).is_file(), path


def test_local_task_keeps_the_official_definition(fixture_tasks):
    source = qtasks.resolve_task("piqa", str(fixture_tasks / "data"), fixture_tasks / "tasks")
    assert source.where == "local:fx/piqa.jsonl"
    cfg = source.config
    assert cfg["dataset_path"] == "json" and cfg["dataset_kwargs"]["data_files"]["validation"].endswith("fx/piqa.jsonl")
    assert cfg["doc_to_text"] == "Question: {{goal}}\nAnswer:" and cfg["doc_to_choice"] == "{{[sol1, sol2]}}"
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    assert cfg["training_split"] is None and cfg["validation_split"] == "validation"


def test_numbers_equal_lm_eval_own_run(fixture_tasks, smollm2, tmp_path):
    """qbench (built model object) vs lm-eval's own HF loader on the same weights and documents."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml  # noqa: F401  (lm-eval present)

    from qbench.models import _load_gguf, resolve_source

    data = str(fixture_tasks / "data")
    sources = [qtasks.resolve_task(n, data, fixture_tasks / "tasks") for n in ("piqa", "lambada_openai")]
    ours = qtasks.to_metrics(qtasks.run_lm_eval(smollm2.model, smollm2.tokenizer, sources, batch_size=4,
                                                bootstrap_iters=100, device="cpu"))
    # lm-eval's own: its task YAML including the official one, its HF model loader on the same weights
    for name, official, split in (("piqa", "piqa/piqa.yaml", "validation"),
                                  ("lambada_openai", "lambada/lambada_openai.yaml", "test")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "include": str(qtasks.lm_eval_tasks_dir() / official), "task": f"own_{name}", "dataset_path": "json",
            "dataset_name": None, "training_split": None, "validation_split": split if split == "validation" else None,
            "dataset_kwargs": {"data_files": {split: str(fixture_tasks / "data" / "fx" / f"{name}.jsonl")}}}))
    path = _load_gguf(resolve_source("smollm2-135m").path, False)
    theirs = simple_evaluate(model="hf", model_args={"pretrained": path, "dtype": "float32", "device": "cpu"},
                             tasks=["own_piqa", "own_lambada_openai"], batch_size=4, bootstrap_iters=100,
                             task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))["results"]
    assert ours["samples_piqa"] == len(PIQA) and ours["samples_lambada_openai"] == len(LAMBADA)
    for metric in ("acc", "acc_norm", "acc_stderr"):
        assert ours[f"{metric}_piqa"] == theirs["own_piqa"][f"{metric},none"]
    for metric in ("acc", "perplexity"):
        assert ours[f"{metric}_lambada_openai"] == pytest.approx(theirs["own_lambada_openai"][f"{metric},none"], rel=1e-9)


def test_run_records_task_metrics(fixture_tasks, cfg_factory, smollm2, data_dir, monkeypatch, tmp_path):
    from qbench import runner

    # a definition whose file is given by absolute path (joined to the data root, it stays itself)
    piqa = str(fixture_tasks / "data" / "fx" / "piqa.jsonl")
    entry = {"task": "piqa", "lm_eval_config": "piqa/piqa.yaml", "local": {"builder": "json", "data_files": {"validation": piqa}}}
    (tmp_path / "piqa.yaml").write_text(yaml.safe_dump(entry))
    monkeypatch.setenv("QBENCH_TASKS_DIR", str(tmp_path))
    monkeypatch.setitem(runner._MODELS, ("smollm2-135m", "cpu", "float32", False), smollm2)
    cfg = cfg_factory("method=fp16", "device=cpu", "dtype=float32", "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=64",
                      "eval.ppl.max_windows=1", "eval.tasks=[piqa]", "eval.limit=2", "eval.tasks_batch_size=2")
    record = runner.run(cfg)
    assert record["status"] == "ok", record.get("error")
    assert record["metrics"]["samples_piqa"] == 2 and 0 <= record["metrics"]["acc_piqa"] <= 1
    assert record["eval_key"]["tasks"] == ["piqa"] and record["eval_key"]["tasks_data"] == {"piqa": f"local:{piqa}"}


ALL_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq", "lambada_openai")


@pytest.mark.slow  # about a minute on a 2-core CPU: lm-eval twice over 7 x 20 items
def test_seven_tasks_equal_lm_eval_on_20_items(smollm2, data_dir):
    """The shipped definitions on the real files: qbench's numbers equal lm-eval's own simple_evaluate (a task
    YAML that includes the official one, only the dataset location changed) on the same model object."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from research.tasks_identity import compare

    result = compare(smollm2.model, smollm2.tokenizer, ALL_TASKS, data_dir, limit=20, batch_size=8, bootstrap_iters=100)
    for name, metrics in result["tasks"].items():
        assert metrics["samples"] == (20, 20), name
        assert "acc" in metrics and "acc_stderr" in metrics, name
        for metric, (ours, theirs) in metrics.items():
            assert ours == theirs, (name, metric, ours, theirs)
    assert {"acc_norm" in result["tasks"][n] for n in ("arc_easy", "arc_challenge", "piqa", "hellaswag")} == {True}
    assert "perplexity" in result["tasks"]["lambada_openai"]


def test_shipped_tasks_resolve_to_the_data_root_files(data_dir):
    for name in ALL_TASKS:
        source = qtasks.resolve_task(name, data_dir)
        assert source.where.startswith(f"local:{name}/"), source.where
        (split, path), = source.config["dataset_kwargs"]["data_files"].items()
        assert Path(path).is_file() and source.config[f"{split}_split"] == split


def _bad_root(tmp_path, text: str):
    """A data root with the real perplexity data (links) and a PIQA file of the given text."""
    for name in ("wikitext-2-raw", "c4"):
        os.symlink(Path(os.environ["QBENCH_DATA_DIR"]) / name, tmp_path / name)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text(text)
    return str(tmp_path)


@pytest.mark.parametrize("text, why", [
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1"\n', "line 2 is not valid JSON"),
    ('{"goal": "g", "sol1": "a", "label": 0}\n', "line 1 lacks sol2"),
    ('[1, 2]\n', "line 1 lacks goal, sol1, sol2, label"),
    ("\n", "holds no rows"),
])
def test_malformed_task_file_is_one_line_naming_it(tmp_path, text, why):
    root = _bad_root(tmp_path, text)
    with pytest.raises(ConfigError, match=why) as err:
        qtasks.resolve_task("piqa", root)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "piqa" / "validation.jsonl") in msg and "goal, sol1, sol2, label" in msg


def test_missing_task_file_offline_names_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="expected .*hellaswag/validation.jsonl") as err:
        qtasks.resolve_task("hellaswag", str(tmp_path))
    assert str(tmp_path / "hellaswag" / "validation.jsonl") in str(err.value)


def test_cli_malformed_task_file_fails_before_load(tmp_path):
    root = _bad_root(tmp_path, '{"goal": 1}\n')
    out = subprocess.run([sys.executable, "-m", "qbench.cli", "eval.tasks=[piqa]", "wandb.mode=disabled"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "QBENCH_DATA_DIR": root})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "task piqa:" in lines[0] and "line 1 lacks sol1" in lines[0], out.stderr
    assert not (tmp_path / "results").exists()


def test_unknown_task_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"unknown task 'nosuchtask'") as err:
        qtasks.resolve_task("nosuchtask", None)
    assert "\n" not in str(err.value)


def test_task_without_local_data_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"task piqa: no local data .* no network") as err:
        qtasks.resolve_task("piqa", str(tmp_path))
    assert "\n" not in str(err.value)


def test_cli_fails_before_loading_the_model(tmp_path):
    env_cmd = [sys.executable, "-m", "qbench.cli", "eval.tasks=[piqa,nosuchtask]", "wandb.mode=disabled"]
    out = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "QBENCH_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbench: error: task piqa: no local data"), out.stderr
    assert not (tmp_path / "results").exists()
