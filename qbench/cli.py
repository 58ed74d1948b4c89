"""The `qbench` command: a Hydra app, with subcommands beside it.

    qbench [hydra overrides]           one run (or a sweep with -m)
    qbench report [...]                comparison table of the records
Every config of a sweep is composed and validated before Hydra starts, so an impossible value fails
in one line, in seconds, before torch is imported or any model is loaded.
"""

import itertools
import sys

from qbench import ConfigError

SUBCOMMANDS = {
    "report": "qbench.report:main",
    "gate": "qbench.gate:main",
    "sweep": "qbench.sweep:main",
}


def _subcommand(name: str, argv: list[str]) -> int:
    import importlib

    module, func = SUBCOMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)(argv) or 0


def _sweep_overrides(argv: list[str]) -> list[list[str]]:
    """The override lists of every job a (multi)run will start, hydra.* overrides left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-") and "=" in a]
    parsed = OverridesParser.create().parse_overrides(args)
    choices = []
    for override in parsed:
        if override.key_or_group.startswith("hydra"):
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        prefix = f"{override.get_key_element()}="
        choices.append([prefix + v for v in values])
    return [list(combo) for combo in itertools.product(*choices)]


def prevalidate(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qbench.config import validate
    from qbench.paths import conf_dir, group_options

    try:
        jobs = _sweep_overrides(argv)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for overrides in jobs:
            for override in overrides:
                group, _, value = override.partition("=")
                if group in ("method", "calib", "hardware") and value not in group_options(group):
                    raise ConfigError(f"unknown {group} {value!r}; valid: {', '.join(group_options(group))}")
            try:
                cfg = compose(config_name="config", overrides=overrides)
            except (HydraException, OmegaConfBaseException) as err:
                raise ConfigError(str(err).splitlines()[0]) from None
            validate(cfg)


def _hydra_main() -> None:
    import hydra

    from qbench.paths import conf_dir

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def app(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from qbench.app import run_and_report

        hc = HydraConfig.get()
        sweep_id = hc.sweep.dir.rstrip("/").split("/")[-1] if hc.mode == RunMode.MULTIRUN else None
        run_and_report(cfg, sweep_id)
        last[:] = [cfg, sweep_id]

    last: list = []
    app()
    if len(last) == 2 and last[1]:  # a multirun ended: its leaderboard as a W&B table + HTML artifact
        from qbench.wandb_log import log_sweep

        try:
            log_sweep(*last)
        except Exception as err:  # the records are written; a logging failure is a note, not a crash
            print(f"qbench: W&B sweep report not logged: {type(err).__name__}: {err}", file=sys.stderr)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        sys.exit(_subcommand(argv[0], argv[1:]))
    if not any(a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion") or a.startswith("--info") for a in argv):
        try:
            prevalidate(argv)
        except ConfigError as err:
            print(f"qbench: error: {err}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
