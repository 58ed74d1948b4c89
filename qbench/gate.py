"""The perplexity regression gate: a sweep's records against a committed baseline file.

    qbench gate --baseline sweeps/ci-baseline.json [--results results] [--max-ppl-increase 0.5%]
    qbench gate --baseline sweeps/ci-baseline.json --results results --update   # (re)write the baseline
    qbench gate --baseline seeds-baseline.json --results results --spread 2      # within mean + 2 std of the seeds

Configs are matched by their key: model, method, the method's parameters (gguf type, int8 threshold,
...), bits, group size, calibration set and the eval settings (the record's eval_key: device, dtype,
perplexity data/seqlen/windows, optional metrics).
Every ppl_* metric of the baseline is compared: higher than the baseline by more than the tolerance
is a regression; lower by more than it is an improvement (reported, so the baseline can be refreshed
with --update). A baseline config with no ok record in the results (missing or failed), and any
failed run, fail the gate. Exit 0: passed; 1: failed; 2: bad input (one line).
Seeds: records of one config that differ only in calib.seed are one config measured n times. The
baseline (--update) stores their mean, with each metric's sample standard deviation (`spread`), n
and the seeds; the current value is likewise the mean of the config's records. `--spread K` widens a
config's allowance to K standard deviations of its baseline seeds where that exceeds the tolerance
(a single new seed may then land anywhere within mean + K std); configs without a spread keep the
tolerance alone.
Tolerance: "0.5%" is relative to the baseline's perplexity; a bare number ("0.05") is absolute. A
baseline config may carry its own ("tolerance", with a "why"): for a measurement that moves between
machines by more than the command's tolerance (e.g. LLM.int8() on 1024 tokens); --update keeps it.
"""

import argparse
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

from qbench.records import (calib_seed, config_identity, forced_kernel, git_sha, kv_cache_entry, kv_variant,
                            latest_per_config, method_defaults, method_params, read_records, variant_parts,
                            without_legacy_values)

FORMAT = "qbench-gate-baseline/1"


class GateError(ValueError):
    """Bad input: printed as one line, exit 2."""


def config_key(rec: dict) -> dict:
    params = without_legacy_values(rec.get("method") or "", method_params(rec))
    key = {"model": rec.get("model"), "method": rec.get("method"), "params": params,
           "bits": rec.get("bits"), "group_size": rec.get("group_size"), "calib": rec.get("calib"),
           "eval": rec.get("eval_key")}
    kernel = forced_kernel(rec)
    if kernel:  # only where forced, so that baselines of kernel=auto runs keep their keys
        key["kernel"] = kernel
    kv = kv_cache_entry(rec)
    if kv is not None:  # likewise: kv_cache=none keeps the keys of records from before the option
        key["kv_cache"] = kv
    return key


def key_str(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def label(key: dict) -> str:
    parts = [key["method"]]
    if key.get("bits") is not None:
        parts.append(f"w{key['bits']}")
    choices = list(method_defaults(key["method"] or "").get("choices") or {})
    parts += variant_parts(key["method"] or "", key.get("params") or {}, choices)
    if key.get("group_size") is not None:
        parts.append(f"g{key['group_size']}")
    if key.get("calib"):
        parts.append(key["calib"])
    if key.get("kernel"):
        parts.append(f"kernel={key['kernel']}")
    if key.get("kv_cache"):
        parts += kv_variant({"config": {"kv_cache": key["kv_cache"]}})
    ev = key.get("eval") or {}
    parts.append(f"[{ev.get('device')} seqlen {ev.get('ppl_seqlen')} x{ev.get('ppl_max_windows') or 'all'}]")
    return " ".join(parts)


def parse_tolerance(text: str, what: str = "--max-ppl-increase") -> tuple[float, bool]:
    """'0.5%' -> (0.005, relative); '0.05' -> (0.05, absolute)."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except (ValueError, AttributeError):
        raise GateError(f"{what} must look like 0.5% (relative) or 0.05 (absolute), got {text!r}") from None
    if value < 0:
        raise GateError(f"{what} must be >= 0, got {text!r}")
    return value, text.endswith("%")


def current_records(results: str, model: str | None = None) -> list[dict]:
    records = read_records(results)
    if not records:
        raise GateError(f"no records in {results} (run the sweep first)")
    recs = [r for r in latest_per_config(records) if r.get("eval_key") or r.get("status") == "failed"]
    if model is not None:
        recs = [r for r in recs if r.get("model") == model]
    return recs


def load_baseline(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise GateError(f"baseline file {path} does not exist (create it with --update)") from None
    except json.JSONDecodeError as err:
        raise GateError(f"baseline file {path} is not JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not data.get("configs"):
        raise GateError(f"baseline file {path} is not a qbench gate baseline ({FORMAT}) or holds no configs")
    if any("params" not in entry["key"] for entry in data["configs"]):
        raise GateError(f"baseline file {path} predates method parameters in the config keys: re-create it with --update")
    for entry in data["configs"]:  # keys written before a parameter existed match runs at its old value
        entry["key"]["params"] = without_legacy_values(entry["key"].get("method") or "", entry["key"]["params"])
        if "tolerance" in entry:
            parse_tolerance(entry["tolerance"], f"tolerance of {entry.get('label')} in {path}")
    return data


def by_config(records: list[dict]) -> dict[str, list[dict]]:
    """The records of each config key: one, or one per calibration seed. Records of one key that differ
    in more than the seed (calib.nsamples, which the key does not hold) are not seeds of one config:
    the last of those configs counts, as the last record did."""
    same: dict[tuple, list[dict]] = {}
    for rec in records:
        same.setdefault(config_identity(rec), []).append(rec)
    return {key_str(config_key(recs[0])): recs for recs in same.values()}


def mean_metric(recs: list[dict], metric: str):
    """The mean of a metric over a config's records; None unless every record has it."""
    values = [(r.get("metrics") or {}).get(metric) for r in recs]
    if not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return sum(values) / len(values)


def compare(baseline: dict, records: list[dict], tol: float, relative: bool, spread: float = 0.0) -> dict:
    """Rows of the comparison and the lists of regressions, missing configs, improvements, new configs."""
    current = by_config(records)
    rows, regressions, missing, improved = [], [], [], []
    for entry in baseline["configs"]:
        name = label(entry["key"])
        recs = current.pop(key_str(entry["key"]), None)
        own = "tolerance" in entry  # the config's own tolerance (see the module docstring)
        entry_tol, entry_relative = parse_tolerance(entry["tolerance"]) if own else (tol, relative)
        bad = None if recs is None else next((r for r in recs if r.get("status") != "ok"), None)
        if recs is None or bad is not None:
            why = "missing (no record)" if recs is None else f"failed: {bad.get('error')}"
            missing.append(name)
            rows.append([name, "", "", "", "", why])
            continue
        for metric, base in sorted(entry["metrics"].items()):
            value = mean_metric(recs, metric)
            std = (entry.get("spread") or {}).get(metric)
            shown_base = f"{base:.4f}" + (f" ± {std:.4f} (n={entry.get('n')})" if std is not None else "")
            if value is None:
                missing.append(f"{name} {metric}")
                rows.append([name, metric, shown_base, "", "", "missing metric"])
                continue
            limit = entry_tol * base if entry_relative else entry_tol
            widened = spread and std is not None and spread * std > limit
            limit = spread * std if widened else limit
            change = f"{(value - base) / base:+.3%}"
            if value > base + limit:
                status = "REGRESSION"
                regressions.append(f"{name} {metric}")
            elif value < base - limit:
                status = "improved (refresh with --update)"
                improved.append(f"{name} {metric}")
            else:
                status = "ok"
            if own:
                status += f" (its tolerance {entry['tolerance']})"
            if widened:
                status += f" (within {spread:g} std = {limit:.4f})"
            shown = f"{value:.4f}" + (f" (mean of {len(recs)})" if len(recs) > 1 else "")
            rows.append([name, metric, shown_base, shown, change, status])
    new = []
    for recs in current.values():
        name = label(config_key(recs[0]))
        bad = next((r for r in recs if r.get("status") != "ok"), None)
        if bad is None:
            new.append(name)
            rows.append([name, "", "", "", "", "new (not in the baseline)"])
        else:
            missing.append(name)
            rows.append([name, "", "", "", "", f"failed: {bad.get('error')}"])
    return {"rows": rows, "regressions": regressions, "missing": missing, "improved": improved, "new": new}


def render(result: dict) -> str:
    from tabulate import tabulate

    return tabulate(result["rows"], headers=["config", "metric", "baseline", "current", "change", "status"],
                    tablefmt="github", disable_numparse=True)


def make_baseline(records: list[dict], results: str, previous: dict | None = None) -> dict:
    """The baseline of the records' ok runs; a config's own tolerance (and why) is kept from `previous`."""
    ok = [r for r in records if r.get("status") == "ok"]
    models = sorted({r.get("model") for r in ok})
    if not ok:
        raise GateError(f"no ok records in {results} to make a baseline from")
    if len(models) > 1:
        raise GateError(f"records of several models in {results} ({', '.join(models)}): pass --model")
    configs = [baseline_entry(recs) for recs in by_config(ok).values()]
    kept = {key_str(c["key"]): c for c in (previous or {}).get("configs", []) if "tolerance" in c}
    for c in configs:
        c.update({k: v for k, v in kept.get(key_str(c["key"]), {}).items() if k in ("tolerance", "why")})
    configs.sort(key=lambda c: c["label"])
    shas = sorted({(r.get("env") or {}).get("git_sha") for r in ok} - {None})  # the code that made the numbers
    return {"format": FORMAT, "model": models[0], "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_sha": ", ".join(shas) or git_sha(), "configs": configs}


def baseline_entry(recs: list[dict]) -> dict:
    """A config's baseline entry: its ppl_* metrics; of several seeds the mean, with `spread` (each
    metric's sample standard deviation), n, the seeds and their run ids."""
    key = config_key(recs[0])
    names = sorted(k for k in recs[-1]["metrics"] if k.startswith("ppl_") and mean_metric(recs, k) is not None)
    entry = {"key": key, "label": label(key), "run_id": recs[-1].get("run_id"),
             "metrics": {k: mean_metric(recs, k) for k in names}}
    if len(recs) > 1:
        entry.update(n=len(recs), seeds=[calib_seed(r) for r in recs], run_ids=[r.get("run_id") for r in recs],
                     spread={k: statistics.stdev(r["metrics"][k] for r in recs) for k in names})
    return entry


def gate(baseline_path: str, results: str, tolerance: str = "0.5%", update: bool = False, model: str | None = None,
         spread: float = 0.0) -> int:
    tol, relative = parse_tolerance(tolerance)
    if spread < 0:
        raise GateError(f"--spread must be >= 0 (standard deviations), got {spread:g}")
    if update:
        previous = load_baseline(baseline_path) if Path(baseline_path).is_file() else None
        data = make_baseline(current_records(results, model), results, previous)
        Path(baseline_path).parent.mkdir(parents=True, exist_ok=True)
        Path(baseline_path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"qbench gate: wrote {len(data['configs'])} configs of {data['model']} to {baseline_path}")
        return 0
    baseline = load_baseline(baseline_path)
    records = current_records(results, model)
    models = sorted({str(r.get("model")) for r in records})
    if baseline["model"] not in models:
        raise GateError(f"baseline {baseline_path} is for model {baseline['model']}; the records in {results} are for {', '.join(models)}")
    records = [r for r in records if r.get("model") == baseline["model"]]
    result = compare(baseline, records, tol, relative, spread)
    print(render(result))
    shown = f"{tolerance}" + ("" if relative else " ppl") + (f" or {spread:g} std of the baseline's seeds" if spread else "")
    if result["regressions"] or result["missing"]:
        print(f"qbench gate: FAILED (max ppl increase {shown}): {len(result['regressions'])} regression(s), "
              f"{len(result['missing'])} missing or failed: " + "; ".join(result["regressions"] + result["missing"]))
        return 1
    note = ""
    if result["improved"] or result["new"]:
        note = (f"; {len(result['improved'])} improved beyond tolerance, {len(result['new'])} new config(s): "
                f"refresh with qbench gate --update --baseline {baseline_path} --results {results}")
    own = sum("tolerance" in entry for entry in baseline["configs"])
    own_note = f", {own} with their own tolerance" if own else ""
    print(f"qbench gate: passed ({len(baseline['configs'])} baseline configs within {shown}{own_note}){note}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qbench gate", description="Perplexity regression gate against a baseline file.")
    parser.add_argument("--baseline", required=True, help="baseline JSON file (e.g. sweeps/ci-baseline.json)")
    parser.add_argument("--results", default="results", help="results dir or runs.jsonl (default: results)")
    parser.add_argument("--max-ppl-increase", default="0.5%", help="0.5%% = relative; 0.05 = absolute (default 0.5%%)")
    parser.add_argument("--update", action="store_true", help="write the baseline from the results instead of gating")
    parser.add_argument("--model", default=None, help="only records of this model")
    parser.add_argument("--spread", type=float, default=0.0, metavar="K",
                        help="allow up to K standard deviations of a baseline config's seeds where that exceeds "
                             "the tolerance (default 0: the tolerance alone)")
    args = parser.parse_args(argv)
    try:
        return gate(args.baseline, args.results, args.max_ppl_increase, args.update, args.model, args.spread)
    except GateError as err:
        print(f"qbench gate: error: {err}")
        return 2
