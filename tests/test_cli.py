"""The qbench command end to end on the real default model (short windows on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbench import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED
from qbench.records import read_records

QUICK = ["eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=256", "eval.ppl.max_windows=2", "quiet=true"]


def qbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "qbench.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900)
    return out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, data_dir, smollm2):  # smollm2: the converted model is cached first
    cwd = tmp_path_factory.mktemp("run")
    out = qbench(*QUICK, "wandb.mode=offline", cwd=cwd)
    return cwd, out


def test_default_run_records_baseline_and_rtn(default_run):
    cwd, out = default_run
    assert out.returncode == 0, out.stderr[-2000:]
    records = read_records(cwd / "results")
    assert [(r["method"], r["status"]) for r in records] == [("fp16", "ok"), ("rtn", "ok")]
    rtn = records[1]
    assert (rtn["bits"], rtn["group_size"]) == (4, 128)
    for key in ("run_id", "error", "model", "calib", "config", "eval_key"):
        assert key in rtn
    assert set(rtn["timings"]) >= {"load_s", "quantize_s", "eval_s"}
    assert set(rtn["env"]) >= {"qbench", "git_sha", "torch", "transformers", "device_name"}
    assert rtn["metrics"]["ppl_wikitext2"] > records[0]["metrics"]["ppl_wikitext2"] > 1
    assert rtn["metrics"]["tokens_wikitext2"] == 2 * 255
    table = out.stdout
    assert "| fp16" in table and "| rtn" in table and "ppl_wikitext2" in table


def test_first_run_says_where_records_went_and_what_next(default_run):
    cwd, out = default_run
    lines = out.stdout.splitlines()
    assert lines[-3] == "qbench: records appended to results/runs.jsonl; W&B (offline) files under results/wandb-files"
    assert lines[-2].strip().startswith("next: qbench report --results results")
    assert "results/reports/<model>/leaderboard" in lines[-2] and "qbench --help" in lines[-1]


def test_wandb_offline_logs_each_run(default_run):
    cwd, _ = default_run
    runs = list((cwd / "results" / "wandb-files" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    records = read_records(cwd / "results")
    assert all(r.get("wandb_run") for r in records)


def test_report_subcommand_writes_markdown(default_run):
    cwd, _ = default_run
    out = qbench("report", "--results", "results", "--out", "table.md", cwd=cwd)
    assert out.returncode == 0, out.stderr
    text = (cwd / "table.md").read_text()
    assert text.index("fp16") < text.index("rtn") and "Δppl_wikitext2" in text


def test_report_on_empty_results_is_one_line(tmp_path):
    out = qbench("report", "--results", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and out.stdout.strip().count("\n") == 0


@pytest.mark.slow  # about 45 s on a 2-core CPU: a real multirun of the default model
def test_sweep_accounts_for_every_combination(tmp_path, data_dir, smollm2):
    out = qbench("-m", "method=rtn,fp16", "bits=3,4", "wandb.mode=disabled", *QUICK, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    records = read_records(tmp_path / "results")
    combos = {(r["method"], r["config"]["bits"]): r for r in records if r.get("role") != "baseline"}
    assert set(combos) == {("rtn", 3), ("rtn", 4), ("fp16", 3), ("fp16", 4)}
    assert combos[("fp16", 3)]["status"] == combos[("fp16", 4)]["status"] == "skipped"
    baselines = [r for r in records if r.get("role") == "baseline"]
    assert len(baselines) == 1  # computed once, reused by the rest of the sweep
    assert combos[("rtn", 3)]["metrics"]["ppl_wikitext2"] > combos[("rtn", 4)]["metrics"]["ppl_wikitext2"]
    assert len({r["sweep_id"] for r in records}) == 1


def test_resume_skips_recorded_runs_only(default_run, tmp_path):
    # the default run's records (rtn at its default bits) as if a sweep had been cut short after them
    done_dir = tmp_path / "results"
    done_dir.mkdir()
    (done_dir / "runs.jsonl").write_text((default_run[0] / "results" / "runs.jsonl").read_text())
    before = read_records(done_dir)
    out = qbench("-m", "method=rtn", "bits=4,3", "resume=true", "wandb.mode=disabled", *QUICK, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    new = read_records(done_dir)[len(before):]
    assert [(r["method"], r["bits"], r["status"]) for r in new] == [("rtn", 4, "skipped"), ("rtn", 3, "ok")]
    assert before[1]["run_id"] in new[0]["error"] and "resume" in new[0]["error"]
    assert not any(r.get("role") == "baseline" for r in new)  # the copied fp16 record serves as baseline
    # without resume the same run is measured again
    out = qbench("method=rtn", "bits=3", "wandb.mode=disabled", *QUICK, cwd=tmp_path)
    assert out.returncode == 0 and read_records(done_dir)[-1]["status"] == "ok"


def test_multirun_without_wandb_keeps_records_and_exit_code(tmp_path, data_dir, smollm2):
    # W&B logging on (offline) where wandb cannot be imported: each record notes it, the multirun ends cleanly
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "qbench.cli", "-m", "method=fp16", "wandb.mode=offline", *QUICK],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "W&B sweep report not logged: ModuleNotFoundError" in out.stderr and "Traceback" not in out.stderr
    records = read_records(tmp_path / "results")
    assert [r["status"] for r in records] == ["ok"] and "wandb" in records[0]["wandb_error"]


def test_failing_run_is_recorded_and_sweep_goes_on(tmp_path, data_dir, smollm2):
    # a window longer than the text fails that run only
    out = qbench("-m", "eval.ppl.seqlen=10000000,256", "wandb.mode=disabled", "eval.ppl.datasets=[wikitext2]",
                 "eval.ppl.max_windows=1", "quiet=true", cwd=tmp_path)
    assert out.returncode == EXIT_FAILED, out.stderr[-2000:]  # issue 29: a failed record is a non-zero exit
    records = read_records(tmp_path / "results")
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "fewer than one window" in failed[0]["error"]
    assert any(r["status"] == "ok" and r["method"] == "rtn" for r in records)
    json.dumps(records)


# ---- issue 29: failures a script can see --------------------------------------------------------------

def test_failed_single_run_exits_1(tmp_path):
    out = qbench("model=nosuchorg/nosuchmodel", "wandb.mode=disabled", *QUICK, cwd=tmp_path)  # offline: load fails
    assert out.returncode == EXIT_FAILED, out.stderr[-2000:]
    [record] = read_records(tmp_path / "results")
    assert record["status"] == "failed" and record["model"] == "nosuchorg/nosuchmodel"
    assert "qbench: 1 of 1 runs failed (exit code 1)" in out.stderr


def test_sweep_with_a_failed_record_exits_1(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (tmp_path / "s.yaml").write_text(json.dumps({"overrides": [f"model={corrupt}", "wandb.mode=disabled", *QUICK],
                                                 "jobs": [{"methods": ["rtn"], "bits": 4}]}))
    out = qbench("sweep", "s.yaml", cwd=tmp_path)
    assert out.returncode == EXIT_FAILED, out.stdout[-2000:] + out.stderr[-2000:]
    assert [r["status"] for r in read_records(tmp_path / "results")] == ["failed"]


def test_sweep_validates_every_multirun_before_the_first(tmp_path):
    (tmp_path / "s.yaml").write_text(json.dumps({"overrides": ["wandb.mode=disabled", *QUICK], "jobs": [
        {"methods": ["rtn"], "bits": 4}, {"methods": ["int8"], "overrides": ["method.threshold=abc"]}]}))
    out = qbench("sweep", "s.yaml", cwd=tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert out.stdout.strip().splitlines()[-1] == \
        "qbench sweep: error: method.threshold for int8 must be a number (default 6.0), got 'abc'"
    assert not (tmp_path / "results").exists()  # the valid first multirun did not start either


def test_ctrl_c_records_the_run_as_interrupted_and_exits_130(tmp_path):
    code = ("import sys\nfrom qbench import runner\n"
            "def ctrl_c(cfg):\n    raise KeyboardInterrupt\n"
            "runner._loaded = ctrl_c  # Ctrl-C while the model loads\n"
            f"sys.argv = ['qbench', 'wandb.mode=disabled', *{QUICK!r}]\n"
            "from qbench.cli import main\nmain()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == EXIT_INTERRUPTED, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1] == "qbench: interrupted"
    [record] = read_records(tmp_path / "results")
    assert record["status"] == "interrupted"


def test_help_lists_the_subcommands(tmp_path):
    out = qbench("--help", cwd=tmp_path)
    assert out.returncode == 0
    for name in ("report", "sweep", "gate"):
        assert f"qbench {name} [...]" in out.stdout


def test_misspelled_subcommand_is_one_line_with_the_closest(tmp_path):
    out = qbench("reprot", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == EXIT_CONFIG and len(lines) == 1, out.stderr
    assert lines[0].startswith("qbench: error: unknown subcommand 'reprot'; did you mean 'report'?")
    assert "report, gate, sweep" in lines[0]


def test_resume_says_once_what_it_skipped(default_run, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "runs.jsonl").write_text((default_run[0] / "results" / "runs.jsonl").read_text())
    done = read_records(results)[1]
    out = qbench("-m", "method=rtn", "bits=4", "resume=true", "wandb.mode=disabled", *QUICK, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(no records)" not in out.stdout
    summary = [line for line in out.stdout.splitlines() if "resume=true skipped" in line]
    assert summary == [f"qbench: resume=true skipped 1 of 1 runs already recorded ok: rtn w4 g128 (run {done['run_id']})"]
