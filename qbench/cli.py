"""The `qbench` command: a Hydra app, with subcommands beside it.

    qbench [hydra overrides]           one run (or a sweep with -m)
    qbench report|sweep|gate [...]     see SUBCOMMAND_HELP
Every config of a sweep is composed and validated before Hydra starts, so an impossible value fails
in one line, in seconds, before torch is imported or any model is loaded. Exit codes: qbench/__init__.py
(0 ok, 1 some record failed, 2 bad input, 130 interrupted).
"""

import difflib
import itertools
import sys

from qbench import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConfigError

SUBCOMMANDS = {
    "report": "qbench.report:main",
    "gate": "qbench.gate:main",
    "sweep": "qbench.sweep:main",
}
SUBCOMMAND_HELP = {
    "report": "comparison table of the records; leaderboards under the results dir (--publish: reports/)",
    "sweep": "run a named sweep file (sweeps/*.yaml) as multiruns",
    "gate": "perplexity regression gate of records against a baseline file",
}
HELP_FLAGS = ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion")


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
    from qbench.launch import missing_plugin
    from qbench.paths import conf_dir, group_options

    missing = missing_plugin(argv)
    if missing:
        raise ConfigError(missing)
    try:
        jobs = _sweep_overrides(argv)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for overrides in jobs:
            for override in overrides:
                group, _, value = override.partition("=")
                if group in ("method", "calib", "hardware", "kv_cache") and value not in group_options(group):
                    raise ConfigError(f"unknown {group} {value!r}; valid: {', '.join(group_options(group))}")
            try:
                cfg = compose(config_name="config", overrides=overrides)
            except (HydraException, OmegaConfBaseException) as err:
                raise ConfigError(str(err).splitlines()[0]) from None
            validate(cfg)


def _hydra_main() -> int:
    import hydra

    from qbench import launch
    from qbench.paths import conf_dir

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def app(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from qbench.app import run_and_report
        from qbench.launch import pin_job, sweep_id_of

        hc = HydraConfig.get()
        pin_job(hc)  # a joblib worker takes its GPU before anything touches CUDA
        multirun = hc.mode == RunMode.MULTIRUN
        record = run_and_report(cfg, sweep_id_of(hc.sweep.dir) if multirun else None)
        if not multirun:
            last[:] = [cfg, record]

    last: list = []  # a single run's config and record
    launch.ENDED.clear()
    app()
    if launch.ENDED:  # a multirun: its jobs may have run in other processes, so its records are read back
        from qbench.app import resume_summary
        from qbench.wandb_log import log_sweep

        cfg, sweep_id, records = launch.ENDED[-1]
        summary = resume_summary(records)
        if summary:
            print(summary)
        try:  # its leaderboard as a W&B table + HTML artifact
            log_sweep(cfg, sweep_id)
        except Exception as err:  # the records are written; a logging failure is a note, not a crash
            print(f"qbench: W&B sweep report not logged: {type(err).__name__}: {err}", file=sys.stderr)
    elif last:
        cfg, records = last[0], [last[1]]
    else:
        return EXIT_OK  # nothing ran (--cfg, --info)
    from qbench.app import next_steps

    print(next_steps(cfg))
    return exit_code(records)


def exit_code(records: list[dict]) -> int:
    """1 when any record of the run or multirun failed, else 0 (skipped records are fine)."""
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        print(f"qbench: {len(failed)} of {len(records)} runs failed (exit code {EXIT_FAILED})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def print_subcommands() -> None:
    print("qbench [overrides]      one run; qbench -m key=a,b ... a sweep (Hydra multirun); help below")
    for name, text in SUBCOMMAND_HELP.items():
        print(f"qbench {name} [...]".ljust(24) + text + f" (qbench {name} --help)")
    print()


def unknown_subcommand(word: str) -> str:
    """The one-line error for a first argument that is neither a subcommand nor an override."""
    close = difflib.get_close_matches(word, list(SUBCOMMANDS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown subcommand {word!r}; {hint}valid: {', '.join(SUBCOMMANDS)} (overrides look like key=value)"


def _is_word(arg: str) -> bool:
    """A bare word (report, reprot), not an override (key=value, +key=v, ~key) nor a flag."""
    return arg.isidentifier()


def run_cli(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    if argv and _is_word(argv[0]):
        print(f"qbench: error: {unknown_subcommand(argv[0])}", file=sys.stderr)
        return EXIT_CONFIG
    if "--help" in argv or "-h" in argv:
        print_subcommands()
    if not any(a in HELP_FLAGS or a.startswith("--info") for a in argv):
        try:
            prevalidate(argv)
        except ConfigError as err:
            print(f"qbench: error: {err}", file=sys.stderr)
            return EXIT_CONFIG
    return _hydra_main()


def main() -> None:
    try:
        code = run_cli(sys.argv[1:])
    except KeyboardInterrupt:  # the run in progress is recorded as interrupted (qbench.runner)
        print("qbench: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
