"""The perplexity gate: baseline file round trip, regressions, missing configs, improvements, bad input,
and end to end: one bit less in RTN fails the gate with a readable message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qbench import gate
from qbench.records import append_record

KEY = {"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "ppl_datasets": ["wikitext2"], "ppl_seqlen": 512,
       "ppl_max_windows": 2, "data": {"wikitext2": "local:wikitext-2-raw/wiki.test.raw"}}


def rec(method, bits, ppl, status="ok", model="smollm2-135m", key=KEY):
    return {"run_id": f"{method}-{bits}", "status": status, "error": None if status == "ok" else "ValueError: broken",
            "model": model, "method": method, "bits": bits, "group_size": 128 if bits else None, "calib": None,
            "metrics": {"ppl_wikitext2": ppl, "nll_wikitext2": 3.0} if status == "ok" else {},
            "eval_key": dict(key, model=model), "config": {"method": {"name": method}}}


def write(results, records):
    for r in records:
        append_record(str(results), r)
    return str(results)


def run_gate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qbench.cli", "gate", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def baseline(tmp_path):
    results = write(tmp_path / "base", [rec("fp16", None, 20.0), rec("rtn", 4, 22.0), rec("rtn", 3, 30.0)])
    path = tmp_path / "baseline.json"
    assert gate.gate(str(path), results, update=True) == 0
    return path


def test_update_writes_ppl_per_config(baseline):
    data = json.loads(baseline.read_text())
    assert data["model"] == "smollm2-135m" and data["format"] == gate.FORMAT
    assert sorted(c["label"] for c in data["configs"]) == ["fp16 [cpu seqlen 512 x2]", "rtn w3 g128 [cpu seqlen 512 x2]",
                                                           "rtn w4 g128 [cpu seqlen 512 x2]"]
    assert all(set(c["metrics"]) == {"ppl_wikitext2"} for c in data["configs"])


def test_same_results_pass(baseline, tmp_path, capsys):
    results = write(tmp_path / "r", [rec("fp16", None, 20.0), rec("rtn", 4, 22.05), rec("rtn", 3, 30.0)])
    assert gate.gate(str(baseline), results, "0.5%") == 0
    assert "qbench gate: passed (3 baseline configs within 0.5%)" in capsys.readouterr().out


def test_regression_and_missing_fail_with_a_table(baseline, tmp_path, capsys):
    results = write(tmp_path / "r", [rec("fp16", None, 20.0), rec("rtn", 4, 22.5)])  # +2.3%, and rtn w3 missing
    assert gate.gate(str(baseline), results, "0.5%") == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| rtn w4 g128"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["rtn w4 g128 [cpu seqlen 512 x2]", "ppl_wikitext2", "22.0000",
                                                               "22.5000", "+2.273%", "REGRESSION"]
    assert "missing (no record)" in out
    assert out.strip().splitlines()[-1].startswith("qbench gate: FAILED (max ppl increase 0.5%): 1 regression(s), 1 missing")
    assert gate.gate(str(baseline), results, "0.6") == 1  # absolute tolerance: +0.5 ppl is within, w3 still missing


def test_failed_run_fails_and_new_config_is_reported(baseline, tmp_path, capsys):
    results = write(tmp_path / "r", [rec("fp16", None, 20.0), rec("rtn", 4, 22.0), rec("rtn", 3, 0, status="failed")])
    assert gate.gate(str(baseline), results) == 1
    assert "failed: ValueError: broken" in capsys.readouterr().out
    results = write(tmp_path / "r2", [rec("fp16", None, 20.0), rec("rtn", 4, 21.0), rec("rtn", 3, 30.0), rec("gptq", 4, 21.5)])
    assert gate.gate(str(baseline), results) == 0
    out = capsys.readouterr().out
    assert "improved (refresh with --update)" in out and "new (not in the baseline)" in out
    assert "1 improved beyond tolerance, 1 new config(s): refresh with qbench gate --update" in out


def test_a_config_s_own_tolerance_applies_to_it_alone_and_survives_update(baseline, tmp_path, capsys):
    data = json.loads(baseline.read_text())
    w3 = next(c for c in data["configs"] if c["label"].startswith("rtn w3"))
    w3.update(tolerance="3%", why="moves between machines")
    baseline.write_text(json.dumps(data))
    results = write(tmp_path / "r", [rec("fp16", None, 20.0), rec("rtn", 4, 22.0), rec("rtn", 3, 30.6)])  # w3 +2%
    assert gate.gate(str(baseline), results, "0.5%") == 0
    assert "ok (its tolerance 3%)" in capsys.readouterr().out
    results = write(tmp_path / "r2", [rec("fp16", None, 20.0), rec("rtn", 4, 22.44), rec("rtn", 3, 31.0)])  # w4 +2%, w3 +3.3%
    assert gate.gate(str(baseline), results, "0.5%") == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 regression(s)" in last and "rtn w4 g128" in last and "rtn w3 g128" in last
    assert gate.gate(str(baseline), str(tmp_path / "r"), update=True) == 0
    kept = [c for c in json.loads(baseline.read_text())["configs"] if "tolerance" in c]
    assert [(c["label"], c["tolerance"], c["why"]) for c in kept] == [("rtn w3 g128 [cpu seqlen 512 x2]", "3%", "moves between machines")]
    w3["tolerance"] = "lots"
    baseline.write_text(json.dumps(data))
    with pytest.raises(gate.GateError):
        gate.gate(str(baseline), str(tmp_path / "r"))
    assert run_gate("--baseline", str(baseline), "--results", str(tmp_path / "r"), cwd=tmp_path).stdout.strip() == \
        f"qbench gate: error: tolerance of rtn w3 g128 [cpu seqlen 512 x2] in {baseline} must look like 0.5% (relative) or 0.05 (absolute), got 'lots'"


def test_changed_eval_settings_do_not_match(baseline, tmp_path):
    other = dict(KEY, ppl_max_windows=3)
    results = write(tmp_path / "r", [rec("fp16", None, 20.0, key=other), rec("rtn", 4, 22.0, key=other), rec("rtn", 3, 30.0, key=other)])
    assert gate.gate(str(baseline), results) == 1


def int8(threshold, ppl):
    """An LLM.int8() record with the method settings a run stores (conf/method/int8.yaml, one changed)."""
    from qbench.sweep import method_meta

    return dict(rec("int8", 8, ppl), run_id=f"int8-t{threshold}", group_size=None,
                config={"method": {**method_meta("int8"), "threshold": threshold}})


def test_configs_that_differ_in_a_method_parameter_are_gated_apart(tmp_path, capsys):
    """Two LLM.int8() thresholds are two baseline configs; a regression of one is named with its setting."""
    base = write(tmp_path / "base", [rec("fp16", None, 20.0), int8(6.0, 21.0), int8(2.0, 20.2)])
    path = tmp_path / "baseline.json"
    assert gate.gate(str(path), base, update=True) == 0
    labels = sorted(c["label"] for c in json.loads(path.read_text())["configs"])
    assert labels == ["fp16 [cpu seqlen 512 x2]", "int8 w8 [cpu seqlen 512 x2]", "int8 w8 threshold=2.0 [cpu seqlen 512 x2]"]
    capsys.readouterr()
    worse = write(tmp_path / "r", [rec("fp16", None, 20.0), int8(6.0, 21.0), int8(2.0, 21.0)])
    assert gate.gate(str(path), worse) == 1
    assert "FAILED" in (out := capsys.readouterr().out) and "int8 w8 threshold=2.0 [cpu seqlen 512 x2] ppl_wikitext2" in out
    assert out.count("REGRESSION") == 1


def test_baseline_without_method_parameters_asks_for_update(baseline, tmp_path, capsys):
    data = json.loads(baseline.read_text())
    for entry in data["configs"]:
        del entry["key"]["params"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    results = write(tmp_path / "r", [rec("fp16", None, 20.0)])
    capsys.readouterr()
    assert gate.main(["--baseline", str(tmp_path / "old.json"), "--results", results]) == 2
    line = capsys.readouterr().out.strip()
    assert line.startswith("qbench gate: error: ") and "re-create it with --update" in line and "\n" not in line


@pytest.mark.parametrize("case", ["empty", "other_model", "no_baseline", "bad_tolerance", "not_a_baseline"])
def test_bad_input_is_one_line(case, baseline, tmp_path, capsys):
    results = write(tmp_path / "r", [rec("fp16", None, 20.0)])
    args = ["--baseline", str(baseline), "--results", results]
    expected = {"empty": "no records in", "other_model": "is for model smollm2-135m; the records in",
                "no_baseline": "does not exist (create it with --update)", "bad_tolerance": "--max-ppl-increase must look like",
                "not_a_baseline": "is not a qbench gate baseline"}[case]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "runs.jsonl").write_text("")
        args[3] = str(tmp_path / "empty")
    elif case == "other_model":
        args[3] = write(tmp_path / "o", [rec("fp16", None, 20.0, model="org/other-model")])
    elif case == "no_baseline":
        args[1] = str(tmp_path / "nope.json")
    elif case == "bad_tolerance":
        args += ["--max-ppl-increase", "half a percent"]
    else:
        (tmp_path / "x.json").write_text("{}")
        args[1] = str(tmp_path / "x.json")
    capsys.readouterr()
    if case == "empty":  # once through the command itself
        out = run_gate(*args, cwd=tmp_path)
        code, text = out.returncode, out.stdout + out.stderr
    else:
        code, text = gate.main(args), capsys.readouterr().out
    assert code == 2
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbench gate: error: ") and expected in lines[0], text


@pytest.mark.slow  # two real RTN runs of SmolLM2 on the CPU; `pytest -q -m slow` (and .ci/run) runs it
def test_one_bit_less_in_rtn_fails_the_gate(smollm2, cfg_factory, data_dir, tmp_path, monkeypatch):
    from qbench import runner
    from qbench.methods import rtn

    monkeypatch.setitem(runner._MODELS, ("smollm2-135m", "cpu", "float32", False), smollm2)
    quick = ["device=cpu", "dtype=float32", "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=128", "eval.ppl.max_windows=1"]
    good = cfg_factory("method=rtn", "bits=4", *quick)
    assert runner.run(good)["status"] == "ok"
    baseline = tmp_path / "baseline.json"
    assert gate.gate(str(baseline), good.results_dir, update=True) == 0

    real = rtn.rtn_quantize
    monkeypatch.setattr(rtn, "rtn_quantize", lambda w, bits, *a, **k: real(w, bits - 1, *a, **k))  # the deliberate bug
    buggy = cfg_factory("method=rtn", "bits=4", *quick)
    assert runner.run(buggy)["status"] == "ok"
    out = run_gate("--baseline", str(baseline), "--results", buggy.results_dir, cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    lines = out.stdout.strip().splitlines()
    assert any("rtn w4 g128" in line and "REGRESSION" in line for line in lines)
    assert lines[-1].startswith("qbench gate: FAILED") and "rtn w4 g128 [cpu seqlen 128 x1] ppl_wikitext2" in lines[-1]


def test_ci_sweep_runs_every_method_and_autoround_cheaply():
    """sweeps/ci.yaml: `exclude` takes autoround out of `all`, and only its own job gets method.iters."""
    import yaml

    from qbench.paths import group_options
    from qbench.sweep import plan

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "sweeps" / "ci.yaml").read_text())
    commands, _ = plan(spec, [])
    methods = [m for c in commands for m in c[1].removeprefix("method=").split(",")]
    assert sorted(methods) == sorted(group_options("method"))  # each once
    cheap = [c for c in commands if "method.iters=5" in c]
    assert len(cheap) == 1 and cheap[0][1] == "method=autoround"


def test_a_baseline_from_before_a_parameter_matches_runs_with_its_old_value(tmp_path, capsys):
    """gguf gained method.imatrix (null = as before): a baseline key without it still gates a new run;
    a run with an importance matrix is another config."""
    def gguf(ppl, **params):
        r = rec("gguf", None, ppl)
        r["config"] = {"method": {"name": "gguf", "default_bits": None, "type": "Q4_K_M", **params}}
        return r

    path = tmp_path / "baseline.json"
    assert gate.gate(str(path), write(tmp_path / "old", [gguf(29.6)]), update=True) == 0
    assert json.loads(path.read_text())["configs"][0]["key"]["params"] == {"type": "Q4_K_M"}
    assert gate.gate(str(path), write(tmp_path / "new", [gguf(29.6, imatrix=None)])) == 0
    assert gate.gate(str(path), write(tmp_path / "imx", [gguf(29.0, imatrix="auto")])) == 1
    assert "missing (no record)" in capsys.readouterr().out
