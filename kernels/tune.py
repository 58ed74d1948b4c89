"""A small autotuner: time each candidate config of a launch once per (kernel, key), keep the fastest.

Triton's own `@triton.autotune` cannot zero a split-K output buffer before the real call after tuning,
so the launchers tune whole calls instead: `run(config)` allocates, zeroes, launches and casts.
Choices are cached in memory and on disk ($QBENCH_CACHE_DIR or ~/.cache/qbench, one JSON file per GPU
name), so a process tunes each shape once per machine. On the CPU (TRITON_INTERPRET=1) nothing is
timed: the first config is used.
"""

import json
import os
from pathlib import Path

import torch

_CHOSEN: dict[str, dict] = {}
_LOADED: set[str] = set()


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cache_file(device_name: str) -> Path:
    root = Path(os.environ.get("QBENCH_CACHE_DIR", Path.home() / ".cache" / "qbench"))
    return root / "autotune" / (device_name.replace(" ", "_") + ".json")


def _load(device_name: str) -> None:
    if device_name in _LOADED:
        return
    _LOADED.add(device_name)
    path = _cache_file(device_name)
    if path.is_file():
        _CHOSEN.update({f"{device_name}|{k}": v for k, v in json.loads(path.read_text()).items()})


def _save(device_name: str) -> None:
    path = _cache_file(device_name)
    prefix = device_name + "|"
    mine = {k[len(prefix):]: v for k, v in _CHOSEN.items() if k.startswith(prefix)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs re-tuning


_NAMES: dict[int, str] = {}


def pick(name: str, key: tuple, make_configs, run, device: torch.device) -> dict:
    """The fastest of make_configs() for this key; run(config) must perform one complete call."""
    if device.type != "cuda" or interpreted():
        return make_configs()[0]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NAMES:
        _NAMES[index] = torch.cuda.get_device_name(index)
        _load(_NAMES[index])
    device_name = _NAMES[index]
    full = f"{device_name}|{name}|{key}"
    if full in _CHOSEN:
        return _CHOSEN[full]
    import triton

    best, best_ms = None, float("inf")
    for config in make_configs():
        try:
            ms = triton.testing.do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median")
        except Exception as err:  # a config that does not fit (shared memory, registers) is skipped
            if "OutOfResources" not in type(err).__name__ and "out of resource" not in str(err):
                raise
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"no config of {name} runs for key {key}")
    _CHOSEN[full] = best
    _save(device_name)
    return best


def m_bucket(m: int) -> int:
    """Tuning key for the number of rows: the next power of two (1, 2, 4, ..., capped at 4096)."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)
