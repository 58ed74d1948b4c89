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

    wandb_dir = Path(cfg.results_dir) / "wandb-files"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group or record.get("sweep_id") or record["run_id"],
        name=f"{record['method']}-w{record['bits']}g{record['group_size']}-{record['run_id']}",
        mode=cfg.wandb.mode,
        dir=str(wandb_dir),
        config=record["config"],
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    run.summary.update(flat_metrics(record))
    run.finish()
    record["wandb_run"] = run.id
