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
