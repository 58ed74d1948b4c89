"""The published leaderboard of one model: reports/<model>/leaderboard.md and a self-contained
leaderboard.html (sortable table; perplexity vs bits per weight and vs decode latency, Pareto front
highlighted), rendered from the result records only.

A section of a shape model (synthetic weights, qbench/shapes.py) ranks nothing on accuracy: its
perplexity, KLD and zero-shot columns are titled "(sanity)", carry no Δ, cannot be sorted, and its
plot is decode latency vs bits per weight instead of perplexity.

One section per eval setting (records compare only within one eval key), newest first; in each the
baseline comes first and Δ columns are differences to it. Records that differ only in their
calibration seed are one row (qbench.groups): "26.817 ± 0.123 (n=5)" is the mean over the seeds, its
sample standard deviation and n; Δ columns and plots use the mean. The HTML needs no network: inline CSS,
inline SVG plots drawn here, and a few lines of JavaScript for sorting (click a header, or open the
page with #sort=<column> / #sort=-<column>).
"""

import html
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

from qbench.groups import members, merged, seed_groups, seeds_label, with_legacy_params
from qbench.records import is_baseline, kv_variant, latest_per_config, method_variant

# (metric key, column title, format, Δ vs baseline). Columns appear when any row has the metric.
FIXED = [
    ("bits_per_weight", "bits/w", "{:.2f}", False),
    ("model_mib", "size MiB", "{:.1f}", False),
    ("kv_mib_8k", "KV MiB 8k", "{:.1f}", False),  # the KV cache at 8192 tokens, batch 1 (kv_cache=)
]
PER_DATASET = [("ppl_{}", "ppl {}", "{:.3f}", True)]
KLD = [("kld_mean", "KLD mean", "{:.4f}", False), ("kld_p99", "KLD p99", "{:.3f}", False),
       ("top1_agree", "top-1 agree", "{:.3f}", False)]
# Served speed (speed_path cuda_graph: static KV cache, each decode step a CUDA-graph replay) first; eager
# (a Python loop of forwards) secondary. Records from before the served path (no speed_path) carry the
# eager figures under the served names and the graph step as decode_ms_per_token_graph.
SPEED = [("speed_path", "speed path", "{}", False), ("prefill_ms", "prefill ms", "{:.1f}", False),
         ("prefill_ms_8192", "prefill ms 8k", "{:.1f}", False),
         ("vram_peak_prefill_8192_gib", "prefill 8k VRAM GiB", "{:.2f}", False),
         ("decode_ms_per_token", "decode ms/tok", "{:.2f}", False),
         ("decode_ms_per_token_graph", "decode ms/tok graph", "{:.2f}", False),
         ("decode_bandwidth_fraction", "b1 decode / copy BW", "{:.2f}", False),
         ("tok_s_b1", "tok/s b1", "{:.0f}", False), ("tok_s_b8", "tok/s b8", "{:.0f}", False),
         ("tok_s_b32", "tok/s b32", "{:.0f}", False), ("eager_decode_ms_per_token", "eager decode ms/tok", "{:.2f}", False),
         ("eager_tok_s_b1", "eager tok/s b1", "{:.0f}", False), ("vram_peak_run_gib", "VRAM GiB", "{:.2f}", False),
         ("usd_per_mtok_b1", "$/1M tok b1", "{:.3f}", False), ("usd_per_mtok_b32", "$/1M tok b32", "{:.4f}", False),
         ("fits_gpu", "fits GPU", "{}", False), ("quantize_s", "quantize s", "{:.1f}", False),
         ("vram_quantize_peak_gib", "quantize VRAM GiB", "{:.2f}", False)]
TASK_METRICS = ("acc", "acc_norm", "perplexity")
SANITY = " (sanity)"  # title suffix of an accuracy column of synthetic weights
GPU_ONLY = ("fits_gpu",)  # columns of GPU sections only: a CPU run's float32 size says nothing of a GPU


def model_slug(model: str) -> str:
    """The model's folder name: shape:llama-3-8b -> llama-3-8b-shape, org/name -> org__name."""
    if model.startswith("shape:"):
        model = model[len("shape:"):] + "-shape"
    return re.sub(r"[^A-Za-z0-9._-]+", "__", model.strip("/")) or "model"


def _key_str(rec: dict) -> str:
    return json.dumps(rec.get("eval_key"), sort_keys=True)


def _values(rec: dict) -> dict:
    values = dict(rec.get("metrics") or {})
    if "model_bytes" in values:
        values["model_mib"] = values["model_bytes"] / 2**20
    if "kv_bytes_8k" in values:
        values["kv_mib_8k"] = values["kv_bytes_8k"] / 2**20
    values["quantize_s"] = (rec.get("timings") or {}).get("quantize_s")
    if "tok_s_b1" in values and "speed_path" not in values:
        values["speed_path"] = "eager"  # measured before the served path: its tok/s are eager figures
    tasks = (rec.get("eval_key") or {}).get("tasks") or []
    accs = [values.get(f"acc_{t}") for t in tasks]
    if tasks and all(isinstance(a, (int, float)) for a in accs):
        values["avg_acc"] = sum(accs) / len(accs)  # the plain mean of lm-eval's acc over the section's tasks
    return values


def columns(records: list[dict]) -> list[tuple]:
    """The columns of one section: config, then every metric some record has."""
    key = records[0].get("eval_key") or {}
    have = set().union(*(_values(r) for r in records))
    fixed = [c for c in FIXED if c[0] in have]
    cols = list(fixed)
    for name in key.get("ppl_datasets", []):
        cols += [(k.format(name), t.format(name), f, d) for k, t, f, d in PER_DATASET if k.format(name) in have]
    cols += [c for c in KLD if c[0] in have]
    for task in key.get("tasks", []):
        for metric in TASK_METRICS:
            if f"{metric}_{task}" in have:
                fmt = "{:.3f}" if metric == "perplexity" else "{:.4f}"
                cols.append((f"{metric}_{task}", f"{metric} {task}", fmt, True))
    if "avg_acc" in have:
        cols.append(("avg_acc", f"avg acc ({len(key['tasks'])} tasks)", "{:.4f}", True))
    if key.get("synthetic_weights"):  # random weights: accuracy columns say the model runs, and rank nothing
        cols = cols[:len(fixed)] + [(k, t + SANITY, f, False) for k, t, f, _ in cols[len(fixed):]]
    return cols + [c for c in SPEED if c[0] in have and any(_values(r).get(c[0]) is not None for r in records)
                   and (c[0] not in GPU_ONLY or key.get("device") == "cuda")]


def run_label(rec: dict) -> str:
    """A record's configuration in a few words: "gguf Q4_K_M", "gptq w4 g128 c4", "int8 w8 threshold=2.0"."""
    if is_baseline(rec):
        return "fp16 (baseline)"
    parts = [rec["method"]] + ([f"w{rec['bits']}"] if rec.get("bits") is not None else [])
    parts += method_variant(with_legacy_params(rec))
    if rec.get("group_size") is not None:
        parts.append(f"g{rec['group_size']}")
    if rec.get("calib"):
        parts.append(rec["calib"])
    parts += kv_variant(rec)
    if rec.get("seeds"):
        parts.append(seeds_label(rec))
    return " ".join(parts)


def sections(records: list[dict], model: str) -> list[dict]:
    """Per eval key: {key, rows (baseline first), baseline, cols}, newest eval key first."""
    recs = [r for r in latest_per_config(records) if r.get("model") == model and r.get("eval_key")]
    recs = [merged(g) for g in seed_groups(recs)]  # one row per seed group
    groups: dict[str, list] = {}
    for rec in recs:
        groups.setdefault(_key_str(rec), []).append(rec)
    out = []
    for rows in groups.values():
        rows.sort(key=lambda r: (not is_baseline(r), str(r.get("method")), r.get("bits") or 0,
                                 str(r.get("group_size"))))
        base = next((r for r in rows if is_baseline(r) and r.get("status") == "ok"), None)
        out.append({"key": rows[0]["eval_key"], "rows": rows, "baseline": base, "cols": columns(rows),
                    "latest": max(str(r.get("finished_at") or r.get("started_at")) for r in rows)})
    return sorted(out, key=lambda s: s["latest"], reverse=True)


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _delta(rec: dict, base: dict | None, key: str):
    if base is None or rec is base:
        return None
    a, b = _values(rec).get(key), _values(base).get(key)
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _with_stderr(text: str, values: dict, key: str, fmt: str) -> str:
    """'0.6234 ± 0.0113' for a zero-shot metric whose record carries lm-eval's stderr (acc_stderr_piqa)."""
    stderr = _stderr(values, key)
    if stderr is None or text == "–":
        return text
    return f"{text} ± {_fmt(stderr, fmt)}"


def _stderr(values: dict, key: str):
    """lm-eval's stderr of a zero-shot metric (acc_piqa -> acc_stderr_piqa), None for other metrics."""
    metric, _, task = key.partition("_")
    if metric == "acc" and task.startswith("norm_"):
        metric, task = "acc_norm", task[len("norm_"):]
    stderr = values.get(f"{metric}_stderr_{task}")
    return stderr if metric in TASK_METRICS and isinstance(stderr, (int, float)) else None


def _cell(rec: dict, values: dict, key: str, fmt: str) -> str:
    """A metric's cell: the value; for a seed group '± std (n=5)', with a zero-shot metric's lm-eval
    stderr inside the brackets (the single-record cell's '± stderr' would read as the seeds' spread)."""
    text = _fmt(values.get(key), fmt)
    spread = (rec.get("seed_spread") or {}).get(key)
    if spread is None or text == "–":
        return _with_stderr(text, values, key, fmt)
    std = "" if spread["std"] is None else f" ± {_fmt(spread['std'], fmt)}"
    stderr = _stderr(values, key)
    tail = "" if stderr is None else f"; lm-eval stderr {_fmt(stderr, fmt)}"
    return f"{text}{std} (n={spread['n']}{tail})"


def table_rows(section: dict) -> tuple[list[str], list[list[tuple]]]:
    """Header titles and rows of (text, sort value) cells."""
    header = ["config", "status"]
    for key, title, fmt, delta in section["cols"]:
        header.append(title)
        if delta:
            header.append(f"Δ{title}")
    rows = []
    for rec in section["rows"]:
        values = _values(rec)
        cells = [(run_label(rec), run_label(rec)), (rec.get("status"), rec.get("status"))]
        for key, title, fmt, delta in section["cols"]:
            cells.append((_cell(rec, values, key, fmt), values.get(key)))
            if delta:
                d = _delta(rec, section["baseline"], key)
                cells.append(("" if d is None else _fmt(d, "{:+" + fmt[2:]), d))
        rows.append(cells)
    return header, rows


def _envs(section: dict) -> dict:
    env = {}
    for rec in members(section["rows"]):
        for k, v in (rec.get("env") or {}).items():
            env.setdefault(k, set()).add(str(v))
    return {k: ", ".join(sorted(v)) for k, v in env.items()}


def settings_lines(section: dict) -> list[str]:
    key, env = section["key"], _envs(section)
    windows = key.get("ppl_max_windows") or "all"
    shas = ", ".join(sha[:12] for sha in env.get("git_sha", "?").split(", "))  # each commit of the section
    lines = [f"device: {env.get('device_name', '?')} ({key.get('device')}, {key.get('dtype')})",
             f"versions: qbench {env.get('qbench', '?')} (git {shas}), torch {env.get('torch', '?')}, "
             f"transformers {env.get('transformers', '?')}" + (f", triton {env['triton']}" if "triton" in env else ""),
             f"perplexity: {', '.join(key.get('ppl_datasets', []))}, seqlen {key.get('ppl_seqlen')}, windows {windows}; "
             f"data {json.dumps(key.get('data'))}"]
    synthetic = key.get("synthetic_weights")
    if synthetic:
        lines.append(f"synthetic weights: the {synthetic['shape']} architecture with seeded random weights (seed "
                     f"{synthetic['seed']}): quantize time, memory, speed and cost are the real shape's; perplexity "
                     "and the other (sanity) columns only say that the model runs, rank nothing, and are not accuracy")
    if key.get("tasks"):
        lines.append(f"zero-shot (lm-eval): {', '.join(key['tasks'])}, limit {key.get('tasks_limit') or 'none'}; "
                     f"data {json.dumps(key.get('tasks_data'))}")
    if "kld" in key:
        how = "full vocabulary" if key["kld"]["topk"] < 0 else f"baseline top-{key['kld']['topk']} log-probs (lower bound)"
        lines.append(f"KLD vs the baseline over the first {key['kld']['windows'] or 'all'} WikiText-2 windows, {how}")
    if key.get("speed"):
        lines.append(f"speed: {json.dumps(key['speed'])}" + ("" if key.get("device") == "cuda" else " — measured on a CPU (tiny)"))
    hardware = sorted({(r.get("config") or {}).get("hardware", {}).get("name") for r in section["rows"]} - {None})
    prices = sorted({(r.get("config") or {}).get("hardware", {}).get("usd_per_hour") for r in section["rows"]} - {None})
    if hardware and any("usd_per_mtok_b1" in r.get("metrics", {}) for r in section["rows"]):
        lines.append(f"cost: hardware={', '.join(hardware)} at ${', '.join(map(str, prices))}/GPU-hour, an illustrative "
                     "on-demand price from conf/hardware (edit it to yours); fits GPU = smallest listed GPU holding "
                     "weights + KV cache")
    if any(r.get("seeds") for r in section["rows"]):
        lines.append("seeds a-b: one config run with each calibration seed (calib.seed); a ± s (n=k) is the mean over "
                     "its k seeds and their sample standard deviation (a zero-shot cell's lm-eval stderr: the seeds' mean)")
    recs = members(section["rows"])
    dates = sorted(str(r.get("finished_at") or r.get("started_at"))[:10] for r in recs)
    lines.append(f"records: {len(recs)}, run {dates[0]} .. {dates[-1]}")
    return lines


ERROR_COLUMNS = {"decode_graph_error": "served decode (CUDA graph; eager figures stand in)"}  # <metric>_error -> the column it leaves empty


def not_measured(section: dict) -> list[str]:
    """'<run>: <column>: <reason>' for each metric a run could not measure: it says why in <metric>_error
    (decode_graph_error: the decode step could not be captured in a CUDA graph)."""
    return [f"{run_label(r)}: {ERROR_COLUMNS.get(k, k[:-len('_error')])}: {v}" for r in section["rows"]
            for k, v in sorted((r.get("metrics") or {}).items()) if k.endswith("_error")]


def render_markdown(model: str, secs: list[dict], generated: str) -> str:
    out = [f"# Leaderboard: {model}", "", f"Rendered by `qbench report` from the result records on {generated}. "
           "Δ columns: difference to the baseline of the same section.", ""]
    for i, section in enumerate(secs, 1):
        out += [f"## Eval setting {i}", ""] + [f"- {line}" for line in settings_lines(section)] + [""]
        header, rows = table_rows(section)
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" if j < 2 else "---:" for j in range(len(header))) + "|")
        out += ["| " + " | ".join(str(text) for text, _ in cells) + " |" for cells in rows]
        errors = [f"- {run_label(r)}: {r.get('error')}" for r in section["rows"] if r.get("error")]
        out += ([""] + ["Failed runs:"] + errors if errors else [])
        missing = [f"- {line}" for line in not_measured(section)]
        out += ([""] + ["Not measured:"] + missing if missing else []) + [""]
    return "\n".join(out)


# ------------------------------------------------------------------ plots (inline SVG)

def pareto(points: list[tuple]) -> list[tuple]:
    """The points no other point beats on both x and y (lower is better), sorted by x."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)]
    return sorted(front)


def svg_plot(points: list[tuple], xlabel: str, ylabel: str, title: str, width: int = 560, height: int = 380) -> str:
    """Scatter of (x, y, label) with y on a log scale and the Pareto front drawn and highlighted."""
    pts = [(float(x), float(y), label) for x, y, label in points
           if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y > 0 and math.isfinite(x) and math.isfinite(y)]
    left, right, top, bottom = 64, 16, 32, 48
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{html.escape(title)}</text>']
    if not pts:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [math.log10(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    padx, pady = (x1 - x0) * 0.08 or 0.5, (y1 - y0) * 0.08 or 0.05
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(ly):
        return height - bottom - (ly - y0) / (y1 - y0) * (height - top - bottom)

    parts.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>')
    for i in range(5):
        xv, lyv = x0 + (x1 - x0) * (i + 0.5) / 5, y0 + (y1 - y0) * (i + 0.5) / 5
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">{xv:.3g}</text>')
        parts.append(f'<text x="{left - 6}" y="{sy(lyv) + 4:.1f}" text-anchor="end" class="tick">{10 ** lyv:.3g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{html.escape(ylabel)} (log scale)</text>')
    front = pareto([(x, y) for x, y, _ in pts])
    if len(front) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(math.log10(y)):.1f}" for x, y in front)
        parts.append(f'<polyline points="{path}" class="front"/>')
    pixels = [(sx(x), sy(math.log10(y)), label) for x, y, label in pts]
    frame = (left, top, width - right, height - bottom)
    spots = place_labels(pixels, frame, first=[i for i, (x, y, _) in enumerate(pts) if (x, y) in front])
    for (x, y, label), (px, py, _), spot in zip(pts, pixels, spots):
        cls = "pt pareto" if (x, y) in front else "pt"
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" class="{cls}">'
                     f'<title>{html.escape(label)}: {x:.4g}, {y:.4g}</title></circle>')
        if spot is not None:  # no free spot: the point's tooltip still names it
            parts.append(f'<text x="{spot[0]:.1f}" y="{spot[1]:.1f}" class="lbl" text-anchor="{spot[2]}">'
                         f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


LABEL_HEIGHT, LABEL_CHAR_WIDTH = 11.0, 5.6  # the 10px label font: line height, mean character width
LABEL_OFFSETS = (-6, 14, -18, 26, -30, 38, -42, 50)  # baselines tried, above the point first, then below, further out


def label_box(x: float, y: float, anchor: str, text: str) -> tuple:
    """(x0, y0, x1, y1) a label drawn at baseline (x, y) covers."""
    w = len(text) * LABEL_CHAR_WIDTH
    x0 = x - w if anchor == "end" else x
    return x0, y - LABEL_HEIGHT + 2, x0 + w, y + 2


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(pixels: list[tuple], frame: tuple, first: list[int] = ()) -> list[tuple | None]:
    """(x, y, anchor) for each point's label (pixels: (px, py, text)), inside frame and clear of the labels
    placed before it (those of `first`, the Pareto points, go first); None where no spot is free."""
    spots: list = [None] * len(pixels)
    taken: list[tuple] = []
    for i in list(first) + [i for i in range(len(pixels)) if i not in first]:
        px, py, text = pixels[i]
        sides = ("end", "start") if px > frame[0] + (frame[2] - frame[0]) * 0.6 else ("start", "end")
        for dy in LABEL_OFFSETS:
            for anchor in sides:  # right-hand points label to their left first
                spot = (px - 7 if anchor == "end" else px + 7, py + dy, anchor)
                box = label_box(*spot, text)
                inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
                if inside and not any(_overlaps(box, t) for t in taken):
                    spots[i] = spot
                    break
            if spots[i] is not None:
                taken.append(label_box(*spots[i], text))
                break
    return spots


def section_plots(section: dict) -> list[str]:
    key = section["key"]
    ppl = next((f"ppl_{d}" for d in key.get("ppl_datasets", [])), None)
    ok = [r for r in section["rows"] if r.get("status") == "ok"]
    if key.get("synthetic_weights"):
        return synthetic_plots(ok)
    if ppl is None:
        return []
    plots = []
    for xkey, xlabel in (("bits_per_weight", "bits per weight (scales and zeros included)"),
                         ("decode_ms_per_token", "decode latency, ms per token (batch 1)")):
        points = [(_values(r).get(xkey), _values(r).get(ppl), run_label(r)) for r in ok]
        if any(isinstance(x, (int, float)) for x, _, _ in points):
            plots.append(svg_plot(points, xlabel, ppl, f"{ppl} vs {xkey} (Pareto front highlighted)"))
    return plots


def synthetic_plots(ok: list[dict]) -> list[str]:
    """Synthetic weights: decode latency (served; an older record's CUDA-graph figure where it has one) vs
    bits per weight, the speed/size front; their perplexity is no axis to rank on."""
    ykey = "decode_ms_per_token_graph" if any(_values(r).get("decode_ms_per_token_graph") for r in ok) \
        else "decode_ms_per_token"
    points = [(_values(r).get("bits_per_weight"), _values(r).get(ykey), run_label(r)) for r in ok]
    if not any(isinstance(y, (int, float)) for _, y, _ in points):
        return []
    return [svg_plot(points, "bits per weight (scales and zeros included)", ykey,
                     f"{ykey} vs bits_per_weight (Pareto front highlighted)")]


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24}
table{border-collapse:collapse;font-size:13px;margin:12px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f5f7;cursor:pointer;user-select:none} th.asc:after{content:" ▲"} th.desc:after{content:" ▼"}
td:first-child,th:first-child,td:nth-child(2){text-align:left}
tr.baseline{background:#eef6ee;font-weight:600} tr.failed{color:#a40e26}
.plots{display:flex;flex-wrap:wrap;gap:16px} svg.plot{border:1px solid #d0d7de;background:#fff}
svg .frame{fill:none;stroke:#8c959f} svg .tick,svg .lbl{font-size:10px;fill:#57606a} svg .title{font-size:13px;font-weight:600}
svg .pt{fill:#6e7781} svg .pt.pareto{fill:#d1242f} svg .front{fill:none;stroke:#d1242f;stroke-width:2}
ul.settings{font-size:13px;color:#57606a}
"""

SCRIPT = """
window.addEventListener('error', function (e) { document.body.setAttribute('data-js-error', String(e.message)); });
function sortTable(table, col, desc) {
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var base = rows.filter(function (r) { return r.classList.contains('baseline'); });
  var rest = rows.filter(function (r) { return !r.classList.contains('baseline'); });
  rest.sort(function (a, b) {
    var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
    var nx = parseFloat(x), ny = parseFloat(y);
    var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
    if (x === '' && y !== '') return 1; if (y === '' && x !== '') return -1;
    return desc ? -c : c;
  });
  base.concat(rest).forEach(function (r) { body.appendChild(r); });
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    th.classList.remove('asc', 'desc'); if (i === col) th.classList.add(desc ? 'desc' : 'asc');
  });
}
document.querySelectorAll('table.lb').forEach(function (table) {
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    if (th.classList.contains('sanity')) return;  // synthetic weights: no ranking on accuracy
    th.addEventListener('click', function () { sortTable(table, i, th.classList.contains('asc')); });
  });
  var m = /#sort=(-?)(.+)$/.exec(decodeURIComponent(location.hash));
  if (m) Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    if (th.getAttribute('data-key') === m[2] && !th.classList.contains('sanity')) sortTable(table, i, m[1] === '-');
  });
});
document.body.setAttribute('data-ready', '1');
"""


def render_html(model: str, secs: list[dict], generated: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>qbench leaderboard: {e(model)}</title><style>{STYLE}</style></head><body>",
           f"<h1>Leaderboard: {e(model)}</h1><p>Rendered by <code>qbench report</code> from the result records on "
           f"{e(generated)}. Click a column header to sort (the baseline stays first); Δ columns are differences "
           "to the baseline of the same section.</p>"]
    for i, section in enumerate(secs, 1):
        out.append(f"<h2>Eval setting {i}</h2><ul class='settings'>")
        out += [f"<li>{e(line)}</li>" for line in settings_lines(section)]
        out.append("</ul>")
        header, rows = table_rows(section)
        keys = ["config", "status"]
        for key, _, _, delta in section["cols"]:
            keys += [key, f"d_{key}"] if delta else [key]
        out.append("<table class='lb'><thead><tr>" +
                   "".join(f"<th data-key='{e(k)}'{sanity_class(h)}>{e(h)}</th>" for k, h in zip(keys, header)) +
                   "</tr></thead><tbody>")
        for rec, cells in zip(section["rows"], rows):
            cls = "baseline" if rec is section["baseline"] else ("failed" if rec.get("status") != "ok" else "")
            tds = "".join(f"<td data-v='{e('' if v is None else str(v))}'>{e(str(t))}</td>" for t, v in cells)
            title = f" title='{e(str(rec.get('error')))}'" if rec.get("error") else ""
            out.append(f"<tr class='{cls}'{title}>{tds}</tr>")
        out.append("</tbody></table>")
        missing = not_measured(section)
        if missing:
            out.append("<p>Not measured:</p><ul class='missing'>" + "".join(f"<li>{e(m)}</li>" for m in missing) + "</ul>")
        plots = section_plots(section)
        if plots:
            out.append("<div class='plots'>" + "".join(plots) + "</div>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


def sanity_class(title: str) -> str:
    return " class='sanity' title='synthetic weights: a sanity value, not sortable'" if title.endswith(SANITY) else ""


def write_leaderboards(records: list[dict], out_dir: str | Path = "reports", model: str | None = None) -> list[Path]:
    """Render reports/<model>/leaderboard.{md,html} for each model (or one); returns the files written."""
    models = [model] if model else sorted({r["model"] for r in records if r.get("model") and r.get("eval_key")})
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    written = []
    for name in models:
        secs = sections(records, name)
        if not secs:
            continue
        folder = Path(out_dir) / model_slug(name)
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in (("leaderboard.md", render_markdown(name, secs, generated)),
                            ("leaderboard.html", render_html(name, secs, generated))):
            (folder / fname).write_text(text)
            written.append(folder / fname)
    return written
