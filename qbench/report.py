"""Comparison tables from result records: one row per config, baseline first, deltas vs baseline.

Records that differ only in their calibration seed are one row (qbench.groups): each perplexity is
their mean, with its standard deviation over the seeds (±ppl_*) and n."""

import json
from pathlib import Path

import pandas as pd

from qbench.groups import merged, seed_groups, seeds_label, with_legacy_params
from qbench.records import (CONFIG_COLUMNS, is_baseline, kv_cache_entry, kv_variant,  # noqa: F401 (latest_per_config: was here)
                            latest_per_config, method_variant, read_records)

PUBLISHED = "reports"  # the committed leaderboards: written only by `qbench report --publish`


def _eval_key_str(rec: dict) -> str:
    return json.dumps(rec.get("eval_key"), sort_keys=True)


def comparison_frame(records: list[dict], model: str | None = None) -> pd.DataFrame:
    rows = []
    recs = [merged(g) for g in seed_groups([r for r in latest_per_config(records) if model is None or r.get("model") == model])]
    baselines = {_eval_key_str(r): r for r in recs if is_baseline(r) and r.get("status") == "ok"}
    for rec in recs:
        row = {c: "" if rec.get(c) is None else str(rec.get(c)) for c in CONFIG_COLUMNS}
        seeds = [seeds_label(rec)] if rec.get("seeds") else []
        row["variant"] = " ".join(method_variant(with_legacy_params(rec)) + kv_variant(rec) + seeds)  # gguf Q4_K_M, threshold=2.0, kv int8, seeds 0-4
        row["status"] = rec.get("status")
        base = baselines.get(_eval_key_str(rec))
        for name, value in sorted(rec.get("metrics", {}).items()):
            if not name.startswith("ppl_"):
                continue
            row[name] = value
            spread = (rec.get("seed_spread") or {}).get(name)
            if spread:  # a seed group: std over its seeds, and how many
                row[f"±{name}"], row["n"] = spread["std"], spread["n"]
            if base and name in base.get("metrics", {}):
                row[f"Δ{name}"] = value - base["metrics"][name]
                row[f"Δ%{name}"] = _percent(value, base["metrics"][name])
        row["quantize_s"] = rec.get("timings", {}).get("quantize_s") or 0.0
        key = rec.get("eval_key") or {}
        row["device"] = (rec.get("env") or {}).get("device_name")
        row["windows"] = key.get("ppl_max_windows") or "all"
        row["seqlen"] = key.get("ppl_seqlen")
        row["error"] = rec.get("error") or ""  # an ok row's error cell stays empty, not nan
        row["_baseline"] = not is_baseline(rec)
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).sort_values(["windows", "seqlen", "_baseline"], kind="stable", key=lambda s: s.astype(str))
    frame = frame[_spread_beside_mean(list(frame.columns))].drop(columns="_baseline")
    if (frame["error"] == "").all():
        frame = frame.drop(columns="error")
    return frame.reset_index(drop=True)


def _spread_beside_mean(cols: list[str]) -> list[str]:
    """Column order with n after status and each ±<metric> (seed groups' std) right after its metric:
    the rows that have them need not come first."""
    out = []
    for col in [c for c in cols if c != "n" and not c.startswith("±")]:
        out += [col] + [c for c in (f"±{col}",) if c in cols] + (["n"] if col == "status" and "n" in cols else [])
    return out


def _percent(value, base):
    """The change to the baseline in percent of it; None where it has no meaning."""
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not base:
        return None
    return (value - base) / base * 100


def comparison_table(records: list[dict], model: str | None = None) -> str:
    frame = comparison_frame(records, model)
    if frame.empty:
        return "(no records)"
    for col in [c for c in frame.columns if c.startswith("Δ%")]:
        frame[col] = [("" if pd.isna(v) else f"{v:+.2f}%") for v in frame[col]]
    frame = frame.astype(object).where(frame.notna(), None)  # missing cells print empty, not nan
    table = frame.to_markdown(index=False, floatfmt=".4f", missingval="")
    synthetic = sorted({str(r["model"]) for r in records if r.get("synthetic_weights") and model in (None, r["model"])})
    if synthetic:
        table += (f"\n({', '.join(synthetic)}: synthetic weights, seeded random; their perplexity is a sanity value, "
                  "not accuracy: compare their quantize time, memory and speed)")
    for name, how in stored_weights(records, model).items():
        table += f"\n({name}: weights stored as {how}; its fp16 baseline is that model dequantized)"
    return table


def stored_weights(records: list[dict], model: str | None = None) -> dict[str, str]:
    """Model -> how its weights were stored: the records' own `weights_stored_as`, else the registry's
    (records written before the field)."""
    from qbench.packaged_models import stored_as

    out = {}
    for rec in records:
        name = str(rec.get("model"))
        how = rec.get("weights_stored_as") or stored_as(name)
        if how and model in (None, name):
            out.setdefault(name, how)
    return dict(sorted(out.items()))


# ---- the issue-3 table (qbench report --gptq-awq-table) --------------------------------------------------

GPTQ_AWQ_ORDER = {"fp16": 0, "rtn": 1, "gptq": 2, "awq": 3}  # the issue-3 methods; other records are left out
GPTQ_AWQ_HEADER = ["method", "bits", "group size", "act-order", "calib", "WikiText-2 ppl", "Δ vs fp16", "C4 ppl", "quantize s", "device"]


def _gptq_awq_row(rec: dict, base: float | None) -> list[str]:
    method_cfg = rec.get("config", {}).get("method", {})
    calib = (rec.get("quant_info") or {}).get("calib") or {}
    ppl = rec["metrics"].get("ppl_wikitext2")
    act = {"gptq": "yes" if method_cfg.get("act_order") else "no"}.get(rec["method"], "-")
    return [
        rec["method"],
        "-" if rec.get("bits") is None else str(rec["bits"]),
        "-" if rec.get("group_size") is None else str(rec["group_size"]),
        act,
        f"{calib['name']} {calib['nsamples']}x{calib['seqlen']} ({calib.get('sampling')})" if calib else "-",
        "-" if ppl is None else f"{ppl:.3f}",
        "-" if ppl is None or base is None or rec["method"] == "fp16" else f"{ppl - base:+.3f}",
        f"{rec['metrics']['ppl_c4']:.3f}" if "ppl_c4" in rec["metrics"] else "-",
        f"{(rec.get('timings') or {}).get('quantize_s', 0.0):.1f}",
        str((rec.get("env") or {}).get("device_name")),
    ]


def gptq_awq_table(records: list[dict]) -> str:
    """The issue-3 table (RTN / GPTQ / AWQ on WikiText-2, reports/gptq_awq_table.md): one row per (method, bits,
    group size, act-order), the latest ok record; fp16 baseline first. `qbench report --gptq-awq-table`."""
    latest = {}
    for rec in records:
        if rec.get("status") != "ok" or "ppl_wikitext2" not in rec.get("metrics", {}) or rec["method"] not in GPTQ_AWQ_ORDER \
                or kv_cache_entry(rec) is not None:  # weights only: a quantized KV cache is another axis
            continue
        act = bool(rec.get("config", {}).get("method", {}).get("act_order"))
        latest[(rec["method"], rec.get("bits"), rec.get("group_size"), act)] = rec
    base = next((r["metrics"]["ppl_wikitext2"] for r in latest.values() if r["method"] == "fp16"), None)
    rows = sorted(latest.values(), key=lambda r: (r.get("bits") or 0, -(r.get("group_size") or 0),
                                                  GPTQ_AWQ_ORDER[r["method"]], not r["config"]["method"].get("act_order")))
    lines = ["| " + " | ".join(GPTQ_AWQ_HEADER) + " |", "|" + "---|" * len(GPTQ_AWQ_HEADER)]
    lines += ["| " + " | ".join(_gptq_awq_row(r, base)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="qbench report", description="Comparison table of result records.")
    parser.add_argument("--results", default="results", help="results dir or runs.jsonl file (default: results)")
    parser.add_argument("--model", default=None, help="only records of this model")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--reports", default=None,
                       help="leaderboards go to <reports>/<model>/leaderboard.{md,html} (default: <results dir>/reports)")
    where.add_argument("--publish", action="store_true",
                       help=f"write the published leaderboards in {PUBLISHED}/ (the committed ones)")
    parser.add_argument("--no-leaderboard", action="store_true", help="print the table only")
    parser.add_argument("--gptq-awq-table", action="store_true",
                        help="the RTN/GPTQ/AWQ WikiText-2 table (reports/gptq_awq_table.md) instead; no leaderboards")
    args = parser.parse_args(argv)
    records = read_records(args.results)
    if not records:
        print(f"qbench report: error: no records in {args.results}")
        return 2
    table = gptq_awq_table(records) if args.gptq_awq_table else comparison_table(records, args.model)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    if not (args.no_leaderboard or args.gptq_awq_table):
        from qbench.leaderboard import write_leaderboards

        for path in write_leaderboards(records, leaderboard_dir(args), args.model):
            print(f"wrote {path}")
        if not args.publish and args.reports is None:
            print(f"(not published: qbench report --publish writes {PUBLISHED}/)")
    return 0


def leaderboard_dir(args) -> Path:
    """--publish: reports/; --reports DIR: DIR; by default <results dir>/reports, so that a local run never
    rewrites the committed leaderboards."""
    if args.publish:
        return Path(PUBLISHED)
    if args.reports is not None:
        return Path(args.reports)
    results = Path(args.results)
    return (results if results.is_dir() else results.parent) / "reports"
