"""Which records are one configuration, and seed groups: one configuration run with several calibration seeds.

A calibration method's figures move with its calibration sample, so records that differ only in
`calib.seed` (and in what never makes a configuration: run ids, timings, environment) are one
configuration measured n times. Reports show such a group as one row: for each perplexity, KLD and
zero-shot metric the mean over its seeds, the sample standard deviation (n - 1) and n; other metrics
(size, speed) are the latest member's. A group of one is the record itself, shown as before.
"""

import json
import statistics

from qbench.records import forced_kernel

CONFIG_COLUMNS = ("model", "method", "bits", "group_size", "calib")
SPREAD_PREFIXES = ("ppl_", "kld_", "top1_agree", "acc_", "perplexity_")  # averaged over a group's seeds
STDERR = "_stderr_"  # lm-eval's stderr of one run (acc_stderr_piqa): averaged, given no spread of its own

# Method parameters added after records were written: (methods, the value those older records ran with).
PARAMS_BEFORE_OPTION = {"zero_in_range": (("rtn", "gptq", "awq"), True)}


def with_legacy_params(rec: dict) -> dict:
    """The record with any parameter it predates filled in with the value it ran with (an AWQ record
    from before `zero_in_range` ran with 0 in range, not with AWQ's current default). Only records that
    carry their method's whole conf entry (every run does: `default_bits` is in it) can predate a key."""
    method = (rec.get("config") or {}).get("method") or {}
    missing = {k: v for k, (methods, v) in PARAMS_BEFORE_OPTION.items()
               if "default_bits" in method and rec.get("method") in methods and k not in method}
    if not missing:
        return rec
    return {**rec, "config": {**rec["config"], "method": {**method, **missing}}}


def calib_seed(rec: dict):
    """The calibration seed of a calibration method's record; None for methods without calibration."""
    if not rec.get("calib"):
        return None
    return ((rec.get("config") or {}).get("calib") or {}).get("seed")


def config_identity(rec: dict) -> tuple:
    """What makes records one configuration, the calibration seed aside: eval settings, model, method,
    bits, group size, calibration set and its other settings, method parameters, a forced kernel."""
    calib = dict((rec.get("config") or {}).get("calib") or {}) if rec.get("calib") else {}
    calib.pop("seed", None)
    method = (with_legacy_params(rec).get("config") or {}).get("method")
    return (json.dumps(rec.get("eval_key"), sort_keys=True), *(str(rec.get(c)) for c in CONFIG_COLUMNS),
            json.dumps(method, sort_keys=True), forced_kernel(rec), json.dumps(calib, sort_keys=True))


def seed_groups(records: list[dict]) -> list[list[dict]]:
    """The ok records (one per configuration and seed, e.g. report.latest_per_config) grouped by
    configuration, in order of first appearance; a record that is not ok is a group of its own."""
    groups: dict = {}
    for i, rec in enumerate(records):
        key = config_identity(rec) if rec.get("status") == "ok" else ("not ok", i)
        groups.setdefault(key, []).append(rec)
    return list(groups.values())


def is_spread_metric(name: str) -> bool:
    return name.startswith(SPREAD_PREFIXES)


def merged(group: list[dict]) -> dict:
    """One record standing for a seed group: the latest member with each spread metric replaced by the
    mean over the members that have it, `seed_spread` = {metric: {std, n}} (std None when n = 1),
    `seeds`, `run_ids` and `seed_members` (the records). A group of one is returned as it is."""
    if len(group) == 1:
        return group[0]
    latest = max(group, key=lambda r: str(r.get("finished_at") or r.get("started_at")))
    metrics, spread = dict(latest.get("metrics") or {}), {}
    for name in sorted(set().union(*((r.get("metrics") or {}) for r in group))):
        values = [v for v in ((r.get("metrics") or {}).get(name) for r in group) if _number(v)]
        if not is_spread_metric(name) or not values:
            continue
        metrics[name] = sum(values) / len(values)
        if STDERR not in name:
            spread[name] = {"std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}
    return {**latest, "metrics": metrics, "seed_spread": spread, "seeds": sorted((calib_seed(r) for r in group), key=_seed_order),
            "run_ids": [r.get("run_id") for r in group], "seed_members": group}


def members(rows: list[dict]) -> list[dict]:
    """The records behind rows that may be merged seed groups."""
    return [m for r in rows for m in r.get("seed_members", [r])]


def seeds_label(rec: dict) -> str:
    """'seeds 0-4' (or 'seeds 0,2,7') for a merged seed group; '' for a single record."""
    seeds = rec.get("seeds")
    if not seeds:
        return ""
    if all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ",".join(str(s) for s in seeds)


def _seed_order(seed) -> tuple:
    return (not _number(seed), seed if _number(seed) else 0, str(seed))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
