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
    line = f"[{record['status']}] {record['method']} bits={record['bits']} group_size={record['group_size']}"
    print(line + (f": {record['error']}" if record["error"] else ""))
    shown = [r for r in read_records(records_path(cfg.results_dir))
             if r.get("eval_key") == record.get("eval_key") and
             (r["run_id"] == record["run_id"] or r.get("method") == "fp16" or (sweep_id and r.get("sweep_id") == sweep_id))]
    if shown:
        print(comparison_table(shown))
    return record
