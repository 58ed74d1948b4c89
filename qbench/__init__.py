"""qbench: evaluation and benchmarking harness for LLM quantization."""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """A config that cannot run. Its message is one line naming the valid choices."""
