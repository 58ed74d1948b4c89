"""Model names -> sources -> loaded (model, tokenizer).

`model=` takes a registered name (qbench/packaged_models.py), a Hugging Face id, a local directory, a .gguf
file or a shape model (`shape:<name>`, an architecture of conf/shapes with seeded random weights,
qbench/shapes.py). GGUF files are dequantized by transformers on load (slow on CPU), so the converted
model is cached once under the qbench cache dir and reloaded from there. Local directories and hub ids
are loaded straight onto the run's device (device_map), never first as a host copy.

Before anything loads, `check_fit` compares the memory a model needs with the device's (shape models
and local directories, whose parameter count is known from their config): weights in the run's dtype
plus FIT_MARGIN, against the GPU's total memory or the host's available memory.
"""

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qbench import ConfigError
from qbench.packaged_models import REGISTERED, gguf_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # a Hugging Face hub id, org/name

DEFAULT_MODEL = "smollm2-135m"  # its tokenizer is also the shape models' tokenizer


@dataclass
class ModelSource:
    name: str  # as the user gave it
    kind: str  # gguf | dir | hub | shape
    path: str  # file, directory or hub id


def check_model_name(name: str) -> None:
    """Fail fast on a model that can be neither registered, local nor a hub id."""
    resolve_source(name)


def resolve_source(name: str) -> ModelSource:
    from qbench import shapes

    if name.startswith(shapes.PREFIX):
        return ModelSource(name, "shape", str(shapes.shape_file(name)))
    if name in REGISTERED:
        return ModelSource(name, "gguf", str(gguf_path(name)))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"model file {name} does not exist")
        return ModelSource(name, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {name} has no config.json")
        return ModelSource(name, "dir", str(path.resolve()))
    if HUB_ID.match(name) and not name.startswith((".", "/")):
        return ModelSource(name, "hub", name)
    registered = ", ".join(REGISTERED)
    raise ConfigError(
        f"unknown model {name!r}; give a registered name ({registered}), a Hugging Face id (org/name), "
        "a local model directory, a .gguf file or a shape model (shape:<name>, conf/shapes)"
    )


def model_type(name: str) -> str | None:
    """config.model_type of a model, where it is known before load: shape models (their yaml), local
    directories (config.json), GGUF files (the header's general.architecture, read alone); None for hub ids."""
    source = resolve_source(name)
    if source.kind == "shape":
        from qbench import shapes

        return shapes.read_shape(source.path)["config"].get("model_type")
    if source.kind == "dir":
        return json.loads((Path(source.path) / "config.json").read_text()).get("model_type")
    if source.kind == "gguf":
        return _gguf_architecture(source.path)
    return None


def _gguf_architecture(path: str) -> str | None:
    """general.architecture from the first string keys of a GGUF header (it is written first)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] != b"GGUF":
        return None
    pos, n_kv = 24, struct.unpack_from("<Q", head, 16)[0]
    for _ in range(min(n_kv, 16)):
        (n,) = struct.unpack_from("<Q", head, pos)
        key = head[pos + 8 : pos + 8 + n].decode("utf-8")
        (vtype,) = struct.unpack_from("<I", head, pos + 8 + n)
        pos += 12 + n
        if vtype != 8:  # only string values are walked past; the architecture key comes before others
            return None
        (m,) = struct.unpack_from("<Q", head, pos)
        value = head[pos + 8 : pos + 8 + m].decode("utf-8")
        pos += 8 + m
        if key == "general.architecture":
            return value
    return None


def is_synthetic(name: str) -> bool:
    """A shape model: seeded random weights, so its perplexity is a sanity value, never accuracy."""
    from qbench import shapes

    return name.startswith(shapes.PREFIX)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def _gguf_cache_dir(gguf_path: str) -> Path:
    import transformers

    from qbench.paths import cache_dir

    st = os.stat(gguf_path)
    key = json.dumps([os.path.abspath(gguf_path), st.st_size, int(st.st_mtime), transformers.__version__])
    return cache_dir() / "models" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _load_gguf(path: str, trust_remote_code: bool):
    """Dequantize a GGUF file once into a cached float32 HF directory; return that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(path)
    if (cached / "config.json").is_file():
        return str(cached)
    folder, fname = os.path.dirname(path), os.path.basename(path)
    import torch

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # The weights are plain dequantized floats now: drop the gguf marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, trust_remote_code=trust_remote_code)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "qbench_source.json").write_text(json.dumps({"gguf": path}))
    try:
        os.replace(tmp, cached)  # atomic: a half-written cache is never used
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(cached)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: ModelSource
    device: str
    dtype: object


def load_model(name: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if source.kind == "shape":
        from qbench.shapes import build

        return LoadedModel(build(source.path, device, torch_dtype), default_tokenizer(), source, device, torch_dtype)
    path = _load_gguf(source.path, trust_remote_code) if source.kind == "gguf" else source.path
    quantized = _quantized_checkpoint_loader(path)
    # a checkpoint of its own (not the converted GGUF file) may be large: load it onto the device directly
    placement = {"device_map": device} if source.kind in ("dir", "hub") else {}
    if quantized is not None:
        model = quantized(path, torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **placement)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, device, torch_dtype)


def default_tokenizer():
    """The default model's tokenizer (from its converted copy, made once and cached)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_load_gguf(resolve_source(DEFAULT_MODEL).path, False))


# ---- will it fit? (before anything loads) ------------------------------------------------------------

GIB = 2.0**30
# Room beyond the weights: activations, calibration batches, the KV cache, a quantizer's per-layer
# temporaries. A lower bound (GPTQ on an 8B model peaks several GiB above its weights), so a model that
# passes may still run out of memory; it is then recorded as failed.
FIT_MARGIN = {"fraction": 0.10, "gib": 1.0}


def parameter_count(source: ModelSource) -> int | None:
    """Parameters of a shape model or a local (unquantized) checkpoint; None where unknown before load."""
    from qbench import shapes

    if source.kind == "shape":
        return shapes.shape_parameters(source.path)
    if source.kind != "dir":
        return None  # hub ids are not fetched to be measured; GGUF files are the small default model
    fields = json.loads((Path(source.path) / "config.json").read_text())
    if fields.get("quantization_config") or "model_type" not in fields:
        return None
    from transformers import CONFIG_MAPPING

    if fields["model_type"] not in CONFIG_MAPPING:  # remote code: its architecture is not known here
        return None
    return shapes.count_parameters(json.dumps(fields, sort_keys=True))


def device_memory(device: str) -> tuple[int, str]:
    """(bytes, a phrase naming them with {} for the GiB): the GPU's total memory, or the host's available now."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory, "the GPU has {} GiB"
    return _host_available(), "the host has {} GiB available (device=cpu)"


def _host_available() -> int:
    """MemAvailable of /proc/meminfo, capped by a cgroup v2 memory limit (containers)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit, used = Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")
    if limit.is_file() and used.is_file() and limit.read_text().strip() != "max":
        available = min(available, int(limit.read_text()) - int(used.read_text()))
    return available


def check_fit(name: str, device: str = "auto", dtype: str = "auto") -> None:
    """One line (ConfigError) when the model's weights plus FIT_MARGIN exceed the device's memory."""
    params = parameter_count(resolve_source(name))
    if params is None:
        return
    import torch

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    weights = params * torch.empty((), dtype=torch_dtype).element_size()
    need = weights * (1 + FIT_MARGIN["fraction"]) + FIT_MARGIN["gib"] * GIB
    have, phrase = device_memory(device)
    if need > have:
        dtype_name = str(torch_dtype).replace("torch.", "")
        margin = f"{FIT_MARGIN['fraction']:.0%} + {FIT_MARGIN['gib']:g} GiB"
        raise ConfigError(f"{name} needs ~{need / GIB:.0f} GiB in {dtype_name} ({params / 1e9:.2f}B parameters, "
                          f"{weights / GIB:.1f} GiB of weights + {margin}), " + phrase.format(f"{have / GIB:.0f}"))


# quant_method in a checkpoint's quantization_config -> "module:function" that loads it into qbench's
# own quantized modules (each returns a model). Export formats register here.
CHECKPOINT_LOADERS: dict[str, str] = {
    "gptq": "qbench.quant.gptq_format:load_checkpoint",
}


def _quantized_checkpoint_loader(path: str):
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    target = CHECKPOINT_LOADERS.get(quant.get("quant_method", ""))
    if target is None:
        return None
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# ---- the KV cache's name across transformers versions ------------------------------------------------
# transformers 5.2x renamed the forward argument and output field `past_key_values` to `cache` (the old
# name is a deprecated alias there, announced for removal in 5.40); the GPU image has 5.17, which knows
# only the old one. qbench passes and reads the cache through these two helpers.

@functools.lru_cache(maxsize=None)
def _cache_keyword_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(model) -> str:
    """The name under which model.forward takes a KV cache."""
    return _cache_keyword_of(type(model))


def output_cache(out):
    """The KV cache a model output carries."""
    return out["cache"] if "cache" in out else out.past_key_values
