import json
import multiprocessing as mp
from pathlib import Path

from qbench.records import append_record, read_records


def _writer(path, start):
    for i in range(start, start + 50):
        append_record(path, {"run_id": i, "payload": "x" * 5000})


def test_concurrent_appends_keep_every_record_whole(tmp_path):
    procs = [mp.Process(target=_writer, args=(str(tmp_path), k * 50)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = read_records(tmp_path)
    assert sorted(r["run_id"] for r in records) == list(range(200))


def test_nan_is_written_as_valid_json(tmp_path):
    append_record(str(tmp_path), {"metrics": {"ppl": float("nan"), "x": float("inf")}})
    line = (tmp_path / "runs.jsonl").read_text()
    assert json.loads(line)["metrics"] == {"ppl": None, "x": "inf"}


def test_truncated_last_line_is_ignored(tmp_path):
    append_record(str(tmp_path), {"run_id": 1})
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"run_id": 2, "trunc')
    assert [r["run_id"] for r in read_records(tmp_path)] == [1]


def test_baseline_is_found_again_when_eval_settings_hold_lists(cfg_factory):
    """A list-valued eval setting (speed batch sizes) once went into the record as a string, so the
    next run of the sweep never found its baseline and evaluated fp16 again before every run."""
    import torch

    from qbench.records import append_record
    from qbench.runner import eval_key, find_baseline

    cfg = cfg_factory("eval.speed=true", "eval.speed_opts.batch_sizes=[1,32]", "eval.kld=true")
    key = eval_key(cfg, "cpu", torch.float32)
    assert key["speed"]["batch_sizes"] == [1, 32]
    append_record(cfg.results_dir, {"run_id": "b", "method": "fp16", "status": "ok", "eval_key": key})
    found = find_baseline(cfg.results_dir, eval_key(cfg, "cpu", torch.float32))
    assert found is not None and found["run_id"] == "b"


def test_git_sha_outside_a_checkout_is_none_or_the_given_sha(tmp_path, monkeypatch):
    from qbench.records import git_sha

    monkeypatch.delenv("QBENCH_GIT_SHA", raising=False)
    assert git_sha(tmp_path) is None  # git prints "HEAD" there and fails: never record that
    monkeypatch.setenv("QBENCH_GIT_SHA", "abc123")
    assert git_sha(tmp_path) == "abc123"


def test_git_sha_of_a_checkout_with_changes_is_marked(tmp_path, monkeypatch):
    """A clean checkout records its commit whatever $QBENCH_GIT_SHA says; with changes to tracked files
    the commit is not what ran: $QBENCH_GIT_SHA (the caller knows the tree), else "<commit>-dirty"."""
    import subprocess

    from qbench.records import git_sha

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    monkeypatch.setenv("QBENCH_GIT_SHA", "abc123")
    sha = git_sha(tmp_path)
    assert sha and len(sha) == 40 and sha != "abc123"  # a clean checkout's own commit wins
    (tmp_path / "b.py").write_text("untracked files do not count\n")
    assert git_sha(tmp_path) == sha
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == "abc123"
    monkeypatch.delenv("QBENCH_GIT_SHA")
    assert git_sha(tmp_path) == f"{sha}-dirty"


def test_garbled_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path, capsys):
    append_record(str(tmp_path), {"run_id": 1})
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write("not json at all\n[1, 2]\n")
    append_record(str(tmp_path), {"run_id": 4})
    assert [r["run_id"] for r in read_records(tmp_path)] == [1, 4]
    err = capsys.readouterr().err
    path = tmp_path / "runs.jsonl"
    assert f"qbench: warning: {path}:2: skipped, not a JSON record" in err
    assert f"qbench: warning: {path}:3: skipped, not a JSON record (a JSON list, not an object)" in err
    read_records(tmp_path)  # a run reads its records several times: each line is warned about once
    assert capsys.readouterr().err == ""


def test_interrupted_run_is_recorded_and_the_interrupt_goes_on(cfg_factory, monkeypatch):
    import pytest

    from qbench import runner

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_loaded", ctrl_c)
    cfg = cfg_factory("eval.ppl.max_windows=1")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg)
    [record] = read_records(cfg.results_dir)
    assert record["status"] == "interrupted" and "KeyboardInterrupt" in record["error"] and record["finished_at"]


def test_progress_bars_name_the_model_and_the_dataset(cfg_factory, data_dir, monkeypatch):
    """fp16 baseline or the quantized configuration, then the perplexity set."""
    import torch
    from tiny_llama import tiny_llama

    from qbench.eval import perplexity as ppl
    from qbench.methods import RunContext
    from qbench.runner import evaluate

    titles = []
    monkeypatch.setattr(ppl, "tokenize", lambda tok, text, key=None: torch.arange(64) % 100)
    for overrides in (["method=fp16"], ["method=rtn", "bits=3", "group_size=64"]):
        cfg = cfg_factory(*overrides, "eval.ppl.datasets=[wikitext2,c4]", "eval.ppl.seqlen=32", "eval.ppl.max_windows=1")
        ctx = RunContext(None, "cpu", torch.float32, data_dir, quiet=True)
        ctx.progress = lambda it, desc, total=None: titles.append(desc) or it
        evaluate(tiny_llama(), None, cfg, ctx)
    assert titles == ["fp16 baseline: ppl wikitext2", "fp16 baseline: ppl c4", "rtn w3 g64: ppl wikitext2", "rtn w3 g64: ppl c4"]
