"""Config checks that run before any model is loaded (and before torch is imported).

Each method's legal values are data in its config group entry (conf/method/<name>.yaml):
`bits_choices`, `default_bits`, `group_sizes`, `default_group_size`, and `choices` for its own keys;
a key without choices keeps the type of its default there (a number stays a number).
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qbench import ConfigError
from qbench.paths import group_options

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float16", "bfloat16", "float32")
KERNELS = ("auto", "triton", "torch")
WANDB_MODES = ("offline", "online", "disabled")
EXPORT_FORMATS = ("native", "compressed-tensors")
PPL_DATASETS = ("wikitext2", "c4")


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
    _integer("seed", cfg.seed)
    _validate_quant(cfg)
    _validate_eval(cfg)
    _validate_kv_cache(cfg)
    _validate_export(cfg)
    if "calib" in cfg and cfg.calib is not None:
        _one_of("calib", cfg.calib.name, group_options("calib"))
        _integer("calib.nsamples", cfg.calib.nsamples, 1)
        _integer("calib.seqlen", cfg.calib.seqlen, 1, nullable=True)
    _validate_device(cfg.device)
    _validate_fit(cfg)
    _validate_data(cfg)  # last: the task checks above have their own, more precise messages


def _integer(name: str, value, minimum: int | None = None, nullable: bool = False) -> None:
    """An integer setting (>= minimum); 'abc' or 2.5 is a one-line error, not a traceback."""
    if value is None and nullable:
        return
    try:
        number = int(value)
        ok = not isinstance(value, bool) and (number == value or str(number) == str(value).strip())
    except (TypeError, ValueError):
        ok = False
    bound = f" >= {minimum}" if minimum is not None else ""
    if not ok:
        raise ConfigError(f"{name} must be an integer{bound}{' or null' if nullable else ''}, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be{bound}{' or null' if nullable else ''}, got {value}")


def _validate_device(device: str) -> None:
    if device == "cuda":  # torch is imported only when CUDA was asked for
        from qbench.models import resolve_device

        resolve_device(device)


def _validate_fit(cfg: DictConfig) -> None:
    """A model too large for the device fails here, before it is built or loaded (shape models and local
    checkpoints: their parameter count is known from their config; torch is imported only for them)."""
    from qbench.models import check_fit

    check_fit(str(cfg.model), cfg.device, cfg.dtype)


def needs_calibration(cfg: DictConfig) -> bool:
    """Whether the run reads its calibration set: the method always does (`needs_calibration: true`), or
    one of its options asks for it (`calibrated_when: {key: value}`, e.g. GGUF's imatrix=auto)."""
    m = cfg.method
    when = m.get("calibrated_when") or {}
    return bool(m.get("needs_calibration")) or any(str(m.get(key)) == str(value) for key, value in when.items())


def _validate_data(cfg: DictConfig) -> None:
    """The data the run reads is there (data root files, or the hub when no root is set)."""
    from qbench.data import check_data

    calib = cfg.calib.name if needs_calibration(cfg) and cfg.get("calib") is not None else None
    check_data(cfg.data_dir, list(cfg.eval.ppl.datasets), calib, bool(cfg.eval.get("kld")))


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
    _validate_method_types(cfg)
    _validate_method_paths(m)
    if m.get("architectures"):
        _validate_architecture(cfg)


def _validate_architecture(cfg: DictConfig) -> None:
    """`architectures: [model_type, ...]` in conf/method/<name>.yaml: the models the method supports,
    checked here where the model's type is known before load (qbench.models.model_type), else after load."""
    from qbench.models import model_type

    kind, valid = model_type(str(cfg.model)), list(cfg.method.architectures)
    if kind is not None and kind not in valid:
        raise ConfigError(f"method {cfg.method.name} does not support model {cfg.model} (model type {kind!r}); "
                          f"supported: {', '.join(valid)}")


def _validate_method_paths(m: DictConfig) -> None:
    """`paths: {key: [words]}` in conf/method/<name>.yaml: an option naming a file (null or one of the
    words instead, e.g. GGUF's imatrix=auto); a file that is not there is one line naming it."""
    for key, words in (m.get("paths") or {}).items():
        value = m.get(key)
        if value is None or str(value) in [str(w) for w in words]:
            continue
        if not Path(str(value)).is_file():
            raise ConfigError(f"method.{key} for {m.name}: no such file {value}")


def _validate_method_types(cfg: DictConfig) -> None:
    """A method key without choices keeps the type of its default in conf/method/<name>.yaml."""
    from qbench.records import METHOD_META, method_defaults

    m = cfg.method
    choices = m.get("choices") or {}
    for key, default in method_defaults(m.name).items():
        if key in METHOD_META or key in choices or key not in m or not isinstance(default, (bool, int, float)):
            continue
        value = m.get(key)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        if not ok:
            raise ConfigError(f"method.{key} for {m.name} must be {want} (default {default}), got {value!r}")
    _validate_method_ranges(m)


def _validate_method_ranges(m: DictConfig) -> None:
    """`ranges: {key: [low, high]}` in conf/method/<name>.yaml: inclusive bounds of a number option (null:
    unbounded), e.g. SmoothQuant's alpha in [0, 1]; checked once the option's type is."""
    for key, (low, high) in (m.get("ranges") or {}).items():
        value = m.get(key)
        if (low is not None and value < low) or (high is not None and value > high):
            shown = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ConfigError(f"method.{key} for {m.name} must be in {shown}, got {value}")


def _validate_kv_cache(cfg: DictConfig) -> None:
    """conf/kv_cache/<name>.yaml: its name, its choice options, the perplexity chunk (no entry: none)."""
    kv = cfg.get("kv_cache")
    if kv is None:
        return
    _one_of("kv_cache", kv.name, group_options("kv_cache"))
    for key, valid in (kv.get("choices") or {}).items():
        _one_of(f"kv_cache.{key} for {kv.name}", kv.get(key), list(valid))
    if "chunk" in kv:
        _integer("kv_cache.chunk", kv.chunk, 1, nullable=True)


def _validate_export(cfg: DictConfig) -> None:
    """export.format: native (the method's own export) or compressed-tensors, which holds only some methods'
    weights (qbench.quant.ct_export.unsupported says which); checked even without export.path, as asked."""
    fmt = cfg.export.get("format", "native")
    _one_of("export.format", fmt, EXPORT_FORMATS)
    if fmt == "compressed-tensors":
        from qbench.quant.ct_export import unsupported  # torch-free at import

        reason = unsupported(cfg)
        if reason:
            raise ConfigError(reason)


def _validate_eval(cfg: DictConfig) -> None:
    ppl = cfg.eval.ppl
    for name in ppl.datasets:
        _one_of("perplexity dataset", name, PPL_DATASETS)
    _integer("eval.ppl.seqlen", ppl.seqlen, 2)
    _integer("eval.ppl.max_windows", ppl.max_windows, 1, nullable=True)
    _integer("eval.ppl.batch_size", ppl.batch_size, 1)
    if cfg.eval.get("tasks"):
        from qbench.eval.tasks import check_tasks  # torch-free; unknown or unreachable task -> one line

        check_tasks(cfg.eval.tasks, cfg.data_dir)


def to_plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
