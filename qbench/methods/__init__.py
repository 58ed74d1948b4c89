"""The method registry: method name -> module qbench.methods.<name>.

Each method is one module with one function,
    quantize(model, cfg, ctx) -> dict     # replaces the model's layers in place; returns record info
and optionally
    export(model, cfg, ctx, path) -> None # writes the quantized model in the method's format
plus one Hydra config group entry conf/method/<name>.yaml holding its parameters and legal values.
Adding a method adds those two files and touches nothing else.
"""

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from qbench import ConfigError
from qbench.paths import group_options


def method_names() -> list[str]:
    return group_options("method")


def get_method(name: str) -> ModuleType:
    if name not in method_names():
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(method_names())}")
    return importlib.import_module(f"qbench.methods.{name}")


@dataclass
class RunContext:
    """What a method may use besides the model and config: no globals, no argparse."""

    tokenizer: object
    device: str
    dtype: object
    data_dir: str | None = None
    quiet: bool = False
    cache: dict = field(default_factory=dict)  # shared within one process (e.g. calibration captures)

    def progress(self, iterable, desc: str, total: int | None = None):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=self.quiet, leave=False)
