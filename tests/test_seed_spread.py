"""Seed groups (issue 22): records that differ only in calib.seed are one configuration; the report, the
leaderboard and the gate show mean ± std and n. Synthetic records only."""

import json
from pathlib import Path

import pytest

from qbench import gate, groups, leaderboard
from qbench.records import append_record
from qbench.report import comparison_frame, latest_per_config

KEY = {"model": "smollm2-135m", "device": "cuda", "dtype": "float16", "ppl_datasets": ["wikitext2"], "ppl_seqlen": 2048,
       "ppl_max_windows": None, "data": {"wikitext2": "local:w"}, "tasks": ["piqa"], "tasks_limit": None,
       "tasks_data": {"piqa": "local:piqa"}}
GPTQ_PPL = [70.0, 71.0, 72.0, 73.0, 74.0]  # mean 72, sample std sqrt(2.5) = 1.5811
PIQA = [0.60, 0.61, 0.62, 0.63, 0.64]  # mean 0.62, std 0.0158


def rec(method, ppl, seed=0, bits=3, status="ok", nsamples=128, acc=0.6, sha="aaaaaaa", **params):
    calib = "c4" if method in ("gptq", "awq") else None
    return {"run_id": f"{method}{bits}-{seed}-{nsamples}", "status": status, "error": None if status == "ok" else "ValueError: x",
            "model": "smollm2-135m", "method": method, "bits": None if method == "fp16" else bits,
            "group_size": None if method == "fp16" else 128, "calib": calib,
            "metrics": {"ppl_wikitext2": ppl, "acc_piqa": acc, "acc_stderr_piqa": 0.012, "bits_per_weight": 3.21,
                        "kld_mean": ppl / 1000} if status == "ok" else {},
            "timings": {"quantize_s": 10.0 + seed}, "eval_key": KEY,
            "env": {"git_sha": sha, "device_name": "NVIDIA H200"},
            "started_at": f"2026-12-0{1 + seed}T10:00:00+00:00", "finished_at": f"2026-12-0{1 + seed}T10:05:00+00:00",
            "config": {"method": {"name": method, **params},
                       "calib": {"name": "c4", "nsamples": nsamples, "seqlen": None, "seed": seed}}}


def gptq_seeds(**kw):
    return [rec("gptq", p, seed=s, acc=a, **kw) for s, (p, a) in enumerate(zip(GPTQ_PPL, PIQA))]


RECORDS = [rec("fp16", 21.6, acc=0.643)] + gptq_seeds(sha="bbbbbbb") + [rec("awq", 60.0)]


def test_seeds_stay_apart_then_group_into_one():
    latest = latest_per_config(RECORDS)
    assert len(latest) == 7  # every seed is its own record (before, the last seed hid the others)
    grouped = groups.seed_groups(latest)
    assert [len(g) for g in grouped] == [1, 5, 1]
    m = groups.merged(grouped[1])
    assert m["metrics"]["ppl_wikitext2"] == pytest.approx(72.0)
    assert m["seed_spread"]["ppl_wikitext2"] == {"std": pytest.approx(2.5 ** 0.5), "n": 5}
    assert m["metrics"]["acc_piqa"] == pytest.approx(0.62) and m["seed_spread"]["acc_piqa"]["n"] == 5
    assert m["metrics"]["acc_stderr_piqa"] == pytest.approx(0.012) and "acc_stderr_piqa" not in m["seed_spread"]
    assert m["metrics"]["bits_per_weight"] == 3.21 and "bits_per_weight" not in m["seed_spread"]
    assert m["seeds"] == [0, 1, 2, 3, 4] and groups.seeds_label(m) == "seeds 0-4" and len(m["run_ids"]) == 5
    assert groups.merged(grouped[0]) is grouped[0][0]  # a group of one is the record itself


def test_only_the_seed_may_differ():
    """A record that differs in anything else (bits, calibration size, a method parameter) is another
    config; a record that is not ok is a row of its own; a re-run of one seed replaces it."""
    base = gptq_seeds()
    others = [rec("gptq", 80.0, seed=0, bits=4), rec("gptq", 80.0, seed=1, nsamples=8),
              rec("gptq", 80.0, seed=2, act_order=False), rec("gptq", 0, seed=3, status="failed")]
    rerun = rec("gptq", 90.0, seed=4)
    rerun["finished_at"] = "2026-12-09T00:00:00+00:00"
    grouped = groups.seed_groups(latest_per_config(base + others + [rerun]))
    assert sorted(len(g) for g in grouped) == [1, 1, 1, 1, 4]  # seed 3 failed: its own row; ok seeds 0, 1, 2, 4
    four = next(g for g in grouped if len(g) == 4)
    assert groups.merged(four)["metrics"]["ppl_wikitext2"] == pytest.approx((70 + 71 + 72 + 90) / 4)
    assert groups.seeds_label(groups.merged(four)) == "seeds 0,1,2,4"


def test_records_from_before_zero_in_range_ran_with_zero_in_range():
    conf = {"default_bits": 4, "sym": False}  # a run's whole conf entry, as records carry it
    old = rec("awq", 60.0, **conf)  # written before the option: ran with 0 in each group's range
    new_true = rec("awq", 61.0, seed=1, zero_in_range=True, **conf)
    new_false = rec("awq", 62.0, seed=2, zero_in_range=False, **conf)
    assert leaderboard.run_label(old) == "awq w3 zero_in_range=on g128 c4"
    assert leaderboard.run_label(new_false) == "awq w3 g128 c4"  # AWQ's default now
    grouped = groups.seed_groups(latest_per_config([old, new_true, new_false]))
    assert sorted(len(g) for g in grouped) == [1, 2]


def test_report_table_shows_mean_std_and_n():
    frame = comparison_frame(RECORDS)
    gptq = frame[frame["method"] == "gptq"].iloc[0]
    assert len(frame) == 3 and gptq["variant"] == "seeds 0-4"
    assert gptq["ppl_wikitext2"] == pytest.approx(72.0) and gptq["±ppl_wikitext2"] == pytest.approx(1.5811, abs=1e-4)
    assert gptq["n"] == 5 and gptq["Δppl_wikitext2"] == pytest.approx(72.0 - 21.6)
    cols = list(frame.columns)
    assert cols.index("±ppl_wikitext2") == cols.index("ppl_wikitext2") + 1 and cols.index("n") == cols.index("status") + 1
    assert "±ppl_wikitext2" not in comparison_frame([RECORDS[0], RECORDS[-1]]).columns  # no seeds: the table as before


def test_leaderboard_cells_and_settings(tmp_path):
    leaderboard.write_leaderboards(RECORDS, tmp_path)
    md = (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| gptq"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "gptq w3 g128 c4 seeds 0-4"
    assert "72.000 ± 1.581 (n=5)" in cells  # ppl: mean ± std over the seeds
    assert "0.6200 ± 0.0158 (n=5; lm-eval stderr 0.0120)" in cells  # zero-shot keeps lm-eval's stderr
    assert "+50.400" in cells  # Δ of the mean
    single = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| awq")).strip("|").split("|")]
    assert "60.000" in single and "0.6000 ± 0.0120" in single  # one record: as before
    assert "records: 7," in md and "bbbbbbb" in md and "seeds a-b: one config run with each calibration seed" in md
    page = (tmp_path / "smollm2-135m" / "leaderboard.html").read_text()
    assert "data-v='72.0'" in page  # sorting uses the mean


def test_no_seed_groups_no_seed_line(tmp_path):
    leaderboard.write_leaderboards([RECORDS[0], RECORDS[-1]], tmp_path)
    md = (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    assert "seeds a-b" not in md and "(n=" not in md


def _write(path, records):
    for r in records:
        append_record(str(path), r)
    return str(path)


def test_gate_baseline_of_seeds_and_spread(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert gate.gate(str(baseline), _write(tmp_path / "base", RECORDS), update=True) == 0
    entry = next(c for c in json.loads(baseline.read_text())["configs"] if c["key"]["method"] == "gptq")
    assert entry["metrics"]["ppl_wikitext2"] == pytest.approx(72.0) and entry["n"] == 5
    assert entry["spread"]["ppl_wikitext2"] == pytest.approx(2.5 ** 0.5) and entry["seeds"] == [0, 1, 2, 3, 4]
    assert len(entry["run_ids"]) == 5 and "spread" not in next(c for c in json.loads(baseline.read_text())["configs"]
                                                               if c["key"]["method"] == "awq")
    # one new seed at 74.5 (+3.5 %): a regression at 0.5 %, within mean + 2 std (75.16)
    results = _write(tmp_path / "r", [rec("fp16", 21.6), rec("gptq", 74.5, seed=7), rec("awq", 60.0)])
    assert gate.gate(str(baseline), results, "0.5%") == 1
    assert "72.0000 ± 1.5811 (n=5)" in capsys.readouterr().out
    assert gate.gate(str(baseline), results, "0.5%", spread=2) == 0
    out = capsys.readouterr().out
    assert "ok (within 2 std = 3.1623)" in out and "within 0.5% or 2 std of the baseline's seeds" in out
    assert gate.gate(str(baseline), results, "0.5%", spread=1) == 1  # 74.5 > 72 + 1.58
    # the same five seeds again: their mean is the baseline's
    assert gate.gate(str(baseline), _write(tmp_path / "r5", RECORDS), "0.5%") == 0
    assert "72.0000 (mean of 5)" in capsys.readouterr().out
    with pytest.raises(gate.GateError, match="--spread must be >= 0"):
        gate.gate(str(baseline), results, spread=-1)


def test_gate_a_failed_seed_fails_the_config(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    gate.gate(str(baseline), _write(tmp_path / "base", RECORDS), update=True)
    results = _write(tmp_path / "r", RECORDS[:3] + [rec("gptq", 0, seed=2, status="failed")] + RECORDS[4:])
    assert gate.gate(str(baseline), results, spread=2) == 1
    assert "failed: ValueError: x" in capsys.readouterr().out


def test_gate_does_not_average_other_calibration_settings(tmp_path, capsys):
    """calib.nsamples is not in the gate's key: records of two sizes are two configs, the later counts."""
    baseline = tmp_path / "baseline.json"
    gate.gate(str(baseline), _write(tmp_path / "base", RECORDS), update=True)
    results = _write(tmp_path / "r", [rec("fp16", 21.6), rec("awq", 60.0)] + gptq_seeds() + [rec("gptq", 72.1, seed=0, nsamples=8)])
    assert gate.gate(str(baseline), results, "0.5%") == 0
    assert "| 72.1000   | +0.139%" in capsys.readouterr().out  # not the mean of six


def test_gate_cli_takes_spread(tmp_path):
    import subprocess
    import sys

    baseline = tmp_path / "baseline.json"
    gate.gate(str(baseline), _write(tmp_path / "base", RECORDS), update=True)
    results = _write(tmp_path / "r", [rec("fp16", 21.6), rec("gptq", 74.5, seed=7), rec("awq", 60.0)])
    run = lambda *a: subprocess.run([sys.executable, "-m", "qbench.cli", "gate", "--baseline", str(baseline),  # noqa: E731
                                     "--results", results, *a], capture_output=True, text=True, timeout=120)
    assert run().returncode == 1 and run("--spread", "2").returncode == 0


def test_seeds_sweep_plans_five_seeds_of_gptq_and_awq():
    """sweeps/seeds.yaml: one multirun, GPTQ/AWQ x bits 3, 4 x calib.seed 0-4, perplexity and KLD only;
    valid (checked here on the CPU in place of its GPU)."""
    import yaml

    from qbench.cli import prevalidate
    from qbench.sweep import plan

    spec = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "seeds.yaml").read_text())
    (command,), notes = plan(spec, [])
    assert not notes and command[:3] == ["-m", "method=gptq,awq", "bits=3,4"]
    assert "calib.seed=0,1,2,3,4" in command and "eval.kld=true" in command
    assert not any(a.startswith(("eval.tasks", "eval.speed")) for a in command)
    prevalidate([a if a != "device=cuda" else "device=cpu" for a in command])
