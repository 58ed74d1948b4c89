"""Sweeps on Hydra's parallel launchers: one worker per GPU (joblib), one Slurm job per run (submitit).

    qbench -m hydra/launcher=gpus method=rtn,gptq bits=3,4      # conf/hydra/launcher/gpus.yaml
    qbench -m hydra/launcher=slurm hydra.launcher.partition=gpu method=rtn,gptq bits=3,4

The jobs of these launchers run in other processes (or on other nodes), so what the starting process
knows of a multirun comes from the records: `MultirunRecords` (a Hydra callback, conf/config.yaml)
reads back the records that the multirun's jobs appended. Concurrent writers are safe: see
qbench/records.py (appends, readers) and qbench/runner.py (one baseline per eval key).

GPU pinning (`pin_gpu`): a joblib worker sees every GPU of the machine, so before it touches CUDA it
sets CUDA_VISIBLE_DEVICES to one of them, starting from its job index (job % GPUs) and taking the
first that no other worker on this machine holds. It keeps that GPU for the jobs it runs later (CUDA
reads the variable once per process). A CUDA_VISIBLE_DEVICES set by the user with several GPUs is the
list the workers share out; with one GPU (or none) nothing is changed. Slurm gives each job its own GPU.
"""

import fcntl
import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

_PINNED: list = []  # the open lock file of the GPU this process holds (held until the process ends)


# hydra/launcher=<name> -> the plugin (module, PyPI package) that provides it
PLUGINS = {name: ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher") for name in ("gpus", "joblib")}
PLUGINS.update({name: ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
                for name in ("slurm", "submitit_slurm", "submitit_local")})


def missing_plugin(argv: list[str]) -> str | None:
    """The one-line error for a launcher whose plugin is not installed (Hydra's own is a page long)."""
    for arg in argv:
        name = arg.partition("hydra/launcher=")[2]
        module, package = PLUGINS.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            return f"hydra/launcher={name} needs the {package} plugin: pip install 'qbench[launchers]'"
    return None


def sweep_id_of(sweep_dir: str) -> str:
    """A multirun's sweep id, as its records carry it: the last part of hydra.sweep.dir."""
    return str(sweep_dir).rstrip("/").split("/")[-1]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, counted without initializing CUDA (after that a changed
    CUDA_VISIBLE_DEVICES would be ignored): the user's CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(line for line in out.stdout.splitlines() if line.startswith("GPU "))]


def gpu_count() -> int:
    """hydra/launcher=gpus' n_jobs: one worker per GPU, one worker on a machine without any."""
    return max(1, len(visible_gpus()))


def pin_gpu(job_num: int, gpus: list[str], lock_dir: Path | None = None) -> str | None:
    """Set CUDA_VISIBLE_DEVICES to this worker's GPU and return it; None where there is nothing to share out."""
    if _PINNED:
        return os.environ.get("CUDA_VISIBLE_DEVICES")
    if len(gpus) < 2:
        return None
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"qbench-gpu-locks-{os.getuid()}"  # this machine's workers
    lock_dir.mkdir(parents=True, exist_ok=True)
    start = job_num % len(gpus)
    chosen = gpus[start]  # every GPU held by another worker (more workers than GPUs): share the job's own
    for offset in range(len(gpus)):
        gpu = gpus[(start + offset) % len(gpus)]
        fd = os.open(lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _PINNED.append(fd)  # never closed: the lock goes when the worker process does
        chosen = gpu
        break
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def pin_job(hydra_cfg) -> None:
    """The first thing a job does: under the joblib launcher, pin this worker to its GPU."""
    if "joblib" in str(hydra_cfg.launcher.get("_target_", "")):
        pin_gpu(int(hydra_cfg.job.num), visible_gpus())


ENDED: list = []  # (multirun config, sweep id, records) of the multiruns this process started


class MultirunRecords(Callback):
    """In the process that starts a multirun: at its end, the records its jobs appended (baselines
    left out), whichever launcher ran them and wherever."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from qbench.records import read_records

        self.sweep_id = sweep_id_of(config.hydra.sweep.dir)
        self.before = {r.get("run_id") for r in read_records(config.results_dir)}

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from qbench.records import read_records

        records = [r for r in read_records(config.results_dir) if r.get("sweep_id") == self.sweep_id
                   and r.get("run_id") not in self.before and r.get("role") != "baseline"]
        ENDED.append((config, self.sweep_id, records))


OmegaConf.register_new_resolver("qbench_gpu_count", gpu_count, replace=True)
