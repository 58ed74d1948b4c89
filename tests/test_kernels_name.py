"""The repo's top-level kernels/ folder must not shadow Hugging Face's `kernels` package, which
transformers imports, when the repo root is on sys.path (`python -m pytest` or `python -m qbench.cli`
run from the checkout)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_top_level_kernels_is_hugging_faces_from_the_repo_root():
    code = ("import kernels, qbench.kernels as ours; from kernels import CUDAProperties; "
            "print(kernels.__file__); print(ours.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    theirs, ours = out.stdout.split()
    assert Path(theirs).resolve().parent != REPO / "kernels"
    assert Path(ours).resolve().parent == REPO / "kernels"


def test_without_hugging_faces_kernels_the_name_stays_ours():
    """Where no other `kernels` is installed (transformers older than 5.2x), a top-level import from the
    repo root gets qbench's kernels, as before, and transformers' availability probe does not fail."""
    code = ("import importlib.machinery as m; find = m.PathFinder.find_spec\n"
            "m.PathFinder.find_spec = lambda name, path=None, target=None: "
            "None if name == 'kernels' and path is not None else find(name, path, target)\n"
            "import kernels; print(kernels.__file__, hasattr(kernels, 'wint_matmul'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    path, has = out.stdout.split()
    assert Path(path).resolve().parent == REPO / "kernels" and has == "True"
