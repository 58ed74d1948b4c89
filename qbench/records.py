"""Result records: one JSON object per run, appended to ${results_dir}/runs.jsonl.

Appends are atomic: each record is one os.write of one line to a file opened with O_APPEND, under an
exclusive lock, then fsync'd; a crash can never leave half a record behind another run's records.
Readers take a shared lock, so they never see a line half written. The workers of a parallel sweep
(several processes or nodes writing one results dir) also coordinate through `locked`: named locks
under ${results_dir}/.locks/ (flock: on a cluster the results dir must be on a file system with locks).
Reports and gates read only these records.
"""

import contextlib
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from qbench import __version__
from qbench.paths import method_meta

RECORDS_FILE = "runs.jsonl"
LOCKS_DIR = ".locks"


def records_path(results_dir: str) -> Path:
    return Path(results_dir) / RECORDS_FILE


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_record(results_dir: str, record: dict) -> Path:
    path = records_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(_json_safe(record), sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return path


@contextlib.contextmanager
def locked(results_dir: str, name: str):
    """Hold the exclusive lock `name` of results_dir while the block runs: one process at a time, among
    all that write there. The kernel drops it when the block ends or the process dies."""
    path = Path(results_dir) / LOCKS_DIR / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_records(path: str | Path) -> list[dict]:
    """All records of a runs.jsonl file (or of a results dir). A line that is not a JSON record (a
    truncated last line, a hand edit) is skipped with a warning naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    records = []
    if not path.is_file():
        return records
    with open(path, "rb") as f:
        with contextlib.suppress(OSError):  # a file system without locks is read as it is
            fcntl.flock(f, fcntl.LOCK_SH)  # waits out an append in progress: no half-written last line
        text = f.read().decode()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            _warn_garbled(path, number, line, err.msg)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            _warn_garbled(path, number, line, f"a JSON {type(record).__name__}, not an object")
    return records


_WARNED: set = set()  # (file, line number, text): a run reads its records several times, warn once


def _warn_garbled(path: Path, number: int, line: str, why: str) -> None:
    key = (str(path.resolve()), number, line)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"qbench: warning: {path}:{number}: skipped, not a JSON record ({why})", file=sys.stderr)


def _git(here: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha(path: str | Path | None = None) -> str | None:
    """The commit of the qbench source tree: a clean checkout's own commit; for a checkout with changes
    to tracked files $QBENCH_GIT_SHA if set (e.g. a GPU machine's copy of a newer tree over an older
    .git), else "<commit>-dirty"; outside a checkout $QBENCH_GIT_SHA or None."""
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    sha = _git(here, "rev-parse", "HEAD")
    if not sha:  # outside a checkout git prints "HEAD" and fails
        return os.environ.get("QBENCH_GIT_SHA") or None
    if not _git(here, "status", "--porcelain", "--untracked-files=no"):
        return sha
    return os.environ.get("QBENCH_GIT_SHA") or f"{sha}-dirty"


def environment(device: str | None = None) -> dict:
    import torch
    import transformers

    env = {
        "qbench": __version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": device,
        "device_name": platform.processor() or platform.machine(),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # a parallel sweep's worker: its GPU
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- what tells a record's method settings apart (report tables, leaderboards) --------------------------

def method_defaults(name: str) -> dict:
    try:
        return method_meta(name)
    except (OSError, ValueError):
        return {}


# Keys of a conf/method entry that describe the method rather than set one of its parameters.
METHOD_META = {"name", "needs_calibration", "bits_choices", "default_bits", "group_sizes", "default_group_size",
                "calib_seqlen", "choices", "ranges", "architectures", "paths", "calibrated_when"}


def method_params(rec: dict) -> dict:
    """The method parameters a record ran with (its config.method without the method's description)."""
    method = (rec.get("config") or {}).get("method") or {}
    return {k: v for k, v in method.items() if k not in METHOD_META}


def forced_kernel(rec: dict) -> str | None:
    """The kernel setting of a run that forced one (kernel=torch|triton); None for the default, auto."""
    kernel = (rec.get("config") or {}).get("kernel")
    return None if kernel in (None, "auto") else str(kernel)


def kv_cache_entry(rec: dict) -> dict | None:
    """The record's conf/kv_cache entry; None for kv_cache=none and for records from before the option."""
    kv = (rec.get("config") or {}).get("kv_cache") or {}
    return None if kv.get("name", "none") == "none" else kv


def is_baseline(rec: dict) -> bool:
    """The unquantized baseline: method fp16 with an unquantized KV cache."""
    return rec.get("method") == "fp16" and kv_cache_entry(rec) is None


def kv_variant(rec: dict) -> list[str]:
    """"kv int8", "kv fp8" (E4M3), "kv fp8 e5m2", a non-default perplexity chunk; [] for kv_cache=none."""
    kv = kv_cache_entry(rec)
    if kv is None:
        return []
    parts = ["kv", str(kv["name"])]
    if kv.get("format") not in (None, "e4m3"):
        parts.append(str(kv["format"]))
    if kv.get("chunk") is not None:
        parts.append(f"chunk={kv['chunk']}")
    return [" ".join(parts)]


def method_variant(rec: dict) -> list[str]:
    """What tells a record's method settings apart: the value of each choice parameter (gguf Q4_K_M, fp8
    e4m3 tensor), and any other parameter, or an on/off switch, where it is not the method's default
    (threshold=2.0, act_order=off); a forced kernel last (kernel=torch: its numbers can differ a little).
    A quantized KV cache is another axis: kv_variant."""
    choices = list(((rec.get("config") or {}).get("method") or {}).get("choices") or {})
    parts = variant_parts(rec.get("method") or "", method_params(rec), choices)
    kernel = forced_kernel(rec)
    return parts + ([f"kernel={kernel}"] if kernel else [])


def variant_parts(name: str, params: dict, choices: list) -> list[str]:
    defaults = method_defaults(name)
    parts = []
    for k in [c for c in choices if c in params] + [k for k in params if k not in choices]:
        value = params[k]
        if isinstance(value, bool):
            if k not in defaults or defaults[k] != value:
                parts.append(f"{k}={'on' if value else 'off'}")
        elif value is None:
            continue
        elif k in choices:
            parts.append(str(value))
        elif k not in defaults or defaults[k] != value:
            parts.append(f"{k}={value}")
    return parts


# ---- which records are one configuration (report tables, leaderboards, the gate; qbench.groups) ---------

CONFIG_COLUMNS = ("model", "method", "bits", "group_size", "calib")

# Method parameters added after records were written: (methods, the value those older records ran with).
PARAMS_BEFORE_OPTION = {"zero_in_range": (("rtn", "gptq", "awq"), True), "imatrix": (("gguf",), None)}


def without_legacy_values(method_name: str, params: dict) -> dict:
    """Parameters with those left out that hold the value runs from before the parameter had: one form
    for a gate key from before a parameter existed and for a run with it at that value (a gguf
    baseline from before `imatrix`, a run with imatrix=null)."""
    return {k: v for k, v in params.items()
            if not (k in PARAMS_BEFORE_OPTION and method_name in PARAMS_BEFORE_OPTION[k][0]
                    and v == PARAMS_BEFORE_OPTION[k][1])}


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
    bits, group size, calibration set and its other settings, method parameters, a forced kernel, a
    quantized KV cache (kv_cache=none and records before the option: the same, None)."""
    calib = dict((rec.get("config") or {}).get("calib") or {}) if rec.get("calib") else {}
    calib.pop("seed", None)
    method = (with_legacy_params(rec).get("config") or {}).get("method")
    kv = kv_cache_entry(rec)
    return (json.dumps(rec.get("eval_key"), sort_keys=True), *(str(rec.get(c)) for c in CONFIG_COLUMNS),
            json.dumps(method, sort_keys=True), forced_kernel(rec), json.dumps(calib, sort_keys=True),
            None if kv is None else json.dumps(kv, sort_keys=True))


def latest_per_config(records: list[dict]) -> list[dict]:
    """The last ok/failed record of each (config, eval settings, calibration seed); skipped records are
    not rows. Records of several seeds of one config stay apart here: qbench.groups merges them."""
    latest = {}
    for rec in records:
        if rec.get("status") == "skipped":
            continue
        latest[(*config_identity(rec), calib_seed(rec))] = rec
    return list(latest.values())
