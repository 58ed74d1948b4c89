"""Config checks that run before any model is loaded (and before torch is imported).

Each method's legal values are data in its config group entry (conf/method/<name>.yaml):
`bits_choices`, `default_bits`, `group_sizes`, `default_group_size`, and `choices` for its own keys.
"""

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qbench import ConfigError
from qbench.paths import group_options

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float16", "bfloat16", "float32")
KERNELS = ("auto", "triton", "torch")
WANDB_MODES = ("offline", "online", "disabled")
PPL_DATASETS = ("wikitext2", "c4")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _one_of(what: str, value, valid) -> None:
    if value not in valid:
        shown = ", ".join(str(v) for v in valid)
        raise ConfigError(f"unknown {what} {value!r}; valid: {shown}")


def resolved_bits(cfg: DictConfig):
    return cfg.method.default_bits if cfg.bits is None else cfg.bits


def resolved_group_size(cfg: DictConfig):
    return cfg.method.default_group_size if cfg.group_size is None else cfg.group_size


def skip_reason(cfg: DictConfig) -> str | None:
    """Why a combination makes no sense for its method (recorded as `skipped`), or None."""
    m = cfg.method
    if not m.bits_choices and cfg.bits is not None:
        return f"method {m.name} takes no bit width (bits={cfg.bits}); its record is the baseline"
    if m.group_sizes == "none" and cfg.group_size is not None:
        return f"method {m.name} takes no group size (group_size={cfg.group_size})"
    return None


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for values that can never run."""
    from qbench.models import check_model_name  # torch-free

    _one_of("method", cfg.method.name, group_options("method"))
    _one_of("device", cfg.device, DEVICES)
    _one_of("dtype", cfg.dtype, DTYPES)
    _one_of("kernel", cfg.kernel, KERNELS)
    _one_of("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    check_model_name(str(cfg.model))
    _validate_quant(cfg)
    _validate_eval(cfg)
    if "calib" in cfg and cfg.calib is not None:
        _one_of("calib", cfg.calib.name, group_options("calib"))
        if int(cfg.calib.nsamples) < 1:
            raise ConfigError(f"calib.nsamples must be >= 1, got {cfg.calib.nsamples}")
        if cfg.calib.seqlen is not None and int(cfg.calib.seqlen) < 1:
            raise ConfigError(f"calib.seqlen must be >= 1 or null, got {cfg.calib.seqlen}")


def _validate_quant(cfg: DictConfig) -> None:
    m = cfg.method
    if skip_reason(cfg):
        return
    bits = resolved_bits(cfg)
    if m.bits_choices and bits not in m.bits_choices:
        valid = ", ".join(str(b) for b in m.bits_choices)
        raise ConfigError(f"method {m.name} does not support bits={bits}; valid: {valid}")
    gs = resolved_group_size(cfg)
    if m.group_sizes == "any":
        if not isinstance(gs, int) or isinstance(gs, bool) or (gs != -1 and gs < 1):
            raise ConfigError(f"group_size must be -1 (per output channel) or a positive integer, got {gs}")
    elif m.group_sizes != "none" and gs not in m.group_sizes:
        valid = ", ".join(str(g) for g in m.group_sizes)
        raise ConfigError(f"method {m.name} does not support group_size={gs}; valid: {valid}")
    for key, valid in (m.get("choices") or {}).items():
        _one_of(f"method.{key} for {m.name}", m.get(key), list(valid))


def _validate_eval(cfg: DictConfig) -> None:
    ppl = cfg.eval.ppl
    for name in ppl.datasets:
        _one_of("perplexity dataset", name, PPL_DATASETS)
    if int(ppl.seqlen) < 2:
        raise ConfigError(f"eval.ppl.seqlen must be >= 2, got {ppl.seqlen}")
    if ppl.max_windows is not None and int(ppl.max_windows) < 1:
        raise ConfigError(f"eval.ppl.max_windows must be >= 1 or null, got {ppl.max_windows}")
    if int(ppl.batch_size) < 1:
        raise ConfigError(f"eval.ppl.batch_size must be >= 1, got {ppl.batch_size}")
    if cfg.eval.get("tasks"):
        from qbench.eval.tasks import check_tasks  # torch-free; unknown or unreachable task -> one line

        check_tasks(cfg.eval.tasks, cfg.data_dir)


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
