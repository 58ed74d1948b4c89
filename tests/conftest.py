"""Shared fixtures. The real default model is loaded once per test session (about 35 s on a 2-core
CPU the first time, seconds once its converted copy is cached), and tests use few, short windows."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Under xdist (.ci/run: two workers on two cores), one intra-op thread per worker: two threads each make
# OpenMP's spinning workers fight over the cores (the model tests took 225 s instead of 145 s). Set before
# torch loads; the subprocesses the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU, Triton kernels run in its interpreter; this must be set before any module that
# defines a @triton.jit kernel is imported, whichever test file happens to import one first.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin loaded torch first
except ImportError:
    pass

# Tests never reach the hub: data comes from the data root (../shared/data unless set).
os.environ.setdefault("QBENCH_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def data_dir() -> str:
    path = os.environ["QBENCH_DATA_DIR"]
    if not (Path(path) / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"no WikiText-2 under the data root {path}")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The default model (float32, CPU), loaded once. Tests must not modify it: deepcopy first."""
    from qbench.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def cfg_factory(tmp_path_factory):
    """compose(overrides) -> a composed qbench config writing to a temporary results dir."""
    from hydra import compose, initialize_config_dir

    from qbench.paths import conf_dir

    def make(*overrides: str):
        results = tmp_path_factory.mktemp("results")
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=[f"results_dir={results}", "wandb.mode=disabled",
                                                             "quiet=true", *overrides])

    return make


def pytest_collection_modifyitems(config, items):
    """Under xdist (`-n 2 --dist loadgroup`, as .ci/run), the tests of a module that share a
    module-scoped fixture (a real-model run, a quantized model) go to one worker, which builds it once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info and any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
