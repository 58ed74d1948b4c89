"""Leaderboard reports from records: Markdown and self-contained HTML (checked in headless Chromium)."""

import re
import shutil
import subprocess
import sys

import pytest

from qbench import leaderboard

KEY = {"model": "smollm2-135m", "device": "cuda", "dtype": "float16", "ppl_datasets": ["wikitext2", "c4"],
       "ppl_seqlen": 2048, "ppl_max_windows": None, "data": {"wikitext2": "local:w", "c4": "local:c"},
       "tasks": ["piqa"], "tasks_limit": None, "tasks_data": {"piqa": "local:piqa"}, "kld": {"topk": -1, "windows": 16}}
ENV = {"qbench": "0.1.0", "git_sha": "abcdef1234567890", "torch": "2.11", "transformers": "5.1", "device_name": "NVIDIA H100"}


def rec(method, bits, gs, ppl, bpw, decode, status="ok", key=KEY, **extra):
    metrics = {"ppl_wikitext2": ppl, "ppl_c4": ppl * 1.5, "bits_per_weight": bpw, "decode_ms_per_token": decode,
               "model_bytes": 2**20 * bpw * 10, "acc_piqa": 0.6 - ppl / 1000, "kld_mean": 0.0 if method == "fp16" else ppl / 100,
               **extra}
    return {"run_id": f"{method}{bits}", "status": status, "error": None if status == "ok" else "RuntimeError: boom",
            "model": "smollm2-135m", "method": method, "bits": bits, "group_size": gs, "calib": None,
            "metrics": metrics if status == "ok" else {}, "timings": {"quantize_s": 1.0}, "eval_key": key, "env": ENV,
            "started_at": "2026-11-22T10:00:00+00:00", "finished_at": "2026-11-22T10:05:00+00:00",
            "config": {"method": {"name": method}}}


RECORDS = [rec("rtn", 4, 128, 21.0, 4.25, 0.9), rec("fp16", None, None, 20.0, 16.0, 1.2),
           rec("rtn", 3, 128, 30.0, 3.25, 0.8), rec("gptq", 4, 128, 20.5, 4.25, 0.9), rec("awq", 3, 128, 25.0, 3.25, 1.0),
           rec("gguf", None, None, 0, 0, 0, status="failed")]


def test_pareto_front():
    pts = [(16, 20), (4.25, 21), (3.25, 30), (4.25, 20.5), (3.25, 25)]
    assert leaderboard.pareto(pts) == [(3.25, 25), (4.25, 20.5), (16, 20)]


def test_markdown_baseline_first_with_deltas_and_settings(tmp_path):
    files = leaderboard.write_leaderboards(RECORDS, tmp_path)
    assert {p.name for p in files} == {"leaderboard.md", "leaderboard.html"}
    md = (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| config")]
    assert rows[0].startswith("| fp16 (baseline) | ok")
    assert [r.split(" | ")[0][2:] for r in rows] == ["fp16 (baseline)", "awq w3 g128", "gguf", "gptq w4 g128",
                                                      "rtn w3 g128", "rtn w4 g128"]
    header = md.splitlines()[[i for i, l in enumerate(md.splitlines()) if l.startswith("| config")][0]]
    for title in ("bits/w", "ppl wikitext2", "Δppl wikitext2", "ppl c4", "KLD mean", "acc piqa", "Δacc piqa", "decode ms/tok"):
        assert f" {title} |" in header
    rtn4 = next(r for r in rows if r.startswith("| rtn w4 g128"))
    assert "| 21.000 | +1.000 |" in rtn4  # ppl and its delta to the baseline
    assert "device: NVIDIA H100 (cuda, float16)" in md and "torch 2.11" in md and "zero-shot (lm-eval): piqa" in md
    assert "gguf: RuntimeError: boom" in md
    assert "(git abcdef123456)," in md


def test_settings_name_every_commit_of_a_section(tmp_path):
    later = rec("awq", 4, 128, 22.0, 4.25, 1.0)
    later["env"] = dict(ENV, git_sha="711e10c")
    leaderboard.write_leaderboards(RECORDS + [later], tmp_path)
    md = (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    assert "(git 711e10c, abcdef123456)," in md


def test_metric_that_could_not_be_measured_says_why(tmp_path):
    no_graph = rec("int8", 8, None, 20.2, 8.05, 2.0, decode_graph_error="AcceleratorError: capture failed")
    leaderboard.write_leaderboards(RECORDS + [no_graph], tmp_path)
    md = (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    assert "Not measured:\n- int8 w8: served decode (CUDA graph; eager figures stand in): AcceleratorError: capture failed" in md
    html_text = (tmp_path / "smollm2-135m" / "leaderboard.html").read_text()
    assert "<li>int8 w8: served decode (CUDA graph; eager figures stand in): AcceleratorError: capture failed</li>" in html_text


def test_sections_per_eval_setting(tmp_path):
    other = dict(KEY, device="cpu", ppl_max_windows=2)
    records = RECORDS + [rec("fp16", None, None, 19.0, 32.0, 5.0, key=other), rec("rtn", 4, 128, 22.0, 4.25, 6.0, key=other)]
    secs = leaderboard.sections(records, "smollm2-135m")
    assert len(secs) == 2 and all(s["rows"][0]["method"] == "fp16" for s in secs)


def test_html_is_self_contained(tmp_path):
    leaderboard.write_leaderboards(RECORDS, tmp_path)
    page = (tmp_path / "smollm2-135m" / "leaderboard.html").read_text()
    assert "<table class='lb'>" in page and page.count("<svg") == 2 and "class=\"front\"" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched from elsewhere


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (Debian: apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    leaderboard.write_leaderboards(RECORDS, tmp_path)
    page = tmp_path / "smollm2-135m" / "leaderboard.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]
    url = page.as_uri() + "#sort=ppl_wikitext2"
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    body_tag = re.search(r"<body[^>]*>", html).group(0)
    assert 'data-ready="1"' in body_tag and "data-js-error" not in body_tag, body_tag  # the script ran, no JS error
    body = html[html.index("<tbody>"):html.index("</tbody>")]
    order = re.findall(r"<tr[^>]*><td data-v=\"([^\"]*)\"", body)
    # sorted by ppl (the #sort hash ran the sorter), the baseline kept first, the failed run (no ppl) last
    assert order == ["fp16 (baseline)", "gptq w4 g128", "rtn w4 g128", "awq w3 g128", "rtn w3 g128", "gguf"]
    assert html.count("<circle") == 10 and html.count('class="pt pareto"') >= 3
    shot = tmp_path / "shot.png"
    out = subprocess.run([_chromium(), *flags, "--window-size=1400,1200", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a page with a table and plots, not a blank one


def test_report_subcommand_writes_leaderboards(tmp_path):
    import json

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = subprocess.run([sys.executable, "-m", "qbench.cli", "report", "--results", "results", "--reports", "reports"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "reports" / "smollm2-135m" / "leaderboard.md").is_file()
    assert (tmp_path / "reports" / "smollm2-135m" / "leaderboard.html").is_file()


def test_wandb_sweep_table_and_html_artifact(tmp_path, cfg_factory, monkeypatch):
    pytest.importorskip("wandb")
    from qbench.records import append_record
    from qbench.wandb_log import log_sweep, sweep_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_factory("wandb.mode=offline", f"results_dir={tmp_path}")
    for r in RECORDS:
        append_record(str(tmp_path), dict(r, sweep_id="multirun-x" if r["method"] != "fp16" else "earlier"))
    assert [r["method"] for r in sweep_records(str(tmp_path), "multirun-x")][0] == "fp16"  # its baseline, from earlier
    log_sweep(cfg, "multirun-x")
    assert (tmp_path / "sweep-reports" / "multirun-x" / "smollm2-135m" / "leaderboard.html").is_file()
    runs = list((tmp_path / "wandb-files" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def with_method(record, **params):
    """record with the method settings a run of conf/method/<name>.yaml would store (defaults + params)."""
    from qbench.sweep import method_meta

    return {**record, "config": {"method": {**method_meta(record["method"]), **params}}}


def test_method_variant_names_choices_and_non_defaults():
    from qbench.records import method_variant

    assert method_variant(with_method(rec("int8", 8, None, 21.0, 8.0, 1.0))) == []
    assert method_variant(with_method(rec("int8", 8, None, 21.0, 8.0, 1.0), threshold=2.0)) == ["threshold=2.0"]
    assert method_variant(with_method(rec("gguf", None, None, 21.0, 5.0, 1.0), type="Q5_K")) == ["Q5_K"]
    gptq = method_variant(with_method(rec("gptq", 4, 128, 21.0, 4.25, 1.0), act_order=False, damp_percent=0.1))
    assert gptq == ["act_order=off", "damp_percent=0.1"]


def test_report_table_tells_variants_apart():
    """Two runs of one method that differ only in a method parameter are two labelled rows."""
    from qbench.report import comparison_frame

    records = [rec("fp16", None, None, 20.0, 16.0, 1.0),
               with_method(rec("int8", 8, None, 21.0, 8.0, 1.0)),
               with_method(rec("int8", 8, None, 20.2, 8.0, 1.0), threshold=2.0)]
    frame = comparison_frame(records)
    assert list(frame["variant"]) == ["", "", "threshold=2.0"]
    assert list(frame["ppl_wikitext2"]) == [20.0, 21.0, 20.2]
    assert leaderboard.run_label(records[1]) == "int8 w8" and leaderboard.run_label(records[2]) == "int8 w8 threshold=2.0"


def test_report_table_tells_forced_kernels_apart():
    """A kernel=torch cross-check of a kernel=auto run is a row of its own, labelled, in the report, the
    leaderboard and the gate; kernel=auto records keep the labels and gate keys they had."""
    from qbench.gate import config_key, label
    from qbench.report import comparison_frame

    auto = with_method(rec("fp8", 8, None, 22.169, 8.0, 1.0), activations="dynamic")
    torch_run = dict(with_method(rec("fp8", 8, None, 22.150, 8.0, 1.0), activations="dynamic"))
    torch_run["config"] = {**torch_run["config"], "kernel": "torch"}
    auto["config"] = {**auto["config"], "kernel": "auto"}
    frame = comparison_frame([rec("fp16", None, None, 21.6, 16.0, 1.0), auto, torch_run])
    assert list(frame["ppl_wikitext2"]) == [21.6, 22.169, 22.150]
    assert list(frame["variant"])[1:] == ["e4m3 tensor dynamic", "e4m3 tensor dynamic kernel=torch"]
    assert leaderboard.run_label(torch_run).endswith("kernel=torch")
    assert "kernel" not in config_key(auto) and config_key(torch_run)["kernel"] == "torch"
    assert "kernel=torch" in label(config_key(torch_run)) and "kernel" not in label(config_key(auto))


def test_wandb_run_is_named_by_its_configuration(tmp_path, monkeypatch):
    """A W&B run's name says which configuration it is (method, width, variant), then the run id."""
    import types

    from omegaconf import OmegaConf

    from qbench.wandb_log import log_run

    seen = {}

    class Run:
        id, summary = "abc", {}

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: seen.update(kw) or Run(), Settings=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = OmegaConf.create({"results_dir": str(tmp_path), "wandb": {"mode": "offline", "project": "qbench",
                                                                    "entity": None, "group": None}})
    record = dict(with_method(rec("gguf", None, None, 21.0, 5.5, 1.0), type="Q5_K"), run_id="r1", sweep_id=None)
    log_run(cfg, record)
    assert seen["name"] == "gguf Q5_K r1" and record["wandb_run"] == "abc"


# ---- issue 29 -------------------------------------------------------------------------------------------

def _write_records(folder, records):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_by_default_never_touches_the_published_reports(tmp_path):
    """Local numbers go under the results dir; reports/ changes only with --publish."""
    _write_records(tmp_path / "results", RECORDS)
    published = tmp_path / "reports" / "smollm2-135m" / "leaderboard.md"
    published.parent.mkdir(parents=True)
    published.write_text("the committed H200 leaderboard\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "qbench.cli", "report", "--results", "results", *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)

    out = run()
    assert out.returncode == 0, out.stderr
    assert published.read_text() == "the committed H200 leaderboard\n"
    assert (tmp_path / "results" / "reports" / "smollm2-135m" / "leaderboard.md").is_file()
    assert "--publish" in out.stdout
    out = run("--publish")
    assert out.returncode == 0, out.stderr
    assert published.read_text().startswith("# Leaderboard: smollm2-135m")


def test_terminal_table_has_percent_deltas_and_no_nan():
    from qbench.report import comparison_table

    table = comparison_table(RECORDS)
    header, rows = table.splitlines()[0], table.splitlines()[2:]
    assert "Δppl_wikitext2" in header and "Δ%ppl_wikitext2" in header
    rtn4 = next(r for r in rows if "| rtn " in r and "|      4 |" in r)
    assert "+5.00%" in rtn4  # 21.0 against the baseline's 20.0
    assert "nan" not in table  # the ok rows' error cells and the failed row's metrics are empty


def test_fits_gpu_column_only_for_gpu_sections(tmp_path):
    cpu = dict(KEY, device="cpu")
    records = [rec("fp16", None, None, 20.0, 16.0, 1.0, key=cpu, fits_gpu="T4"),
               rec("rtn", 4, 128, 21.0, 4.25, 1.0, key=cpu, fits_gpu="T4")]
    leaderboard.write_leaderboards(records, tmp_path)
    assert "fits GPU" not in (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    gpu = [dict(r, eval_key=KEY) for r in records]
    leaderboard.write_leaderboards(gpu, tmp_path)
    assert "fits GPU" in (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()


def test_plot_labels_do_not_overlap():
    # a cluster of near-identical points (the 4-bit formats of one model) and a few apart
    points = [(4.25 + i * 0.01, 21.0 + i * 0.05, f"method{i} w4 g128") for i in range(8)]
    points += [(16.0, 20.0, "fp16 (baseline)"), (3.25, 30.0, "rtn w3 g128"), (8.0, 20.3, "int8 w8")]
    svg = leaderboard.svg_plot(points, "bits", "ppl", "t")
    labels = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" class="lbl" text-anchor="(\w+)">([^<]*)</text>', svg)
    boxes = [leaderboard.label_box(float(x), float(y), anchor, text) for x, y, anchor, text in labels]
    assert svg.count("<circle") == len(points) and len(labels) >= 6
    assert {"fp16 (baseline)", "rtn w3 g128", "int8 w8"} <= {t for *_, t in labels}
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_zero_shot_columns_show_stderr_and_an_average(tmp_path):
    key = dict(KEY, tasks=["piqa", "hellaswag"], tasks_data={"piqa": "local:p", "hellaswag": "local:h"})
    tasks = {"acc_hellaswag": 0.30, "acc_stderr_hellaswag": 0.0046, "acc_norm_hellaswag": 0.35,
             "acc_norm_stderr_hellaswag": 0.0048, "acc_stderr_piqa": 0.0113}
    recs = [rec("fp16", None, None, 20.0, 16.0, 1.2, key=key, **tasks),
            rec("rtn", 4, 128, 21.0, 4.25, 0.9, key=key, **dict(tasks, acc_hellaswag=0.28))]
    leaderboard.write_leaderboards(recs, tmp_path)
    md = (tmp_path / "smollm2-135m" / "leaderboard.md").read_text()
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| config"))
    assert " avg acc (2 tasks) |" in header and " Δavg acc (2 tasks) |" in header
    base = next(l for l in lines if l.startswith("| fp16 (baseline)"))
    assert "| 0.5800 ± 0.0113 |" in base and "| 0.3000 ± 0.0046 |" in base and "| 0.3500 ± 0.0048 |" in base
    assert "| 0.4400 |" in base  # (0.58 + 0.30) / 2
    rtn = next(l for l in lines if l.startswith("| rtn w4"))
    assert "| 0.4295 | -0.0105 |" in rtn  # (0.579 + 0.28) / 2, and its delta


def test_speed_path_of_records_from_before_the_served_path_is_eager():
    old = rec("rtn", 4, 128, 22.0, 4.25, 6.0, tok_s_b1=50.0)
    served = rec("rtn", 4, 128, 22.0, 4.25, 6.0, tok_s_b1=300.0, speed_path="cuda_graph")
    assert leaderboard._values(old)["speed_path"] == "eager"
    assert leaderboard._values(served)["speed_path"] == "cuda_graph"
    assert "speed_path" not in leaderboard._values(rec("rtn", 4, 128, 22.0, 4.25, 6.0))  # no speed measured
