"""The issue-3 table (RTN / GPTQ / AWQ on WikiText-2) from result records.

    python -m qbench.bench.gptq_awq_table RESULTS_DIR [--out reports/gptq_awq_table.md]
One row per (method, bits, group size, act-order): the latest ok record; fp16 baseline first.
"""

import argparse
from pathlib import Path

from qbench.records import read_records

ORDER = {"fp16": 0, "rtn": 1, "gptq": 2, "awq": 3}  # the issue-3 methods; other records are left out
HEADER = ["method", "bits", "group size", "act-order", "calib", "WikiText-2 ppl", "Δ vs fp16", "C4 ppl", "quantize s", "device"]


def _row(rec: dict, base: float | None) -> list[str]:
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


def table(records: list[dict]) -> str:
    latest = {}
    for rec in records:
        if rec.get("status") != "ok" or "ppl_wikitext2" not in rec.get("metrics", {}) or rec["method"] not in ORDER:
            continue
        act = bool(rec.get("config", {}).get("method", {}).get("act_order"))
        latest[(rec["method"], rec.get("bits"), rec.get("group_size"), act)] = rec
    base = next((r["metrics"]["ppl_wikitext2"] for r in latest.values() if r["method"] == "fp16"), None)
    rows = sorted(latest.values(), key=lambda r: (r.get("bits") or 0, -(r.get("group_size") or 0),
                                                  ORDER[r["method"]], not r["config"]["method"].get("act_order")))
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_row(r, base)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results dir or runs.jsonl")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    text = table(read_records(args.results))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
