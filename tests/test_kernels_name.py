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
