"""qbench: evaluation and benchmarking harness for LLM quantization."""

__version__ = "0.1.0"

# Exit codes of `qbench`, `qbench -m ...` and `qbench sweep` (README, "Exit codes").
EXIT_OK = 0  # every record ok or skipped
EXIT_FAILED = 1  # it ran, but some record is `failed`
EXIT_CONFIG = 2  # an impossible value or bad input: one line, before any model is loaded
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the run in progress is recorded as `interrupted`


class ConfigError(ValueError):
    """A config that cannot run. Its message is one line naming the valid choices."""
