"""Shape models: `model=shape:<name>`, a real architecture with seeded random weights.

conf/shapes/<name>.yaml holds the architecture as transformers config fields (`config`, its
`model_type` picks the config class) and the seed of the weights (`seed`). It exists to measure what
depends on shapes only, at sizes no real checkpoint is at hand for: quantize time and memory, model
size, speed, cost. The model is built directly on the run's device in the run's dtype (no float32
copy on the host), then every weight is drawn from one torch.Generator of that device:
    2-D weights (linears, embedding)   N(0, 1 / in_features): a linear keeps the RMS of its input, so
                                       with unit norm weights every linear reads inputs of RMS ~1 and
                                       the attention logits and lm_head logits have variance ~1
    o_proj, down_proj                  that std / sqrt(2 * layers): they write into the residual
                                       stream, whose 2 * layers branches then add up to an RMS ~1 at
                                       any depth
    biases N(0, 0.02^2), norm weights 1
so activations stay finite in float16 through every layer and perplexity is finite (of the order of
the vocabulary size): a sanity value saying the quantized model runs, never accuracy. The same seed
on the same kind of device gives the same weights (the CPU and CUDA generators draw differently).
Token ids come from the default model's tokenizer (SmolLM2, 49152 ids) while the embedding and
lm_head keep the real vocabulary size, so memory and speed are the real model's; embedding rows above
the tokenizer's ids are never looked up.
"""

import functools
import hashlib
from pathlib import Path

import yaml

from qbench import ConfigError
from qbench.paths import conf_dir, group_options

PREFIX = "shape:"
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # linears whose output is added to the residual stream
BIAS_STD = 0.02


def shape_names() -> list[str]:
    return group_options("shapes")


def shape_file(name: str) -> Path:
    """conf/shapes/<name>.yaml of `shape:<name>` (the prefix may be given or not)."""
    name = name.removeprefix(PREFIX)
    if name not in shape_names():
        raise ConfigError(f"unknown shape model {PREFIX}{name}; valid: {', '.join(PREFIX + n for n in shape_names())}")
    return conf_dir() / "shapes" / f"{name}.yaml"


def read_shape(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def identity(path: str | Path) -> dict:
    """What the weights are a function of (for eval keys): the shape's name, seed and file digest."""
    text = Path(path).read_text()
    return {"shape": Path(path).stem, "seed": int(yaml.safe_load(text)["seed"]),
            "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def hf_config(spec: dict):
    from transformers import AutoConfig

    fields = dict(spec["config"])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@functools.lru_cache(maxsize=32)
def count_parameters(config_json: str) -> int:
    """Parameters of a model of this transformers config (JSON of its dict), built on the meta device:
    exact for any architecture transformers knows, no memory, under a second at 70B."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def shape_parameters(path: str | Path) -> int:
    import json

    return count_parameters(json.dumps(read_shape(path)["config"], sort_keys=True))


def build(path: str | Path, device: str, dtype):
    """The shape's model on `device` in `dtype`, weights drawn from its seed (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = read_shape(path)
    config = hf_config(spec)
    with torch.device(device):  # parameters are allocated on the device, in dtype, from the start
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    init_weights(model, int(spec["seed"]), int(config.num_hidden_layers))
    model.eval()
    model.requires_grad_(False)
    return model


def init_weights(model, seed: int, layers: int) -> None:
    """Draw every parameter in place from one generator on the model's device, in parameter order."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    residual_scale = (2 * layers) ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights come once
            if p.dim() == 2:
                writes_residual = name.removesuffix(".weight").endswith(RESIDUAL_WRITERS)
                std = p.shape[1] ** -0.5 * (residual_scale if writes_residual else 1.0)
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, BIAS_STD, generator=gen)
            else:  # RMSNorm weights
                p.fill_(1.0)
