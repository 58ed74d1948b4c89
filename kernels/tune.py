"""A small autotuner: time each candidate config of a launch once per (kernel, key), keep the fastest.

Triton's own `@triton.autotune` cannot zero a split-K output buffer before the real call after tuning,
so the launchers tune whole calls instead: `run(config)` allocates, zeroes, launches and casts. Each
candidate is timed on the GPU alone (a CUDA graph of calls, gpu_time_ms): timed eagerly, a call of
a few tens of microseconds measures the Python launch cost, not the kernel, and the choice is noise.
Choices are cached in memory and on disk ($QBENCH_CACHE_DIR or ~/.cache/qbench, one JSON file per GPU
name), so a process tunes each shape once per machine. On the CPU (TRITON_INTERPRET=1) nothing is
timed: the first config is used.
"""

import json
import os
import warnings
from pathlib import Path

import torch

_CHOSEN: dict[str, dict] = {}
_LOADED: set[str] = set()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids and buffers: triton.cdiv is a constexpr function whose call from
    Python costs about 3 us (triton 3.6, 2-core host), and launchers run it on every call."""
    return -(-a // b)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Bumped whenever a kernel's candidate list changes (2: IN_PLACE pairing of kernels/wint_h2.py; 3: GGUF
# decode through the integer kernel, kernels/gguf.py; 4: tensor-core candidates for 2-16 tokens of NF4/FP4,
# W8A16 and GGUF, kernels/nf4_tc.py and wint_tc.py), so a machine's cached choices from an older list
# are re-tuned instead of kept.
CANDIDATES_VERSION = 4


def _cache_file(device_name: str) -> Path:
    root = Path(os.environ.get("QBENCH_CACHE_DIR", Path.home() / ".cache" / "qbench"))
    return root / "autotune" / f"v{CANDIDATES_VERSION}" / (device_name.replace(" ", "_") + ".json")


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
        # Workers of a parallel sweep tune on the same machine at once: keep what the others wrote (one
        # picked at the same moment may still be lost: it is only tuned again), and replace the file
        # atomically, so no worker ever reads half of it.
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**on_disk, **mine}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-tuning


_NAMES: dict[int, str] = {}
_FAST: dict[tuple, dict] = {}  # (device index, name, key) -> config: the per-call lookup, no string building
_FLUSH: dict[int, tuple] = {}  # device -> (256 MiB buffer, CUDA graph of flushes, flushes in it)
_LAST: list = [None]  # (name, config) of the latest pick, for benchmark reports


def last_pick():
    """(kernel name, config) chosen by the latest tuned call in this process, or None."""
    return _LAST[0]


def gpu_time_ms(fn, reps: int = 8, replays: int = 5) -> float:
    """GPU time of one fn() call, free of Python launch overhead: fn is captured `reps` times in a CUDA
    graph, each call after a 256 MiB write that evicts L2 (as triton's do_bench flushes), and a graph
    of the writes alone is subtracted. The two graphs are replayed in turns, `replays` pairs, and the
    median of the pairs' differences is taken: the writes take longer than a 60 us kernel, and two
    medians taken apart let their drift into the difference. fn must not synchronize."""
    dev = torch.cuda.current_device()
    if dev not in _FLUSH:
        buf = torch.empty(1 << 28, dtype=torch.int8, device="cuda")
        flush_only = torch.cuda.CUDAGraph()
        with torch.cuda.graph(flush_only):
            for _ in range(reps):
                buf.zero_()
        _FLUSH[dev] = (buf, flush_only, reps)
    buf, flush_only, flush_reps = _FLUSH[dev]
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    with_fn = torch.cuda.CUDAGraph()
    with torch.cuda.graph(with_fn):
        for _ in range(reps):
            buf.zero_()
            fn()
    with_fn.replay()  # warm
    flush_only.replay()
    diffs = sorted(_replay_ms(with_fn) / reps - _replay_ms(flush_only) / flush_reps for _ in range(replays))
    del with_fn
    return max(diffs[len(diffs) // 2], 0.0)


def _replay_ms(graph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _compile_error(err: Exception) -> bool:
    try:
        from triton.compiler.errors import CompilationError
    except ImportError:
        return False
    return isinstance(err, CompilationError)


def _out_of_resources(err: Exception) -> bool:
    return "OutOfResources" in type(err).__name__ or "out of resource" in str(err)


def pick(name: str, key: tuple, make_configs, run, device: torch.device) -> dict:
    """The fastest of make_configs() for this key (GPU time, gpu_time_ms); run(config) must perform
    one complete call (allocation, split-K zeroing, casts included)."""
    if device.type != "cuda" or interpreted():
        return make_configs()[0]
    index = device.index if device.index is not None else torch.cuda.current_device()
    chosen = _FAST.get((index, name, key))
    if chosen is not None:
        _LAST[0] = (name, chosen)
        return chosen
    if index not in _NAMES:
        _NAMES[index] = torch.cuda.get_device_name(index)
        _load(_NAMES[index])
    device_name = _NAMES[index]
    full = f"{device_name}|{name}|{key}"
    if full not in _CHOSEN:
        _CHOSEN[full] = _tune(name, key, make_configs(), run)
        _save(device_name)
    _FAST[(index, name, key)] = _CHOSEN[full]
    _LAST[0] = (name, _CHOSEN[full])
    return _CHOSEN[full]


def release_flush() -> None:
    """Free the 256 MiB L2-flush buffer and its graph, so tuning leaves no memory behind (a run's
    VRAM figure then counts the model and its evaluation, not the tuner)."""
    _FLUSH.clear()


def _tune(name: str, key: tuple, configs: list[dict], run) -> dict:
    try:
        return _tune_all(name, key, configs, run)
    finally:
        release_flush()


def _reference(configs: list[dict], run):
    """The output of the last candidate (the simplest config of each list: the tested fallback), or None."""
    try:
        out = run(configs[-1])
    except Exception:  # noqa: BLE001 - then candidates are only timed, as before
        return None
    return out if isinstance(out, torch.Tensor) else None


def _agrees(out, reference: torch.Tensor) -> bool:
    """Same result up to rounding and summation order (relative error of the norm below 1 %)."""
    if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
        return False
    diff = (out.float() - reference.float()).norm()
    return bool(torch.isfinite(diff)) and diff.item() <= 1e-2 * max(reference.float().norm().item(), 1e-30)


def _tune_all(name: str, key: tuple, configs: list[dict], run) -> dict:
    best, best_ms = None, float("inf")
    verbose = os.environ.get("QBENCH_TUNE_VERBOSE", "0") not in ("", "0")  # print every candidate's time
    # A fast candidate with a wrong result must never win: each is checked against the simplest config's output.
    reference = _reference(configs, run)
    for config in configs:
        try:
            if reference is not None and not _agrees(run(config), reference):
                warnings.warn(f"qbench tuner: {name} config {config} disagrees with {configs[-1]} "
                              f"(relative difference above 1 %), skipped")
                continue
            ms = gpu_time_ms(lambda: run(config))
        except Exception as err:  # a config that does not fit (shared memory, registers) is skipped
            if _out_of_resources(err):
                continue
            if _compile_error(err):  # a candidate this GPU's compiler rejects: skipped, said aloud
                warnings.warn(f"qbench tuner: {name} config {config} does not compile here, skipped: "
                              f"{str(err).splitlines()[0][:200]}")
                continue
            # Anything else may be the graph capture itself (a call that cannot be captured): time the
            # call eagerly instead; a real error in the call raises again here.
            import triton

            ms = triton.testing.do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median")
        if verbose:
            print(f"  tune {name} {key}: {ms:.4f} ms {config}", flush=True)
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"no config of {name} runs for key {key}")
    return best


def m_bucket(m: int) -> int:
    """Tuning key for the number of rows: the next power of two (1, 2, 4, ..., capped at 4096)."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)
