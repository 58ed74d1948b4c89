"""Which records are one configuration, and seed groups: one configuration run with several calibration seeds.

A calibration method's figures move with its calibration sample, so records that differ only in
`calib.seed` (and in what never makes a configuration: run ids, timings, environment) are one
configuration measured n times. Reports show such a group as one row: for each perplexity, KLD and
zero-shot metric the mean over its seeds, the sample standard deviation (n - 1) and n; other metrics
(size, speed) are the latest member's. A group of one is the record itself, shown as before.
"""

import statistics

# Which records are one configuration lives in qbench.records (with latest_per_config); re-exported here.
from qbench.records import (CONFIG_COLUMNS, PARAMS_BEFORE_OPTION, calib_seed, config_identity,  # noqa: F401
                            with_legacy_params)

SPREAD_PREFIXES = ("ppl_", "kld_", "top1_agree", "acc_", "perplexity_")  # averaged over a group's seeds
STDERR = "_stderr_"  # lm-eval's stderr of one run (acc_stderr_piqa): averaged, given no spread of its own


def seed_groups(records: list[dict]) -> list[list[dict]]:
    """The ok records (one per configuration and seed, e.g. records.latest_per_config) grouped by
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
