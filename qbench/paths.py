"""Where qbench finds its configs, its data root and its caches."""

import os
from importlib.resources import files
from pathlib import Path

import yaml


def conf_dir() -> Path:
    # conf/ is installed as the package qbench.conf (see pyproject.toml), editable or not.
    return Path(str(files("qbench.conf")))


def group_options(group: str) -> list[str]:
    """Names of the entries of a Hydra config group, e.g. group_options('method')."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def method_meta(name: str) -> dict:
    """The entry conf/method/<name>.yaml (its legal values, defaults and parameters) as Hydra composes it:
    an entry's `defaults` list names other entries of conf/method it derives from (fp4: nf4), merged in
    order, `_self_` where it stands (last when absent)."""
    return _group_entry("method", name)


def _group_entry(group: str, name: str) -> dict:
    entry = yaml.safe_load((conf_dir() / group / f"{name}.yaml").read_text()) or {}
    defaults = entry.pop("defaults", None)
    if not defaults:
        return entry
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    out: dict = {}
    for parent in defaults:
        _merge(out, entry if parent == "_self_" else _group_entry(group, str(parent)))
    return out


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def data_root(configured: str | None = None) -> Path | None:
    """The local data root: the config value first, then $QBENCH_DATA_DIR; None if neither is set."""
    root = configured or os.environ.get("QBENCH_DATA_DIR")
    return Path(root).expanduser() if root else None


def cache_dir() -> Path:
    root = os.environ.get("QBENCH_CACHE_DIR") or Path.home() / ".cache" / "qbench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
