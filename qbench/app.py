"""What the Hydra entry point does with one composed config."""

import sys

from omegaconf import DictConfig

from qbench import ConfigError


def run_and_report(cfg: DictConfig, sweep_id: str | None = None) -> dict:
    from qbench.config import validate

    try:
        validate(cfg)
    except ConfigError as err:  # also checked before Hydra starts; kept for programmatic use
        print(f"qbench: error: {err}", file=sys.stderr)
        sys.exit(2)
    import transformers

    transformers.logging.set_verbosity_error()

    from qbench.records import read_records, records_path
    from qbench.report import comparison_table
    from qbench.runner import run

    record = run(cfg, sweep_id)
    if sweep_id and record.get("done_run_id"):
        return record  # resumed multirun: its runs already recorded are summed up once at the end
    line = f"[{record['status']}] {record['method']} bits={record['bits']} group_size={record['group_size']}"
    print(line + (f": {record['error']}" if record["error"] else ""))
    if record["status"] == "skipped" and not record.get("eval_key"):
        return record  # nothing measured, no table: the line above says why
    shown = [r for r in read_records(records_path(cfg.results_dir))
             if r.get("eval_key") == record.get("eval_key") and
             (r["run_id"] == record["run_id"] or r.get("method") == "fp16" or (sweep_id and r.get("sweep_id") == sweep_id))]
    if any(r.get("status") != "skipped" for r in shown):
        print(comparison_table(shown))
    return record


def resume_summary(records: list[dict]) -> str | None:
    """One line naming the runs of a multirun that resume=true skipped, or None."""
    from qbench.leaderboard import run_label

    skipped = [r for r in records if r.get("done_run_id")]
    if not skipped:
        return None
    names = ", ".join(f"{run_label(r)} (run {r['done_run_id']})" for r in skipped)
    return f"qbench: resume=true skipped {len(skipped)} of {len(records)} runs already recorded ok: {names}"


def next_steps(cfg: DictConfig) -> str:
    """Where a run's records went and what a newcomer runs next (printed once, after a run or multirun)."""
    from qbench.records import records_path

    results = str(cfg.results_dir)
    wandb = f"; W&B ({cfg.wandb.mode}) files under {results}/wandb-files" if cfg.wandb.mode == "offline" else ""
    return (f"qbench: records appended to {records_path(results)}{wandb}\n"
            f"  next: qbench report --results {results}    # table + {results}/reports/<model>/leaderboard.{{md,html}}\n"
            f"        qbench -m method=rtn,gptq bits=3,4   # a sweep; qbench --help lists report, sweep, gate")
