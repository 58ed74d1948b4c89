"""Parallel sweeps: Hydra's joblib launcher with 2 worker processes on a tiny model, resumed across
workers; the shipped launcher configs; each worker's GPU (qbench/launch.py)."""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbench import ConfigError, launch
from qbench.cli import prevalidate
from qbench.records import read_records

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

QUICK = ["eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=128", "eval.ppl.max_windows=2", "quiet=true",
         "wandb.mode=disabled"]
SWEEP = ["-m", "hydra/launcher=gpus", "hydra.launcher.n_jobs=2", "method=rtn", "bits=2,3,4,8"]


def qbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qbench.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    """The tiny random Llama of the method tests, saved with SmolLM2's tokenizer as a local model directory."""
    from tiny_llama import tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_dir, data_dir):
    cwd = tmp_path_factory.mktemp("sweep")
    out = qbench(*SWEEP, f"model={tiny_dir}", *QUICK, cwd=cwd)
    return cwd, out


def test_two_workers_leave_every_record_and_one_baseline(sweep):
    cwd, out = sweep
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stderr + out.stdout  # the jobs really ran in 2 workers
    lines = (cwd / "results" / "runs.jsonl").read_text().splitlines()
    records = read_records(cwd / "results")
    assert len(records) == len(lines) == 5  # every line a whole JSON record
    baselines = [r for r in records if r.get("role") == "baseline"]
    runs = [r for r in records if r.get("role") != "baseline"]
    assert len(baselines) == 1 and baselines[0]["status"] == "ok"  # measured once though both workers needed it
    assert sorted(r["bits"] for r in runs) == [2, 3, 4, 8] and {r["status"] for r in runs} == {"ok"}
    assert len({r["sweep_id"] for r in records}) == 1
    assert "records appended to" in out.stdout  # the starting process read back what the workers recorded


def test_resume_in_workers_skips_what_other_workers_recorded(sweep, tiny_dir):
    cwd, _ = sweep
    before = read_records(cwd / "results")
    out = qbench(*SWEEP, f"model={tiny_dir}", "resume=true", *QUICK, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    new = read_records(cwd / "results")[len(before):]
    assert sorted((r["bits"], r["status"]) for r in new) == [(2, "skipped"), (3, "skipped"), (4, "skipped"), (8, "skipped")]
    assert "resume=true skipped 4 of 4 runs" in out.stdout


def _launcher(*overrides: str):
    from hydra import compose, initialize_config_dir

    from qbench.paths import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_shipped_launcher_configs_compose():
    gpus = _launcher("hydra/launcher=gpus")
    assert gpus._target_.endswith("JoblibLauncher") and gpus.n_jobs == launch.gpu_count()  # one worker per GPU
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = _launcher("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1 and slurm.partition == "gpu"


def test_each_worker_takes_a_gpu_no_other_worker_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_PINNED", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    other = os.open(tmp_path / "gpu-1.lock", os.O_RDWR | os.O_CREAT)  # another worker holds GPU 1
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        assert launch.pin_gpu(1, ["0", "1", "2"], tmp_path) == "2"  # job 1's own GPU is taken: the next free one
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert launch.pin_gpu(3, ["0", "1", "2"], tmp_path) == "2"  # a later job keeps the worker's GPU
    finally:
        for fd in launch._PINNED + [other]:
            os.close(fd)


def test_one_gpu_or_none_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_PINNED", [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert launch.visible_gpus() == ["3"]
    assert launch.pin_gpu(5, launch.visible_gpus(), tmp_path) is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and launch._PINNED == []


def test_a_launcher_without_its_plugin_is_one_line(monkeypatch):
    monkeypatch.setitem(launch.PLUGINS, "gpus", ("hydra_plugins.not_installed", "hydra-joblib-launcher"))
    with pytest.raises(ConfigError, match=r"hydra/launcher=gpus needs the hydra-joblib-launcher plugin: pip install"):
        prevalidate(["-m", "hydra/launcher=gpus", "method=rtn"])
