"""Weights & Biases logging of one record. wandb is imported only when logging is on."""

from pathlib import Path

from omegaconf import DictConfig


def flat_metrics(record: dict) -> dict:
    out = {f"metrics/{k}": v for k, v in record.get("metrics", {}).items() if isinstance(v, (int, float))}
    out.update({f"timings/{k}": v for k, v in record.get("timings", {}).items()})
    out["status"] = record["status"]
    return out


def log_run(cfg: DictConfig, record: dict) -> None:
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    from qbench.leaderboard import run_label

    wandb_dir = Path(cfg.results_dir) / "wandb-files"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group or record.get("sweep_id") or record["run_id"],
        name=f"{run_label(record)} {record['run_id']}",
        mode=cfg.wandb.mode,
        dir=str(wandb_dir),
        config=record["config"],
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    run.summary.update(flat_metrics(record))
    run.finish()
    record["wandb_run"] = run.id


def sweep_records(results_dir: str, sweep_id: str) -> list[dict]:
    """The records of a sweep plus the baselines of its eval keys (recorded once, maybe by an earlier sweep)."""
    from qbench.records import read_records

    records = read_records(results_dir)
    mine = [r for r in records if r.get("sweep_id") == sweep_id]
    keys = {str(r.get("eval_key")) for r in mine}
    base = [r for r in records if r.get("method") == "fp16" and str(r.get("eval_key")) in keys and r not in mine]
    return base + mine


def log_sweep(cfg: DictConfig, sweep_id: str) -> None:
    """At the end of a multirun: the sweep's leaderboard as a wandb.Table and its HTML as an artifact."""
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    from qbench.leaderboard import sections, table_rows, write_leaderboards

    records = sweep_records(cfg.results_dir, sweep_id)
    models = sorted({r["model"] for r in records if r.get("eval_key")})
    if not models:
        return
    out_dir = Path(cfg.results_dir) / "sweep-reports" / sweep_id
    files = write_leaderboards(records, out_dir)
    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group or sweep_id,
                     name=f"sweep-{sweep_id}", job_type="sweep-report", mode=cfg.wandb.mode,
                     dir=str(Path(cfg.results_dir) / "wandb-files"), reinit="finish_previous",
                     settings=wandb.Settings(silent=True, console="off"))
    for model in models:
        for i, section in enumerate(sections(records, model), 1):
            header, rows = table_rows(section)
            table = wandb.Table(columns=header, data=[[v if isinstance(v, (int, float)) or v is None else text for text, v in cells]
                                                      for cells in rows])
            run.log({f"leaderboard/{model}/{i}": table})
    artifact = wandb.Artifact(f"leaderboard-{sweep_id}", type="report")
    for path in files:
        artifact.add_file(str(path), name=f"{path.parent.name}/{path.name}")
        if path.suffix == ".html":
            run.log({f"leaderboard_html/{path.parent.name}": wandb.Html(path.read_text())})
    run.log_artifact(artifact)
    run.finish()
